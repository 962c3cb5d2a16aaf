"""Discrete-event PD cluster simulator; decisions come from `ares_router.policy`."""

from .cost_model import PRESETS, CostModel, get_cost_model, roofline
from .engine import ClusterSim, SimConfig, SimResult, simulate
from .metrics import SLO, request_latencies, summarize
from .predictor_model import ErrorModel, load_error_model

__all__ = [
    "PRESETS",
    "SLO",
    "ClusterSim",
    "CostModel",
    "ErrorModel",
    "SimConfig",
    "SimResult",
    "get_cost_model",
    "load_error_model",
    "request_latencies",
    "roofline",
    "simulate",
    "summarize",
]
