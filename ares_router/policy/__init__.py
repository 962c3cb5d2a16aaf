"""The ARES brain: decode placement and rebalancing as pure functions of a cluster snapshot.

Used by both the live router (which polls real servers) and the simulator (`ares.sim`, which models them), so a
policy measured at 256 simulated instances is exactly the code that runs live, fed exactly the same way. No I/O, no
clocks, no globals, no hidden RNG: randomness comes from the caller's generator.

Shape (after Llumnix's global scheduler), one module per concern:

- `admission`  SGLang 0.5.23's decode admission rule (`Admission`), cited line by line; the one copy everyone uses.
- `load_model` predicted KV demand over a horizon (`LoadModel`) and migration cost (`MigrationCost`).
- `snapshot`   the data: `InstanceState` (columns), `ClusterSnapshot` + `build_snapshot` (aggregates), `NewRequest`,
               `Migration`.
- `assemble`   the one snapshot assembler: a server's report (`DecodeLoad`) + the caller's bookkeeping (`OwnRows`)
               -> `InstanceState`; and `new_request`, the one output estimate at dispatch (`OutputEstimator`).
- `dispatch`   admission filter -> placement policies (`DISPATCHERS`), one `dispatch` method each.
- `rebalance`  filter -> pair -> choose request (`Rebalancer` and its parts; `REBALANCERS`).
- `defrag`     defragmenting moves: make one instance admit the request held longest (`Defragmenter`).
- `gate`       which proposed migrations start (`RebalanceGate`, `RebalanceLimits`): limits, cooldowns,
               confirmation rounds, back-off; fed each move's end.
- `hold`       which requests held at the router go now (`HoldRelease`: first fit, with aging).
- `registry`   named policies (`POLICIES`: a dispatcher and a rebalancer), `place` and `plan_rebalance`.
"""

from ares_router.policy.admission import (
    ADMISSION_MODES,
    CLIP_MAX_NEW_TOKENS,
    DEFAULT_RESERVE_TOKENS,
    Admission,
    KVForecast,
    planned_remaining,
)
from ares_router.policy.assemble import (
    NO_OWN_ROWS,
    DecodeLoad,
    OwnRows,
    ReportedRequest,
    admission_mode,
    assemble_instance,
    new_request,
)
from ares_router.policy.defrag import Defragmenter
from ares_router.policy.dispatch import (
    DISPATCHERS,
    LeastKVDispatch,
    PredictedPeakDispatch,
    RandomDispatch,
    RoundRobinDispatch,
    eligible,
)
from ares_router.policy.gate import RebalanceGate, RebalanceLimits, reason_class
from ares_router.policy.hold import DEFAULT_HOLD_MAX_WAIT_S, HoldRelease, max_wait_arg
from ares_router.policy.load_model import LoadModel, MigrationCost
from ares_router.policy.rebalance import (
    REBALANCERS,
    HalfGapChooser,
    LeastLoadedTargets,
    LoadThresholds,
    NoRebalance,
    PeakGainChooser,
    Rebalancer,
)
from ares_router.policy.registry import POLICIES, Policy, get_policy, holds, place, plan_rebalance
from ares_router.policy.snapshot import (
    ClusterSnapshot,
    InstanceState,
    Migration,
    NewRequest,
    NoHealthyInstance,
    build_snapshot,
)

__all__ = [
    "ADMISSION_MODES",
    "CLIP_MAX_NEW_TOKENS",
    "DEFAULT_HOLD_MAX_WAIT_S",
    "DEFAULT_RESERVE_TOKENS",
    "DISPATCHERS",
    "NO_OWN_ROWS",
    "POLICIES",
    "REBALANCERS",
    "Admission",
    "ClusterSnapshot",
    "DecodeLoad",
    "Defragmenter",
    "HalfGapChooser",
    "HoldRelease",
    "InstanceState",
    "KVForecast",
    "LeastKVDispatch",
    "LeastLoadedTargets",
    "LoadModel",
    "LoadThresholds",
    "Migration",
    "MigrationCost",
    "NewRequest",
    "NoHealthyInstance",
    "NoRebalance",
    "OwnRows",
    "PeakGainChooser",
    "Policy",
    "PredictedPeakDispatch",
    "RandomDispatch",
    "Rebalancer",
    "RebalanceGate",
    "RebalanceLimits",
    "ReportedRequest",
    "RoundRobinDispatch",
    "admission_mode",
    "assemble_instance",
    "build_snapshot",
    "eligible",
    "get_policy",
    "holds",
    "max_wait_arg",
    "new_request",
    "place",
    "planned_remaining",
    "reason_class",
    "plan_rebalance",
]
