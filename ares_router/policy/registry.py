"""Named policies: a dispatcher and a rebalancer, chosen by name, and the two calls both bodies make."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

from ares_router.policy.defrag import Defragmenter
from ares_router.policy.dispatch import DISPATCHERS, Dispatcher
from ares_router.policy.rebalance import REBALANCERS, NoRebalance, RebalancePolicy
from ares_router.policy.snapshot import ClusterSnapshot, Migration, NewRequest


@dataclass(frozen=True)
class Policy:
    """A named pair of decisions. `needs_true_lengths`: the caller must put true remaining lengths in the snapshot
    (and at dispatch) instead of predictions: only a simulator can run it."""

    name: str
    dispatcher: Dispatcher
    rebalancer: RebalancePolicy
    needs_true_lengths: bool = False
    # Late binding: while no healthy instance would admit a new request now, the router keeps it and places it
    # once one does (oldest first, first fit), instead of committing it to one server's prealloc queue (`holds`).
    hold_when_full: bool = False
    # Defragmenting moves (`defrag.Defragmenter`): when the request held longest fits on no instance, move running
    # requests so that one instance admits it (`plan_rebalance` with `held`). None: no such moves.
    defragmenter: Defragmenter | None = None

    @property
    def rebalances(self) -> bool:
        """Whether it ever moves a running request."""
        return not isinstance(self.rebalancer, NoRebalance)


def _policy(name: str, dispatcher: str, rebalancer: str, defrag: bool = False, **flags: bool) -> Callable[[], Policy]:
    return lambda: Policy(
        name, DISPATCHERS[dispatcher](), REBALANCERS[rebalancer](), defragmenter=Defragmenter() if defrag else None,
        **flags,
    )  # fmt: skip


# Adding a policy is one line here (its parts, if new, one line in DISPATCHERS / REBALANCERS).
POLICIES: Mapping[str, Callable[[], Policy]] = MappingProxyType(
    {
        "round_robin": _policy("round_robin", "round_robin", "none"),
        "random": _policy("random", "random", "none"),
        "least_kv": _policy("least_kv", "least_kv", "none"),
        # least_kv placement plus Llumnix-style current-load migration: the router migrates only with
        # `--ares-rebalance on` (without it, this places exactly like least_kv); the simulator always does.
        "current_migrate": _policy("current_migrate", "least_kv", "current_load"),
        "ares": _policy("ares", "predicted_peak", "predicted"),
        # ARES fed true remaining lengths (simulator only): not a bound, see ares.sim.bounds for that.
        "ares_true_lengths": _policy("ares_true_lengths", "predicted_peak", "predicted", needs_true_lengths=True),
        # late binding (kept at the router while every instance is full), with and without prediction
        "ares_hold": _policy("ares_hold", "predicted_peak", "predicted", hold_when_full=True),
        "current_migrate_hold": _policy("current_migrate_hold", "least_kv", "current_load", hold_when_full=True),
        # ares_hold fed true remaining lengths (simulator only): what perfect knowledge would add to late binding
        "ares_hold_true_lengths": _policy(
            "ares_hold_true_lengths", "predicted_peak", "predicted", hold_when_full=True, needs_true_lengths=True
        ),
        # late binding with prediction, plus defragmenting moves for the request held longest
        "ares_hold_defrag": _policy(
            "ares_hold_defrag", "predicted_peak", "predicted", defrag=True, hold_when_full=True
        ),
    }
)


def get_policy(name: str | Policy) -> Policy:
    """The policy registered under `name` (a `Policy` passes through)."""
    if isinstance(name, Policy):
        return name
    try:
        return POLICIES[name]()
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None


def place(
    snapshot: ClusterSnapshot,
    request: NewRequest,
    policy: str | Policy = "ares",
    rng: np.random.Generator | int | None = None,
    exclude: Iterable[int] = (),
) -> tuple[int, ClusterSnapshot]:
    """(index of the decode instance `request` goes to, the snapshot that counts it there). `rng`: a Generator or
    seed (the random policy); `exclude`: instances not to choose this time (a retry after a failure)."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    view = snapshot
    excluded = list(exclude)
    if excluded:
        mask = snapshot.healthy.copy()
        mask[excluded] = False
        view = replace(snapshot, healthy=mask)
    index = get_policy(policy).dispatcher.dispatch(view, request, gen)
    return index, snapshot.with_dispatch(index, request)


def holds(snapshot: ClusterSnapshot, request: NewRequest, policy: str | Policy = "ares") -> bool:
    """Whether `policy` keeps `request` at the router for now: it holds when full and no healthy instance of
    `snapshot` admits the request (SGLang's rule on the router's view)."""
    if not get_policy(policy).hold_when_full:
        return False
    healthy = np.flatnonzero(snapshot.healthy)
    return healthy.size > 0 and not snapshot.admits(request, healthy).any()


def plan_rebalance(
    snapshot: ClusterSnapshot, policy: str | Policy = "ares", held: NewRequest | None = None
) -> list[Migration]:
    """Migrations the policy wants now (`source`/`target` are indices into `snapshot.instances`). `held`: the
    request the router has held longest (late binding), if any: a policy with a defragmenter first plans the moves
    that let one instance admit it (`defrag.Defragmenter`), then its rebalancer's moves of other requests."""
    pol = get_policy(policy)
    moves = pol.rebalancer.plan(snapshot)
    if held is None or pol.defragmenter is None:
        return moves
    defrag = pol.defragmenter.plan(snapshot, held)
    taken = {m.request_id for m in defrag}
    return [*defrag, *(m for m in moves if m.request_id not in taken)]
