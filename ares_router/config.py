"""Router configuration: one dataclass, filled from the command line (`ares_router.cli`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ares_router.estimate import OutputEstimator
from ares_router.link_profile import DEFAULT_LINK, load_profiles
from ares_router.policy import DEFAULT_HOLD_MAX_WAIT_S, POLICIES, Admission, LoadModel
from ares_router.policy.gate import RebalanceLimits

ROUTER_POLICIES = tuple(name for name in POLICIES if not POLICIES[name]().needs_true_lengths)


@dataclass
class RouterConfig:
    """Everything the router process needs; defaults work for a local cluster."""

    prefill: list[tuple[str, int | None]]  # (url, bootstrap port)
    decode: list[str]
    policy: str = "ares"
    host: str = "127.0.0.1"
    port: int = 30000
    poll_interval_s: float = 0.1
    poll_timeout_s: float = 2.0
    stale_after_s: float = 10.0  # no successful poll for this long: not chosen (a stuck poller, a hung server)
    health_failure_threshold: int = 3  # failed polls in a row before a server is unhealthy (refused: at once)
    ares_state_reprobe_s: float = 30.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float | None = None  # None: no limit (long generations are legitimate)
    retries: int = 1  # extra attempts on another instance when a backend fails before the first token
    seed: int | None = None
    load_model: LoadModel = field(default_factory=LoadModel)
    admission: Admission = field(default_factory=Admission)  # SGLang's decode admission, --reserve-tokens
    estimator: OutputEstimator = field(default_factory=OutputEstimator)
    log_level: str = "info"
    access_log: bool = False
    # Aging of requests held at the router (*_hold policies; `policy.HoldRelease`): the simulator's default.
    hold_max_wait_s: float | None = DEFAULT_HOLD_MAX_WAIT_S
    rebalance: bool = False  # --ares-rebalance on: migrate running requests as the policy plans
    rebalance_interval_s: float = 1.0
    rebalance_policy: str | None = None  # whose `plan_rebalance` decides (None: the placement policy's)
    rebalance_limits: RebalanceLimits = field(default_factory=RebalanceLimits)
    migrate_max_stages: int = 6  # pre-copy stages of a migration before the pause
    migrate_last_stage_tokens: int = 32  # pause once at most this many KV positions are left to copy
    migrate_stage_delay_s: float = 0.0  # wait between pre-copy stages (tests widen the pre-copy window with it)
    migrate_link: str = DEFAULT_LINK  # link profile the rebalancing policy prices migrations with
    api_key: str | None = None  # clients' bearer token (`ares_router.auth`); None: open
    admin_api_key: str | None = None  # operators' (migrate, flush, pin); None: loopback clients only
    backend_admin_api_key: str | None = None  # the servers' SGLang --admin-api-key (None: `admin_api_key`)
    test_lose_replies: tuple[str, ...] = ()  # fault injection: migration commands whose answers are dropped
    workers: int = 1  # relay worker processes on the port, with one brain process (`ares_router.brain`); 1: one process
    brain_listen: str | None = None  # HOST:PORT where the brain takes relay workers of other hosts (TCP, brain_key)
    relay_of: str | None = None  # HOST:PORT of a brain: this process runs `workers` relay workers for it, no brain
    brain_key: str | None = None  # shared key of a brain and its relay workers over TCP

    @property
    def backend_headers(self) -> dict[str, str]:
        """What the router adds to its admin calls to the servers (migration commands, flushes)."""
        key = self.backend_admin_api_key or self.admin_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("the router needs at least one --prefill and one --decode server")
        if self.stale_after_s <= self.poll_interval_s:
            raise ValueError("--stale-after must be longer than --poll-interval")
        if self.health_failure_threshold < 1:
            raise ValueError("--health-failure-threshold must be >= 1")
        if self.retries < 0:
            raise ValueError("--retries must be >= 0")
        if self.workers < (0 if self.brain_listen else 1):
            raise ValueError("--workers must be >= 1 (0 only with --brain-listen: a brain whose relays are elsewhere)")
        if (self.brain_listen or self.relay_of) and not self.brain_key:
            raise ValueError("--brain-listen and --relay-of need --brain-key (the brain and its relays share it)")
        if self.brain_listen and self.relay_of:
            raise ValueError("--brain-listen (a brain) and --relay-of (relays of another brain) exclude each other")
        if self.admission.reserve_tokens < 0:
            raise ValueError("--reserve-tokens must be >= 0")
        if self.migrate_link not in (known := load_profiles()):
            known_names = ", ".join(sorted(known))
            raise ValueError(f"unknown --ares-migrate-link {self.migrate_link!r}; choose from {known_names}")
        for policy in (self.policy, self.rebalance_policy or self.policy):
            if policy not in ROUTER_POLICIES:
                raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(ROUTER_POLICIES)}")
