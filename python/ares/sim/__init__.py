"""Discrete-event PD cluster simulator; decisions come from `ares_router.policy`."""

from .bounds import POOLED_BOUND, pooled_config
from .cost_model import PRESETS, CostModel, get_cost_model, roofline
from .engine import ClusterSim, SimConfig, SimResult, simulate
from .gaps import GapHistogram
from .metrics import SLO, SLO_PAIRS, request_latencies, slo_pairs, summarize
from .predictor_model import ErrorModel, load_error_model

__all__ = [
    "POOLED_BOUND",
    "PRESETS",
    "SLO",
    "SLO_PAIRS",
    "ClusterSim",
    "CostModel",
    "ErrorModel",
    "GapHistogram",
    "SimConfig",
    "SimResult",
    "get_cost_model",
    "load_error_model",
    "pooled_config",
    "request_latencies",
    "roofline",
    "simulate",
    "slo_pairs",
    "summarize",
]
