"""How the hidden-state head and the best prompt-only proxy improve with more training requests.

Both are trained on nested random subsets of the training prompts (same split, same validation and test prompts as
`benchmark/predictor_accuracy.py`) and scored on the full test set. The question it answers: is the gap to the
paper's -49.42% a matter of data (the reduction grows with requests) or not (it stays flat)?

    python benchmark/predictor_learning_curve.py [--fractions 0.25 0.5 0.75 1] [--seeds 0 1] [--max-seconds 60]

Writes benchmark/results/predictor_learning_curve.{json,md,png}. Needs the collected generations and their hidden
states (`ares predictor collect`), like the accuracy benchmark.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from provenance import record
from tqdm import tqdm

from ares.predictor.features import PointSet
from ares.predictor.head import HeadConfig
from ares.predictor.pipeline import fit_prompt_state_proxy, head_configs, load_data, prompt_state_proxy_remaining
from ares.predictor.train import TrainConfig, predict, train_head

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.4942


def subset(ps: PointSet, keep: np.ndarray) -> PointSet:
    """The points of the requests whose index is in `keep` (request indices renumbered)."""
    keep = np.sort(keep)
    mask = np.isin(ps.request, keep)
    return PointSet(
        [ps.ids[i] for i in keep],
        [ps.sources[i] for i in keep],
        np.searchsorted(keep, ps.request[mask]).astype(np.int32),
        ps.position[mask],
        ps.length[mask],
        ps.prompt_len[mask],
        {k: v[mask] for k, v in ps.hidden.items()},
    )


def run_point(tr: PointSet, va: PointSet, te: PointSet, ours_cfg: HeadConfig, tc: TrainConfig) -> dict[str, float]:
    """Test MAE of ours and of the prompt-state proxy, both trained on `tr`."""
    head, _ = train_head(
        ours_cfg,
        (tr.hidden[ours_cfg.layer], tr.extra, tr.remaining),
        (va.hidden[ours_cfg.layer], va.extra, va.remaining),
        tc,
        lambda *_: None,
    )
    ours = predict(head, te.hidden[ours_cfg.layer], te.extra)[0]
    # The best proxy of the accuracy benchmark, trained the same way.
    proxy_rem = prompt_state_proxy_remaining(fit_prompt_state_proxy(tr, va, tc.seed, tc.threads), te)
    true = te.remaining
    return {"ours": float(np.abs(ours - true).mean()), "proxy": float(np.abs(proxy_rem - true).mean())}


def write_report(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predictor_learning_curve.json").write_text(json.dumps(res, indent=1) + "\n")
    rows = res["points"]
    lines = [
        f"Test: {res['n_test_requests']} held-out prompts, {res['n_test_points']} points; mean over seeds "
        f"{res['seeds']}. Command: `{res['command']}`",
        "",
        "| train requests | ours MAE | proxy MAE | reduction (target 49.42%) |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['train_requests']} | {r['ours']:.1f} | {r['proxy']:.1f} | {100 * r['reduction']:.1f}% |")
    (RESULTS / "predictor_learning_curve.md").write_text("\n".join(lines) + "\n")
    n = [r["train_requests"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, [r["ours"] for r in rows], "o-", label="ours (hidden-state head)")
    a.plot(n, [r["proxy"] for r in rows], "s-", label="best prompt-only proxy")
    a.set_xlabel("training requests (EOS-ended)")
    a.set_ylabel("test MAE (tokens)")
    a.legend()
    b.plot(n, [100 * r["reduction"] for r in rows], "o-")
    b.axhline(100 * TARGET, color="gray", ls="--", label="paper: 49.42%")
    b.set_xlabel("training requests (EOS-ended)")
    b.set_ylabel("MAE reduction vs proxy (%)")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "predictor_learning_curve.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-seconds", type=float, default=60.0, help="training budget per head")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-cap", type=int, default=256, help="points per training request (as in training)")
    args = ap.parse_args()
    data = load_data(train_cap=args.train_cap)
    tr, va, te = (data.points[s] for s in ("train", "val", "test"))
    mid = next(k for k in data.layers if k != "final_norm")
    ours_cfg = head_configs(tr.hidden["final_norm"].shape[1], mid)["ours"]
    points = []
    jobs = [(f, s) for f in sorted(args.fractions) for s in args.seeds]
    by_fraction: dict[float, list[dict]] = {}
    for frac, seed in tqdm(jobs, desc="learning curve", unit="fit"):
        # Nested subsets: one permutation per seed, the first `frac` of it.
        order = np.random.default_rng(seed).permutation(len(tr.ids))
        keep = order[: max(2, round(frac * len(order)))]
        tc = TrainConfig(seed=seed, threads=args.threads, max_seconds=args.max_seconds)
        r = run_point(subset(tr, keep), va, te, ours_cfg, tc)
        by_fraction.setdefault(frac, []).append({**r, "train_requests": len(keep)})
    for frac, runs in sorted(by_fraction.items()):
        ours = float(np.mean([r["ours"] for r in runs]))
        proxy = float(np.mean([r["proxy"] for r in runs]))
        points.append(
            {
                "fraction": frac,
                "train_requests": runs[0]["train_requests"],
                "ours": ours,
                "proxy": proxy,
                "reduction": 1 - ours / proxy,
                "runs": runs,
            }
        )
    cmd = "python benchmark/predictor_learning_curve.py " + " ".join(
        [f"--fractions {' '.join(map(str, args.fractions))}", f"--seeds {' '.join(map(str, args.seeds))}"]
        + [f"--max-seconds {args.max_seconds:g}", f"--threads {args.threads}", f"--train-cap {args.train_cap}"]
    )
    res = {
        "command": cmd,
        "seeds": args.seeds,
        "n_test_requests": len(te.ids),
        "n_test_points": len(te),
        "n_val_requests": len(va.ids),
        "points": points,
        "provenance": record(RESULTS.parent.parent),
    }
    write_report(res)
    for p in points:
        print(f"{p['train_requests']:5d} train requests: ours {p['ours']:.1f} proxy {p['proxy']:.1f} "
              f"reduction {100 * p['reduction']:.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
