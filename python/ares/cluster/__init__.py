"""Local PD cluster launcher: real SGLang prefill/decode servers plus a router, on 127.0.0.1 only."""

from ares.cluster.launcher import Cluster, ClusterError, load_state, stop_state
from ares.cluster.spec import ClusterSpec, ServerSpec

__all__ = ["Cluster", "ClusterError", "ClusterSpec", "ServerSpec", "load_state", "stop_state"]
