"""Shared fixtures: prepared models and real local PD clusters (127.0.0.1 only, stopped by PID); third-party data.

A test that needs third-party data under `$ARES_DATA_DIR` is marked `@pytest.mark.needs_data("traces/...")`: it
skips with a reason naming the variable and the missing file, or fails instead when `ARES_REQUIRE_DATA=1` (CI), so
nothing silently skips there. Data found missing deeper down (`ares.shared_data.MissingDataError`) is treated alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import pytest
from http_helpers import request

from ares.cluster import Cluster, ClusterSpec
from ares.cluster.router_proc import RouterProcess, is_sglang, policy_router
from ares.models import prepare_model
from ares.shared_data import ENV, MissingDataError, data_root

# The shared ARES servers' SGLang `--admin-api-key` (their migration command endpoint wants it) and
# `--num-reserved-decode-tokens` (small, so that KV, not SGLang's per-request reserve, is what fills a pool).
SERVER_KEY = "server-admin-key"
SERVER_RESERVE = 64
SERVER_IDLE_TTL_S = 15


def _missing_data(reason: str) -> BaseException:
    """The outcome of a test whose data is missing: a skip naming it, or a failure under ARES_REQUIRE_DATA=1."""
    if os.environ.get("ARES_REQUIRE_DATA") == "1":
        return pytest.fail.Exception(f"{reason} (ARES_REQUIRE_DATA=1: missing data fails, never skips)", pytrace=False)
    return pytest.skip.Exception(reason, _use_item_location=True)  # reported at the test, not inside pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_data(*paths): third-party files under $ARES_DATA_DIR the test reads")
    config.addinivalue_line(
        "markers", "kills_a_server: SIGKILLs one of the session's shared servers (runs after every other test)"
    )


# The session's shared server sets (fixture name -> running cluster), and the test after which each is no longer
# needed: a set is stopped right after its last user (`pytest_runtest_teardown`), not at the end of the session.
# Seven SGLang servers resident at once take ~20 GB of a 24 GB machine; the tiny set's users run first, so the
# SmolLM2 set never shares the machine with it.
_SHARED: dict[str, Cluster] = {}
_LAST_USER: dict[str, str] = {}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the last user is one that runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order: the modules on the tiny servers first, then the rest; within each, tests that kill a shared decode
    server last, in their collected order (stable sort): the shared cluster cannot bring a killed server back as it
    was (its KV, its Mooncake registration), so no later test may meet a dead one."""
    tiny_modules = {item.module for item in items if "tiny_servers" in getattr(item, "fixturenames", ())}
    items.sort(
        key=lambda item: (
            getattr(item, "module", None) not in tiny_modules,
            item.get_closest_marker("kills_a_server") is not None,
        )
    )
    _LAST_USER.clear()
    for name in ("tiny_servers", "ares_servers"):
        users = [item.nodeid for item in items if name in getattr(item, "fixturenames", ())]
        if users:
            _LAST_USER[name] = users[-1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield  # the test's own fixtures (a module's routers) are gone first
    for name, last in _LAST_USER.items():
        if item.nodeid == last and name in _SHARED:
            _SHARED.pop(name).stop()


def _as_missing_data(outcome) -> None:
    if outcome.excinfo is not None and isinstance(outcome.excinfo[1], MissingDataError):
        outcome.force_exception(_missing_data(str(outcome.excinfo[1])))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    for mark in item.iter_markers("needs_data"):
        for rel in mark.args:
            if not (data_root() / rel).exists():
                raise _missing_data(f"needs {rel} under ${ENV} (now {data_root()}), not found")
    _as_missing_data((yield))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    _as_missing_data((yield))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random Llama (real SmolLM2 tokenizer), built once into the cache."""
    return prepare_model("tiny")


@contextmanager
def running_cluster(tmp_dir: Path, **spec_kwargs) -> Iterator[Cluster]:
    """A started cluster, stopped when the block ends, also on failure; logs printed if startup fails."""
    cluster = Cluster(ClusterSpec(**spec_kwargs), log_dir=tmp_dir / "logs")
    with cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Plain SGLang PD servers on the tiny model (no `--ares`): 1 prefill + 2 decode, no router of their own, started
    once for the modules that test serving itself (`pd_cluster`, `test_router_e2e`)."""
    cluster = Cluster(
        ClusterSpec(model_path=str(tiny_model), n_prefill=1, n_decode=2, max_total_tokens=4096, start_router=False),
        log_dir=tmp_path_factory.mktemp("tiny-servers") / "logs",
    )
    yield from _shared("tiny_servers", cluster)


def _shared(name: str, cluster: Cluster) -> Iterator[Cluster]:
    """Start `cluster` as shared set `name`, yield it, stop it at the end unless its last user's teardown did."""
    _SHARED[name] = cluster
    try:
        cluster.start()
        yield cluster
    finally:
        if _SHARED.pop(name, None) is not None:
            cluster.stop()


@pytest.fixture(scope="module")
def pd_cluster(tiny_servers: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    """1 prefill + 1 decode of the tiny servers behind SGLang's own PD router, for one test module."""
    with routed(tiny_servers, tmp_path_factory.mktemp("pd-router"), "sglang_round_robin", n_decode=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ares_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The suite's one cluster of real ARES servers, started once: SmolLM2-135M (its length head ships with ARES),
    1 prefill + 3 `--ares` decode servers (Mooncake TCP on loopback) with SGLang's `--admin-api-key SERVER_KEY`,
    per-token predictions in the responses and a small reserve. No router of its own: each module puts the routers
    it needs in front (`routed`, `router_over`), which start in seconds where a cluster takes a minute or more.
    A target frees an incoming migration no command touched for `SERVER_IDLE_TTL_S` (60 s by default), so the test
    of a router dying mid-migration waits that long, not a minute."""
    cluster = Cluster(
        ClusterSpec(
            model_path=str(prepare_model("smollm2")),
            n_prefill=1,
            n_decode=3,
            ares=True,
            ares_args=("--ares-return-predictions",),
            max_total_tokens=8192,
            router="ares",
            start_router=False,
            extra_server_args=("--num-reserved-decode-tokens", str(SERVER_RESERVE), "--admin-api-key", SERVER_KEY),
        ),
        log_dir=tmp_path_factory.mktemp("ares-servers") / "logs",
    )
    with patch.dict(os.environ, {"ARES_MIGRATE_IDLE_TTL_S": str(SERVER_IDLE_TTL_S)}):  # the servers' environment
        shared = _shared("ares_servers", cluster)
        started = next(shared)
    yield started
    yield from shared  # stops it (unless its last user's teardown already did)


def greedy_body(prompt: list[int], max_new_tokens: int) -> dict:
    """A `/generate` body: greedy, exactly `max_new_tokens` new tokens (EOS ignored)."""
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    }


PROMPT = list(range(300, 360))  # the migration tests' prompt
REF_LENGTHS = (40, 60, 100, 120, 150, 200, 300, 400)  # the max_new_tokens of its references (`refs`)


@pytest.fixture(scope="session")
def refs(ares_servers: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """The unmigrated greedy `/generate` answer to `PROMPT` at every length the migration tests use, computed once a
    session, all at once (one batch across the shared servers) rather than one by one before each test. Tests
    change what they compare, so each takes a copy."""
    with (
        router_over(tmp_path_factory.mktemp("refs-router"), ares_servers, ares_servers.decode_urls, "round_robin") as r,
        ThreadPoolExecutor(len(REF_LENGTHS)) as pool,
    ):
        answers = pool.map(lambda n: request(r.url + "/generate", greedy_body(PROMPT, n), timeout=600), REF_LENGTHS)
        out = {}
        for n, (status, _, raw) in zip(REF_LENGTHS, answers, strict=True):
            assert status == 200, raw[:300]
            out[n] = json.loads(raw)
        return out


def prefills(cluster: Cluster) -> list[tuple[str, int]]:
    """(URL, bootstrap port) of every prefill server of `cluster`."""
    return [(p["url"], p["bootstrap_port"]) for p in cluster.state()["processes"] if p["role"] == "prefill"]


@contextmanager
def router_over(
    log_dir: Path, cluster: Cluster, decode_urls: list[str], policy: str, *extra: str
) -> Iterator[RouterProcess]:
    """A router with `policy` over `cluster`'s prefill servers and `decode_urls`, stopped by PID at exit. An ARES
    router gets the servers' admin key for its migration commands (a test that wants it without passes its own
    router flags to `policy_router`)."""
    key = () if is_sglang(policy) else ("--backend-admin-api-key", SERVER_KEY)
    with policy_router(log_dir, prefills(cluster), decode_urls, policy, *key, *extra) as router:
        yield router


@dataclass
class Routed:
    """What a test module sees of the shared servers: their first `n_decode` decode servers behind a router of its
    own (`router_url`), with the `Cluster` calls the tests make (`decode_urls`, `state`, `pids`, `log_dir`)."""

    servers: Cluster
    router: RouterProcess
    n_decode: int

    @property
    def decode_urls(self) -> list[str]:
        return self.servers.decode_urls[: self.n_decode]

    @property
    def router_url(self) -> str:
        return self.router.url

    @property
    def log_dir(self) -> Path:
        return self.servers.log_dir

    @property
    def pids(self) -> dict[str, int]:
        return self.servers.pids

    def state(self) -> dict:
        """The shared cluster's state, its processes limited to the prefill servers and this view's decode ones."""
        names = {f"decode{i}" for i in range(self.n_decode)}
        st = self.servers.state()
        st["processes"] = [p for p in st["processes"] if p["role"] == "prefill" or p["name"] in names]
        return st


@contextmanager
def routed(servers: Cluster, log_dir: Path, policy: str, *extra: str, n_decode: int | None = None) -> Iterator[Routed]:
    """The shared servers (the first `n_decode` decode servers, default all) behind a fresh router with `policy`."""
    n = len(servers.decode_urls) if n_decode is None else n_decode
    with router_over(log_dir, servers, servers.decode_urls[:n], policy, *extra) as router:
        yield Routed(servers, router, n)
