"""The decode servers' admission rule, as the simulator asks it of an instance's state.

`SimConfig.admission` "sglang": SGLang's rule (`ares_router.policy.Admission`, the one the router's policies use),
on the free KV, active requests, running tokens and largest single-request footprint the instance has `k` steps
into its segment. "predictive" / "predictive_point": the forecast KV peak of the running set plus the new request
within the pool (`KVForecast`), as `ares.engine.admission_hook` forecasts it. `DecodeAdmission` is a part of
`ClusterSim`, asked by preallocation (`decode`), by the next segment's plan and by a migration's target check.
"""

from __future__ import annotations

import math

import numpy as np

from ares_router.policy import KVForecast, planned_remaining

from .decode import _Decode
from .request import _Req


class DecodeAdmission:
    """The servers' admission decisions, as a part of `ClusterSim` (whose `__init__` builds the state it uses)."""

    def _single_need(self, inst: _Decode, running_tokens: float, active: int) -> float:
        """SGLang's largest single-request footprint over the running batch, where it can matter: the term is
        max(R * active, single - running_tokens), so below the largest footprint of any request it is never
        looked at (0 then gives the same decisions) and the loop over the batch runs only on nearly empty
        instances."""
        if self.max_footprint - running_tokens <= self.admission.reserve_tokens * active:
            return 0.0
        fp = self.footprint
        return max((float(fp[i]) for i in inst.running), default=0.0)

    def _admission_state(self, inst: _Decode, k: int = 0) -> tuple[float, int, float, float]:
        """(free, active, running_tokens, single_need) of `inst` as SGLang counts them, `k` steps into its current
        segment (0: at a step boundary)."""
        active = inst.n + inst.n_pre
        kv = inst.K + inst.n * k
        running_tokens = kv + inst.n  # prompt + output ids: the KV written plus each one's latest token
        return inst.cap - kv - inst.held, active, running_tokens, self._single_need(inst, running_tokens, active)

    def _admits(self, inst: _Decode, prompt: float, max_new: float, k: int = 0, planned: float | None = None) -> bool:
        """The server's decode admission on `inst`, `k` steps into its segment: SGLang's (`Admission`, the
        policies' rule), or with `SimConfig.admission` "predictive" the forecast peak with the request, planned at
        `planned` output tokens (None: SGLang's budget for it), within the pool (`_forecast`)."""
        if self.predictive:
            q = self.admission.max_new(prompt, max_new, float(inst.cap)) if planned is None else planned
            return bool(self._forecast(inst, k).admits(float(inst.cap), prompt, q))
        free, active, running_tokens, single = self._admission_state(inst, k)
        return bool(self.admission.admits(free, active, running_tokens, single, prompt, max_new, inst.cap))

    def _prior(self, req: _Req) -> float:
        """The output a predictive server plans for a request its head has not seen: the estimator's guess (the
        true length for the true-length policy's oracle servers)."""
        if self.needs_truth:
            return float(req.out - req.gen_now)
        m = self.col_max_new[req.i]
        est = self.estimator.total(req.prompt, None if math.isnan(m) else int(m))
        return min(est, self.admission.output_limit(float(req.prompt), m, float(self.cost.kv_capacity_tokens)))

    def _forecast(self, inst: _Decode, k: int = 0) -> KVForecast:
        """What a predictive server forecasts of itself `k` steps into its segment (as `ares.engine.admission_hook`
        does): running requests at KV length prompt + generated and planned remaining = the head's P90 (the error
        model's, as `_reports` gives the router) capped by max_tokens left; preallocated ones at their prompt and
        the prior; KV held for migrations flat."""
        run = np.fromiter(inst.running.keys(), dtype=np.intp, count=inst.n)
        gen = self.col_gen0[run] + (inst.steps + k - self.col_join[run])
        out = self.col_out[run]
        rem = np.maximum(out - gen, 0.0)
        if self.needs_truth:
            pred, upper = rem, np.full(run.size, np.nan)
        else:
            f = gen / out
            em = self.cfg.error_model
            pred = em.predict(rem, f, self.col_z[run])
            upper = em.upper(pred, f)
        left = self.admission.output_limit(self.col_prompt[run], self.col_max_new[run], float(inst.cap)) - gen
        planned = planned_remaining(pred, upper, left, self.plan_upper)
        pre = list(inst.pre.values())
        pre_prompt = np.array([r.prompt for r in pre], dtype=np.float64)
        pre_planned = np.array([self._prior(r) for r in pre], dtype=np.float64)
        lengths = np.concatenate([self.col_prompt[run] + gen, pre_prompt])
        base = float(inst.held - pre_prompt.sum())  # KV held for migrations in flight
        return KVForecast.of(lengths, np.concatenate([planned, pre_planned]), max(base, 0.0))
