"""What a local PD cluster consists of, and the exact command line of each process (pure: no I/O)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

HOST = "127.0.0.1"
ROUTERS = ("sglang", "ares")
# Each router's own default policy: SGLang's PD router keeps round robin; the ARES router places by predicted load.
DEFAULT_ROUTER_POLICY = {"sglang": "round_robin", "ares": "ares"}
# `--policy` choices of sglang_router 0.3.2's launcher (pinned in pyproject.toml).
SGLANG_ROUTER_POLICIES = ("random", "round_robin", "cache_aware", "power_of_two", "manual")


@dataclass(frozen=True)
class ServerSpec:
    """One process of the cluster: its role, where it listens, and how it is started."""

    role: str  # "prefill" | "decode" | "router"
    index: int
    port: int
    argv: tuple[str, ...]
    bootstrap_port: int | None = None  # prefill only: Mooncake bootstrap server

    @property
    def name(self) -> str:
        return self.role if self.role == "router" else f"{self.role}{self.index}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass(frozen=True)
class ClusterSpec:
    """A local cluster: `n_prefill` prefill and `n_decode` decode SGLang servers behind one PD router."""

    model_path: str
    n_prefill: int = 1
    n_decode: int = 2
    ares: bool = False  # start decode servers with --ares
    ares_decodes: tuple[int, ...] | None = None  # with `ares`: only these decode indices (None: all of them)
    ares_args: tuple[str, ...] = ()  # more `--ares-*` flags for the ARES decode servers
    device: str = "cpu"
    max_total_tokens: int = 8192  # KV pool per server (CPU mode would size it from RAM otherwise)
    router: str = "sglang"  # "sglang": SGLang's PD router (sglang_router) | "ares": the ARES router (ares_router)
    router_policy: str | None = None  # None: the router's own default (DEFAULT_ROUTER_POLICY); resolved on creation
    extra_server_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()  # more flags for the router
    start_router: bool = True  # False: SGLang servers only (a benchmark starts its own routers, one per policy)
    python: str = field(default=sys.executable)

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be 'sglang' or 'ares', got {self.router!r}")
        if self.router_policy is None:
            object.__setattr__(self, "router_policy", DEFAULT_ROUTER_POLICY[self.router])
        choices = router_policies(self.router)
        if self.router_policy not in choices:
            raise ValueError(
                f"policy {self.router_policy!r} is not one of the {self.router} router's: {', '.join(choices)}"
            )

    @property
    def n_ports(self) -> int:
        """Ports the cluster listens on: prefill HTTP + bootstrap, decode, the router if started."""
        return 2 * self.n_prefill + self.n_decode + int(self.start_router)

    def servers(self, ports: list[int]) -> list[ServerSpec]:
        """All processes, given `n_ports` free ports (prefill HTTP+bootstrap, decode, router)."""
        need = self.n_ports
        if len(ports) != need:
            raise ValueError(f"need {need} ports, got {len(ports)}")
        if self.n_prefill < 1 or self.n_decode < 1:
            raise ValueError("a PD cluster needs at least one prefill and one decode server")
        it = iter(ports)
        out: list[ServerSpec] = []
        for i in range(self.n_prefill):
            port, boot = next(it), next(it)
            out.append(ServerSpec("prefill", i, port, self._server_argv(port, "prefill", boot), bootstrap_port=boot))
        for i in range(self.n_decode):
            port = next(it)
            ares = self.ares and (self.ares_decodes is None or i in self.ares_decodes)
            out.append(ServerSpec("decode", i, port, self._server_argv(port, "decode", ares=ares)))
        if self.start_router:
            router_port = next(it)
            out.append(ServerSpec("router", 0, router_port, self._router_argv(router_port, out)))
        return out

    def _server_argv(
        self, port: int, mode: str, bootstrap_port: int | None = None, ares: bool = False
    ) -> tuple[str, ...]:
        argv = [
            self.python,
            "-m",
            "sglang.launch_server",
            "--model-path",
            self.model_path,
            "--host",
            HOST,
            "--port",
            str(port),
            "--device",
            self.device,
            "--max-total-tokens",
            str(self.max_total_tokens),
            "--disaggregation-mode",
            mode,
            # Mooncake with its TCP transport: no RDMA device needed, loopback only.
            "--disaggregation-transfer-backend",
            "mooncake_tcp",
        ]
        if bootstrap_port is not None:
            argv += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
        if self.device == "cpu":
            # An idle scheduler otherwise polls its sockets in a busy loop: on a few cores, every idle server of the
            # cluster would take CPU from the one that decodes. SGLang's own idle sleeper wakes on a new request.
            argv.append("--sleep-on-idle")
        if ares:
            argv += ["--ares", *self.ares_args]
        return tuple(argv) + self.extra_server_args

    def _router_argv(self, port: int, servers: list[ServerSpec]) -> tuple[str, ...]:
        module = ["ares_router"] if self.router == "ares" else ["sglang_router.launch_router", "--pd-disaggregation"]
        argv = [
            self.python,
            "-m",
            *module,
            "--host",
            HOST,
            "--port",
            str(port),
            "--policy",
            self.router_policy,
        ]
        for s in servers:
            if s.role == "prefill":
                argv += ["--prefill", s.url, str(s.bootstrap_port)]
            elif s.role == "decode":
                argv += ["--decode", s.url]
        return tuple(argv) + self.router_args


def router_policies(router: str) -> tuple[str, ...]:
    """The placement policies `router` accepts."""
    if router == "ares":
        from ares_router.config import ROUTER_POLICIES  # the router's registry is the authority

        return ROUTER_POLICIES
    return SGLANG_ROUTER_POLICIES
