"""Prometheus metrics of the router (`GET /metrics`).

Per-instance gauges are read from the router state at scrape time (a collector), so the request path pays only
for the counters and histograms it updates.

The length head's running error: when a request finishes, the last prediction its decode server reported for it
(`predicted_remaining` at `generated_tokens`, from one of the last two polls) is compared with what actually came
after that report (final output tokens - `generated_tokens`). `ares_head_abs_error_tokens` and
`ares_head_signed_error_tokens` (predicted - actual: > 0 = over-prediction) are histograms per decode instance;
mean absolute error = `rate(ares_head_abs_error_tokens_sum[5m]) / rate(ares_head_abs_error_tokens_count[5m])`.
A histogram with negative buckets has no `_sum` (OpenMetrics), so the signed errors' sum is the gauge
`ares_head_signed_error_tokens_total` (mean bias = its increase / the abs histogram's count).
Label `actual_from`: `usage` when the final count comes from the response itself (non-streaming usage or
meta_info, a stream's final usage or meta_info), `events` when it was counted from relayed stream events (chat
streams without usage; exact only when each event carries one token).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ares_router.state import RouterState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01)
POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_POW2 = tuple(float(2**k) for k in range(15))  # 1 .. 16384 tokens
HEAD_ABS_BUCKETS = (0.0, *_POW2)
HEAD_SIGNED_BUCKETS = (*(-b for b in reversed(_POW2)), 0.0, *_POW2)


class _StateCollector:
    """Per-instance gauges from the current snapshot."""

    def __init__(self, state: RouterState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        snap = s.snapshot
        peaks = s.predicted_peak_tokens()
        at_horizon = s.predicted_tokens_at_horizon()
        labels = ["instance", "url"]
        g = {
            "healthy": GaugeMetricFamily("ares_decode_healthy", "1 if the decode instance is chosen", labels=labels),
            "cap": GaugeMetricFamily("ares_decode_capacity_tokens", "KV pool size (tokens)", labels=labels),
            "used": GaugeMetricFamily("ares_decode_used_tokens", "KV tokens in use (polled/tracked)", labels=labels),
            "pend": GaugeMetricFamily(
                "ares_decode_used_tokens_with_pending",
                "KV tokens incl. requests dispatched, not yet running",
                labels=labels,
            ),
            "pred": GaugeMetricFamily(
                "ares_decode_predicted_peak_tokens",
                "predicted peak KV demand over the load-model horizon",
                labels=labels,
            ),
            "horizon": GaugeMetricFamily(
                "ares_decode_predicted_tokens_at_horizon",
                f"predicted KV demand {s.load_model.horizon_tokens} decode steps ahead (the load-model horizon)",
                labels=labels,
            ),
            "run": GaugeMetricFamily("ares_decode_running_requests", "running requests (as polled)", labels=labels),
            "queue": GaugeMetricFamily("ares_decode_queued_requests", "queued requests (as polled)", labels=labels),
            "infl": GaugeMetricFamily("ares_decode_inflight_requests", "router requests in flight", labels=labels),
        }
        for j, d in enumerate(s.decodes):
            lv = [d.name, d.url]
            g["healthy"].add_metric(lv, float(snap.healthy[j]))
            g["cap"].add_metric(lv, float(snap.capacity[j]))
            g["used"].add_metric(lv, float(snap.instances[j].used_tokens))
            g["pend"].add_metric(lv, float(snap.used[j]))
            g["pred"].add_metric(lv, float(peaks[j]))
            g["horizon"].add_metric(lv, float(at_horizon[j]))
            g["run"].add_metric(lv, float(d.load.running_reqs if d.load else 0))
            g["queue"].add_metric(lv, float(d.load.queued_reqs if d.load else 0))
            g["infl"].add_metric(lv, float(d.inflight))
        ph = GaugeMetricFamily("ares_prefill_healthy", "1 if the prefill instance is chosen", labels=labels)
        pi = GaugeMetricFamily("ares_prefill_inflight_requests", "router requests in flight", labels=labels)
        for p in s.prefills:
            ph.add_metric([p.name, p.url], float(p.healthy))
            pi.add_metric([p.name, p.url], float(p.inflight))
        yield from g.values()
        yield ph
        yield pi
        h = GaugeMetricFamily("ares_load_model_horizon_steps", "load-model horizon (decode steps)")
        h.add_metric([], float(s.load_model.horizon_tokens))
        yield h


class RouterMetrics:
    """The router's metric families, in a registry of their own."""

    def __init__(self, state: RouterState):
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state))
        self.dispatches = Counter(
            "ares_dispatch", "requests dispatched, by decode instance", ["instance", "policy"], registry=self.registry
        )
        self.requests = Counter(
            "ares_requests", "requests answered, by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.retries = Counter("ares_retries", "requests retried on another instance", ["role"], registry=self.registry)
        self.held = Gauge(
            "ares_held_requests",
            "requests kept at the router while no decode server admits them (policies that hold when full)",
            registry=self.registry,
        )
        self.aborts = Counter("ares_aborts", "requests aborted on the backends", ["reason"], registry=self.registry)
        self.latency = Histogram(
            "ares_request_latency_seconds",
            "end-to-end request latency seen by the router",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "ares_time_to_first_token_seconds",
            "time to the first relayed chunk (streaming requests)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decision = Histogram(
            "ares_policy_decision_seconds",
            "time to choose a decode instance",
            buckets=DECISION_BUCKETS,
            registry=self.registry,
        )
        self.poll_round = Histogram(
            "ares_poll_round_seconds",
            "one poll round: fetch = every server's answer fetched and parsed, refresh = snapshot rebuild",
            ["phase"],
            buckets=POLL_BUCKETS,
            registry=self.registry,
        )
        self.head_abs_error = Histogram(
            "ares_head_abs_error_tokens",
            "|predicted - actual| remaining tokens at the last report before a request finished",
            ["instance", "actual_from"],
            buckets=HEAD_ABS_BUCKETS,
            registry=self.registry,
        )
        self.head_signed_error = Histogram(
            "ares_head_signed_error_tokens",
            "predicted - actual remaining tokens at the last report before a request finished (> 0: over)",
            ["instance", "actual_from"],
            buckets=HEAD_SIGNED_BUCKETS,
            registry=self.registry,
        )
        self.migrations = Counter(
            "ares_migrations",
            "migrations of running requests between decode instances, by outcome (committed | failed)",
            ["src", "dst", "outcome"],
            registry=self.registry,
        )
        self.migration_seconds = Histogram(
            "ares_migration_seconds", "migration start to end", ["outcome"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.migration_pause = Histogram(
            "ares_migration_pause_seconds",
            "committed migrations: the request's pause, from A's pause to B's commit",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.migration_kv_tokens = Histogram(
            "ares_migration_kv_tokens", "committed migrations: KV positions moved", buckets=HEAD_ABS_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.rebalance_rounds = Counter(
            "ares_rebalance_rounds", "rebalancing rounds run (--ares-rebalance on)", registry=self.registry
        )
        self.migration_bytes = Counter(
            "ares_migration_bytes", "KV bytes moved by migrations", ["src", "dst"], registry=self.registry
        )
        self.head_signed_sum = Gauge(
            "ares_head_signed_error_tokens_total",
            "sum of predicted - actual remaining tokens over finished requests (the signed histogram has no _sum)",
            ["instance", "actual_from"],
            registry=self.registry,
        )

    def observe_poll_round(self, fetch_s: float, refresh_s: float) -> None:
        """Record one poll round's two phases."""
        self.poll_round.labels("fetch").observe(fetch_s)
        self.poll_round.labels("refresh").observe(refresh_s)

    def observe_head_error(self, instance: str, predicted: float, actual: float, actual_from: str) -> None:
        """Record the head's error on one finished request (tokens remaining after its last report)."""
        err = predicted - actual
        self.head_abs_error.labels(instance, actual_from).observe(abs(err))
        self.head_signed_error.labels(instance, actual_from).observe(err)
        self.head_signed_sum.labels(instance, actual_from).inc(err)

    def observe_migration(self, record: dict) -> None:
        """Record one finished migration (`ares_router.migration.Migration.record()`)."""
        outcome = record["state"]
        self.migrations.labels(record["source"], record["target"], outcome).inc()
        self.migration_bytes.labels(record["source"], record["target"]).inc(record["bytes"])
        if record["total_ms"] is not None:
            self.migration_seconds.labels(outcome).observe(record["total_ms"] / 1e3)
        if outcome == "committed":
            self.migration_kv_tokens.observe(record["kv_tokens"])
            if record["pause_ms"] is not None:
                self.migration_pause.observe(record["pause_ms"] / 1e3)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
