"""The map's regime knobs (`ares.sim.regimes`): concurrency through KV per token, dispersion through a length map."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ares.sim.cost_model import get_cost_model
from ares.sim.metrics import full_kv_step
from ares.sim.regimes import MAX_OUTPUT_TOKENS, OutputSpread, cv, mean_footprint, with_concurrency
from ares.sim.sweep import RunSpec, capacity_rate
from ares.workloads import Workload, load_workload


def _work(out: list[int], prompt: int = 100) -> Workload:
    n = len(out)
    return Workload("t", np.arange(n, dtype=float), np.full(n, prompt, dtype=np.int64), np.array(out, dtype=np.int64))


def test_concurrency_scales_capacity_and_keeps_the_full_step_and_a_full_instance_bytes():
    cost = get_cost_model("h100-llama2-7b")
    work = _work([100, 300])  # footprints 200 and 400: mean 300
    assert mean_footprint(work) == 300
    c = with_concurrency(cost, mean_footprint(work), 5)
    assert c.kv_capacity_tokens == 1500
    assert full_kv_step(c) == pytest.approx(full_kv_step(cost), rel=1e-12)
    full_bytes = cost.kv_capacity_tokens * cost.kv_bytes_per_token
    assert c.kv_capacity_tokens * c.kv_bytes_per_token == pytest.approx(full_bytes, rel=1e-12)
    assert c.step_time(1, 0) == cost.step_time(1, 0)  # only the per-KV-token term changes
    with pytest.raises(ValueError, match="positive"):
        with_concurrency(cost, 300, 0)


def test_a_length_map_by_hand():
    spread = OutputSpread(power=2.0, scale=0.5, target_cv=1.0)
    assert spread.lengths(np.array([1, 2, 4, 8, 1000])).tolist() == [1, 2, 8, 32, MAX_OUTPUT_TOKENS]  # 0.5 -> 1
    work = spread.apply(_work([2, 4]))
    assert work.output_tokens.tolist() == [2, 8] and work.prompt_tokens.tolist() == [100, 100]


@pytest.mark.parametrize("target", [0.3, 1.0, 2.5])
def test_the_fitted_map_hits_the_cv_keeps_the_mean_and_the_order(target):
    work = load_workload("r1", 5.0, 1800, seed=3)
    spread = OutputSpread.fit(work, target)
    out = spread.lengths(work.output_tokens)
    assert cv(out) == pytest.approx(target, rel=0.02)
    assert out.mean() == pytest.approx(work.output_tokens.mean(), rel=0.05)  # the 32k clip costs a little at CV 2.5
    order = np.argsort(work.output_tokens, kind="stable")
    assert np.all(np.diff(out[order]) >= 0)  # longer stays longer
    assert (spread.power < 1) == (target < cv(work.output_tokens))


def test_an_unreachable_cv_and_equal_lengths_are_refused():
    with pytest.raises(ValueError, match="out of reach"):
        OutputSpread.fit(_work([100, 110, 120]), 20.0)
    with pytest.raises(ValueError, match="all equal"):
        OutputSpread.fit(_work([7, 7, 7]), 1.0)


def test_a_run_spec_applies_the_map_to_every_sample():
    spec = RunSpec("r1", 600.0, seed=1)
    native = load_workload("r1", None, 3600.0, seed=1)
    wide = dataclasses.replace(spec, output_spread=OutputSpread.fit(native, 2.5))
    a, b = spec.workload_at(2.0), wide.workload_at(2.0)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert np.array_equal(b.output_tokens, wide.output_spread.lengths(a.output_tokens))
    assert cv(b.output_tokens) > cv(a.output_tokens)
    assert capacity_rate(wide) != capacity_rate(spec)  # the Little's-law estimate sees the mapped lengths


@pytest.mark.needs_data("traces/servegen/deepseek-r1")  # the script reads the trace in its own process
def test_the_map_script_writes_its_tables_and_resumes_from_its_cache(tmp_path):
    """`benchmark/sim_map.py` cut down to 2 cells x 2 policies x 2 seeds: the table has both ratios, the heatmaps
    exist, and a second run with the same settings reads every search from the cache instead of simulating."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable, str(root / "benchmark" / "sim_map.py"), "--concurrency", "5", "--cv", "native,1.0",
        "--policy", "round_robin,least_kv,ares", "--seeds", "2", "--duration", "120", "--resolution", "0.2",
        "--loads", "0.9", "--slos", "tpot_1.25x", "--out", str(tmp_path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=root, capture_output=True, timeout=600)
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 * 2 + 2 * 3 * 2  # searches, then fixed-load runs (cells x policies x seeds each)
    doc = json.loads((tmp_path / "sim_map.json").read_text())
    assert [c["cv"] for c in doc["cells"]] == [None, 1.0] and doc["cells"][1]["cv_measured"] == pytest.approx(1, 0.02)
    assert set(doc["cells"][0]["ratios"]) == {"ares/least_kv", "ares/round_robin"}
    at_load = doc["cells"][0]["load_summary"]["0.9"]
    assert at_load["ratios"]["ares/least_kv"]["good_rps"]["seeds"] == 2  # paired over both seeds
    assert doc["cells"][0]["slo_fluid_bound"]["tpot_1.25x"]["rate"] <= doc["cells"][0]["fluid_bound"]["rate"] * 1.01
    assert "| 5 | 1 (1.00) |" in (tmp_path / "sim_map.md").read_text()
    assert (tmp_path / "sim_map_ares_vs_least_kv.png").stat().st_size > 0
    again = subprocess.run(cmd, check=True, cwd=root, capture_output=True, text=True, timeout=600)
    assert (tmp_path / "cache.jsonl").read_text().splitlines() == lines
    assert "goodput searches" not in again.stderr  # nothing left to search: no progress bar at all
