"""Shared fixtures: prepared models and real local PD clusters (127.0.0.1 only, stopped by PID)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ares.cluster import Cluster, ClusterSpec
from ares.models import prepare_model


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
