"""Trace readers and the ServeGen R1 sampler, read in place from the shared data folder."""

from __future__ import annotations

import numpy as np
import pytest

from ares.workloads import load_workload, renewal_arrivals, rescale_to_rate
from ares.workloads.servegen import r1_arrival_times, servegen_r1

pytestmark = pytest.mark.needs_data("traces")


@pytest.mark.parametrize(("rate", "duration", "seed"), [(0.13, 1200.0, 0), (3.0, 600.0, 4), (0.5, 7200.0, 2)])
def test_the_packaged_arrival_process_draws_the_trace_folders_arrival_times(rate, duration, seed):
    assert np.array_equal(r1_arrival_times(rate, duration, seed), servegen_r1(rate, duration, seed).arrival_s)


def test_azure_and_mooncake_have_the_documented_sizes():
    az = load_workload("azure_conv", None, 1e9)
    mc = load_workload("mooncake_conv", None, 1e9)
    assert len(az) == 19_366 and len(mc) == 12_031
    assert az.output_tokens.mean() == pytest.approx(211, abs=2)
    assert mc.output_tokens.mean() == pytest.approx(343, abs=2)
    assert np.all(np.diff(az.arrival_s) >= 0) and az.arrival_s[0] == 0


def test_rate_scaling_compresses_time():
    az = load_workload("azure_conv", 50.0, 60.0)
    assert az.arrival_s.max() < 60.0 and 1500 < len(az) < 4500  # local rate varies around the mean
    t = rescale_to_rate(np.array([10.0, 11.0, 12.0]), 4.0)
    assert t.tolist() == [0.0, 0.375, 0.75]  # 3 requests over 2 s = 1.5 req/s -> 4 req/s


def test_r1_sampler_rate_seed_and_lengths():
    a = load_workload("r1", 5.0, 1200.0, seed=3)
    b = load_workload("r1", 5.0, 1200.0, seed=3)
    c = load_workload("r1", 5.0, 1200.0, seed=4)
    assert len(a) == 6000 and a.arrival_s.max() < 1200.0
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.output_tokens, b.output_tokens)
    assert not np.array_equal(a.output_tokens, c.output_tokens)
    # long-output reasoning: mean output around 1.1-1.6k, p99 in the ten thousands, max 32k
    assert 900 < a.output_tokens.mean() < 2000 and np.percentile(a.output_tokens, 99) > 5000
    assert a.output_tokens.max() <= 32768 and a.prompt_tokens.min() >= 1


def test_sharegpt_poisson_and_gamma_arrivals():
    w = load_workload("sharegpt", 20.0, 500.0, seed=0)
    assert len(w) == pytest.approx(10_000, rel=0.05) and w.output_tokens.max() <= 1024
    rng = np.random.default_rng(0)
    gaps = np.diff(renewal_arrivals(rng, 10.0, 2000.0, cv=3.0))
    assert gaps.mean() == pytest.approx(0.1, rel=0.1) and gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
