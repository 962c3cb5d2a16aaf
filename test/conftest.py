"""Shared fixtures: prepared models and real local PD clusters (127.0.0.1 only, stopped by PID); third-party data.

A test that needs third-party data under `$ARES_DATA_DIR` is marked `@pytest.mark.needs_data("traces/...")`: it
skips with a reason naming the variable and the missing file, or fails instead when `ARES_REQUIRE_DATA=1` (CI), so
nothing silently skips there. Data found missing deeper down (`ares.shared_data.MissingDataError`) is treated alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ares.cluster import Cluster, ClusterSpec
from ares.models import prepare_model
from ares.shared_data import ENV, MissingDataError, data_root


def _missing_data(reason: str) -> BaseException:
    """The outcome of a test whose data is missing: a skip naming it, or a failure under ARES_REQUIRE_DATA=1."""
    if os.environ.get("ARES_REQUIRE_DATA") == "1":
        return pytest.fail.Exception(f"{reason} (ARES_REQUIRE_DATA=1: missing data fails, never skips)", pytrace=False)
    return pytest.skip.Exception(reason, _use_item_location=True)  # reported at the test, not inside pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_data(*paths): third-party files under $ARES_DATA_DIR the test reads")


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


@pytest.fixture(scope="module")
def pd_cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """1 prefill + 1 decode + router on the tiny model, shared by one test module."""
    with running_cluster(
        tmp_path_factory.mktemp("cluster"), model_path=str(tiny_model), n_prefill=1, n_decode=1, max_total_tokens=4096
    ) as cluster:
        yield cluster
