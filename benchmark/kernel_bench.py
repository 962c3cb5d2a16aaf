"""GPU benchmark of the fused length-head kernel (ares_kernels) against torch, the HBM floor and a 7B decode step.

For every head shape (ours: H->256->64->2, log target, P90; paper: H->2048->512->64->1, linear target), hidden size H
and batch size bs, with random weights:

* time of the one-launch Triton kernel, the torch reference in eager mode and ``torch.compile`` of the reference
  (CUDA events around each call, L2 flushed before each call, median of ``--reps``);
* the bandwidth floor: bytes that must move (weights + hidden states + counters + outputs) / HBM bandwidth measured in
  the same run with a large device-to-device copy; reported as floor / kernel time (% of the floor reached);
* one decode step of a Qwen2-7B-shaped model (random bf16 weights, config written in code, no download) at the same
  batch sizes with a ``--ctx``-token KV context in a static (preallocated) cache: eager HF forward, and the same
  step replayed from a CUDA graph when capture works (SGLang decodes from CUDA graphs, so that is the denominator used
  for the target when available); the head's time as % of the step;
* correctness on the GPU: kernel vs reference, 20 back-to-back launches bit-identical, CUDA-graph replay identical.

Targets (printed pass/fail): head < 1% of the decode step at every bs >= 8; >= 50% of the bandwidth floor at bs >= 64.

Run from the repository root, no install needed (needs torch, triton, transformers):
    python benchmark/kernel_bench.py                           # -> benchmark/results/kernel_bench.{json,md}
    python benchmark/kernel_bench.py --bs 1 64 --hidden 3584 --reps 50 --no-model --no-compile
    python benchmark/kernel_bench.py --cpu-smoke --out /tmp/kb  # plumbing check without a GPU (Triton interpreter)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from provenance import commit_label

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmark" / "results"
SHAPES = {"ours": [256, 64], "paper": [2048, 512, 64]}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def import_project():
    """Import ``ares.predictor`` (python/) and ``ares_kernels`` (kernels/) from this working tree, not site-packages.

    ``kernels/`` is the package ``ares_kernels`` only through pyproject's package-dir mapping, so it is loaded by
    path under that name.
    """
    sys.path.insert(0, str(ROOT / "python"))
    spec = importlib.util.spec_from_file_location(
        "ares_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ares_kernels"] = module
    spec.loader.exec_module(module)
    from ares.predictor.head import HeadConfig, LengthHead

    return module, HeadConfig, LengthHead


def random_head(HeadConfig, LengthHead, shape: str, hidden: int, seed: int):
    """A head of the given shape with random weights; outputs mostly above the clamp so errors are meaningful."""
    import torch

    torch.manual_seed(seed)
    if shape == "ours":
        cfg = HeadConfig(
            hidden_size=hidden, hidden_dims=SHAPES["ours"], extra_features=["log_generated", "log_prompt_len"],
            target="log", quantiles=[0.9], activation="relu",
        )  # fmt: skip
    else:
        cfg = HeadConfig(hidden_size=hidden, hidden_dims=SHAPES["paper"], target="linear", scale=100.0)
    head = LengthHead(cfg)
    with torch.no_grad():
        head.in_mean.normal_(0.0, 0.1)
        head.in_std.uniform_(0.5, 2.0)
        last = [m for m in head.mlp if isinstance(m, torch.nn.Linear)][-1]
        last.bias.fill_(5.0 if cfg.target == "log" else 3.0)
    return head.eval()


class Timer:
    """Median time of one call in microseconds: CUDA events with an L2 flush before each call, or wall clock on CPU."""

    def __init__(self, device, reps: int, warmup: int):
        import torch

        self.torch, self.device, self.reps, self.warmup = torch, device, reps, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn, reps: int | None = None, flush: bool = True) -> float:
        torch, reps = self.torch, reps or self.reps
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
            return statistics.median(times)
        torch.cuda.synchronize()
        start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush:
                self.flush.zero_()  # cold L2: weights come from HBM, and the launch is queued behind this kernel
            start[i].record()
            fn()
            end[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(start, end, strict=True)) * 1e3


def measure_bandwidth(device, timer: Timer) -> float:
    """HBM bandwidth in bytes/s from a 1 GiB device-to-device copy (read + write)."""
    import torch

    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src), reps=20, flush=False)
    return 2 * n / (us * 1e-6)


def head_bytes(params, bs: int, hidden_dtype_size: int) -> int:
    """Bytes the head must move at least once: weights, biases, extra columns, hidden states, counters, outputs."""
    w = params.w_packed.numel() * params.w_packed.element_size()
    b = params.b_packed.numel() * 4 + params.w_extra.numel() * 4
    return w + b + bs * params.hidden_size * hidden_dtype_size + bs * 8 * 2 + bs * params.n_out * 4


def qwen2_7b_config(smoke: bool):
    from transformers import Qwen2Config

    if smoke:  # tiny: same code path, CPU-sized
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000)  # fmt: skip
    else:  # Qwen2-7B's shape
        dims = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064)  # fmt: skip
    return Qwen2Config(**dims, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False)


def build_model(config, device, dtype):
    """The model with random weights created directly on `device` in `dtype` (no download, no fp32 copy)."""
    import torch
    from transformers import Qwen2ForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()


class DecodeStep:
    """One single-token forward for `bs` requests at position `ctx` of a static KV cache; rewound every call, so every
    step costs the same (attention over ctx + 1 keys) and nothing grows."""

    def __init__(self, model, config, bs: int, ctx: int, device, dtype):
        import torch
        from transformers import StaticCache

        self.torch, self.model, self.ctx = torch, model, ctx
        try:
            self.cache = StaticCache(config=config, max_cache_len=ctx + 1)  # transformers >= 4.56: sized lazily
        except TypeError:
            self.cache = StaticCache(
                config=config, max_batch_size=bs, max_cache_len=ctx + 1, device=device, dtype=dtype
            )
        self.ids = torch.randint(0, config.vocab_size, (bs, 1), device=device)
        self.pos = torch.full((bs, 1), ctx, dtype=torch.long, device=device)
        self.cache_position = torch.tensor([ctx], dtype=torch.long, device=device)
        self.kwargs = {"cache_position": self.cache_position}
        self.counters: list = []
        self.graph = None
        with torch.inference_mode():
            try:
                self._forward()
            except TypeError:  # a transformers without the cache_position argument
                self.kwargs = {}
                self._forward()
        # transformers 5.x keeps each layer's write position on the device: rewind it before every step.
        for layer in getattr(self.cache, "layers", []):
            c = getattr(layer, "cumulative_length", None)
            if isinstance(c, torch.Tensor):
                self.counters.append(c)

    def _forward(self):
        self._rewind()
        return self.model(
            input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True, **self.kwargs
        ).logits

    def _rewind(self):
        if self.counters:
            self.torch._foreach_mul_(self.counters, 0)
            self.torch._foreach_add_(self.counters, self.ctx)
        for layer in getattr(self.cache, "layers", []):
            if isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length = self.ctx
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = self.ctx

    def eager(self):
        with self.torch.inference_mode():
            return self._forward()

    def capture(self) -> str | None:
        """Capture the step in a CUDA graph; None on success, else the reason."""
        torch = self.torch
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                self._forward()
            self.graph = graph
            return None
        except Exception as exc:  # some transformers versions sync on the host inside forward
            return f"{type(exc).__name__}: {str(exc)[:200]}"

    def replay(self):
        self.graph.replay()


def run_model_steps(args, device, timer: Timer) -> dict:
    """Decode-step time (us) per batch size: eager, and CUDA-graph replay when capture works."""
    import torch

    config = qwen2_7b_config(args.cpu_smoke)
    dtype = torch.bfloat16
    log(f"building a random {config.num_hidden_layers}-layer Qwen2 (hidden {config.hidden_size}) on {device}")
    model = build_model(config, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    kind = "tiny Qwen2 (smoke)" if args.cpu_smoke else "Qwen2-7B-shaped"
    name = f"{kind}, random bf16 weights, {n_params / 1e9:.2f}B params"
    steps: dict = {"name": name, "attn": getattr(model.config, "_attn_implementation", "unknown"), "bs": {}}
    for bs in args.bs:
        step = DecodeStep(model, config, bs, args.ctx, device, dtype)
        eager_us = timer(step.eager, reps=args.model_reps, flush=False)
        rec = {"eager_us": eager_us, "graph_us": None, "graph_error": "not on CUDA"}
        if device.type == "cuda":
            rec["graph_error"] = step.capture()
            if step.graph is not None:
                rec["graph_us"] = timer(step.replay, reps=args.model_reps, flush=False)
        steps["bs"][bs] = rec
        graph_txt = f"{rec['graph_us'] / 1e3:.2f} ms" if rec["graph_us"] else f"n/a ({rec['graph_error']})"
        log(f"decode step bs={bs}: eager {eager_us / 1e3:.2f} ms, CUDA graph {graph_txt}")
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps


def check_kernel(ak, params, bufs, hidden, gen, plen, device) -> dict:
    """Kernel vs reference, determinism over back-to-back launches, CUDA-graph replay (GPU only)."""
    import torch

    out = ak.launch(hidden, gen, plen, params, bufs).clone()
    ref = ak.length_head_reference(hidden, gen, plen, params)
    res = {"max_rel_err": float(((out.double() - ref.double()).abs() / ref.double().abs()).max())}
    runs = [ak.launch(hidden, gen, plen, params, bufs).clone() for _ in range(20 if device.type == "cuda" else 1)]
    res["deterministic"] = all(torch.equal(r, out) for r in runs)
    res["counters_zero"] = int(bufs.counters.abs().sum()) == 0
    res["graph_identical"] = None
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ak.launch(hidden, gen, plen, params, bufs)
        bufs.out.zero_()
        same = []
        for _ in range(3):
            graph.replay()
            same.append(torch.equal(bufs.out[: hidden.shape[0]], out))
        res["graph_identical"] = all(same) and int(bufs.counters.abs().sum()) == 0
    return res


def run_heads(args, ak, HeadConfig, LengthHead, device, timer: Timer, bandwidth: float) -> list[dict]:
    import torch

    wdtype = getattr(torch, args.weight_dtype)
    rows = []
    for shape in args.shapes:
        for hidden_size in args.hidden:
            head = random_head(HeadConfig, LengthHead, shape, hidden_size, seed=hidden_size)
            params = ak.prepare_head(head, device, wdtype, precision=args.precision)
            num_sms = args.num_sms or ak.default_num_sms(device)
            plan = ak.make_plan(params, max(args.bs), num_sms, **tile_kwargs(args))
            bufs = ak.alloc_buffers(params, max(args.bs), plan=plan)
            if device.type == "cuda":
                runner = ak.LengthHeadRunner(head, device, wdtype, max(args.bs), precision=args.precision)
                assert runner.uses_triton, "runner does not use the Triton kernel on this GPU"
            compiled = None
            if not args.no_compile:
                compiled = torch.compile(
                    lambda h, g, p, params=params: ak.length_head_reference(h, g, p, params),
                    backend=args.compile_backend,
                )
            for bs in args.bs:
                g = torch.Generator(device="cpu").manual_seed(bs)
                hidden = torch.randn(bs, hidden_size, generator=g).to(device=device, dtype=torch.bfloat16)
                gen = torch.randint(0, 4000, (bs,), generator=g).to(device)
                plen = torch.randint(1, 8000, (bs,), generator=g).to(device)
                row = {"shape": shape, "hidden": hidden_size, "bs": bs, "plan_split": list(bufs.plan.split)}
                row.update(check_kernel(ak, params, bufs, hidden, gen, plen, device))
                if device.type == "cuda":
                    expect = ak.launch(hidden, gen, plen, params, bufs)
                    row["runner_matches"] = torch.equal(runner(hidden, gen, plen), expect)
                row["triton_us"] = timer(lambda: ak.launch(hidden, gen, plen, params, bufs))  # noqa: B023
                row["eager_us"] = timer(lambda: ak.length_head_reference(hidden, gen, plen, params))  # noqa: B023
                row["compile_us"] = None
                if compiled is not None:
                    compiled(hidden, gen, plen)  # compile outside the timed calls
                    row["compile_us"] = timer(lambda: compiled(hidden, gen, plen))  # noqa: B023
                row["bytes"] = head_bytes(params, bs, 2)
                row["floor_us"] = row["bytes"] / bandwidth * 1e6
                row["pct_of_floor"] = 100.0 * row["floor_us"] / row["triton_us"]
                rows.append(row)
                comp = f"{row['compile_us']:.1f}" if row["compile_us"] is not None else "-"
                log(
                    f"{shape:5s} H={hidden_size:5d} bs={bs:4d}: triton {row['triton_us']:8.1f} us, eager "
                    f"{row['eager_us']:8.1f}, compile {comp}, floor {row['floor_us']:6.1f} us "
                    f"({row['pct_of_floor']:5.1f}%), rel err {row['max_rel_err']:.1e}, "
                    f"deterministic {row['deterministic']}, graph {row['graph_identical']}"
                )
    return rows


def tile_kwargs(args: argparse.Namespace) -> dict:
    """make_plan overrides given on the command line (tile sizes, warps, stages)."""
    names = ("block_n", "block_k", "block_k0", "num_warps", "num_stages")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def evaluate(rows: list[dict], steps: dict | None, tol: float) -> dict:
    """Fill each row's % of the decode step and the pass/fail of every target."""
    for r in rows:
        step = (steps or {}).get("bs", {}).get(r["bs"])
        r["step_us"] = (step["graph_us"] or step["eager_us"]) if step else None
        r["step_kind"] = ("cuda_graph" if step["graph_us"] else "eager") if step else None
        r["pct_of_step"] = 100.0 * r["triton_us"] / r["step_us"] if r["step_us"] else None
        r["correct"] = r["max_rel_err"] <= tol and r["deterministic"] and r["counters_zero"] is True
        if r["graph_identical"] is not None:
            r["correct"] = r["correct"] and r["graph_identical"]
    step_rows = [r for r in rows if r["bs"] >= 8 and r["pct_of_step"] is not None]
    floor_rows = [r for r in rows if r["bs"] >= 64]
    return {
        "head_lt_1pct_of_step_bs_ge_8": {
            "pass": all(r["pct_of_step"] < 1.0 for r in step_rows) if step_rows else None,
            "evaluated": len(step_rows),
            "failing": [(r["shape"], r["hidden"], r["bs"]) for r in step_rows if r["pct_of_step"] >= 1.0],
        },
        "ge_50pct_of_floor_bs_ge_64": {
            "pass": all(r["pct_of_floor"] >= 50.0 for r in floor_rows) if floor_rows else None,
            "evaluated": len(floor_rows),
            "failing": [(r["shape"], r["hidden"], r["bs"]) for r in floor_rows if r["pct_of_floor"] < 50.0],
        },
        "correct_all": {"pass": all(r["correct"] for r in rows), "tolerance": tol},
    }


def verdict(passed: bool | None) -> str:
    return "n/a (no row in range)" if passed is None else "PASS" if passed else "FAIL"


def to_markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [
        "# Fused length-head kernel benchmark",
        "",
        f"Device: {m['device']}; torch {m['torch']}, triton {m['triton']}, transformers {m['transformers']}; "
        f"commit {m['commit']}.",
        f"Command: `{m['command']}`",
        f"HBM bandwidth (1 GiB device-to-device copy): {m['bandwidth_gbs']:.0f} GB/s. Weights {m['weight_dtype']}, "
        f"dot precision {m['precision']}, hidden states bf16. Times: median of {m['reps']} calls, L2 flushed before "
        "each, CUDA events.",
        f"Decode step: {m['model']}, {m['ctx']}-token context in a static KV cache, single-token forward; "
        "target uses the CUDA-graph replay when capture worked, else the eager forward (column `step`).",
        "",
        "| shape | H | bs | triton (us) | torch eager (us) | torch.compile (us) | floor (us) | % of floor "
        "| decode step (ms) | step | head % of step | rel err | correct |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        comp = f"{r['compile_us']:.1f}" if r["compile_us"] is not None else "-"
        step = f"{r['step_us'] / 1e3:.2f}" if r["step_us"] else "-"
        pct = f"{r['pct_of_step']:.3f}" if r["pct_of_step"] is not None else "-"
        lines.append(
            f"| {r['shape']} | {r['hidden']} | {r['bs']} | {r['triton_us']:.1f} | {r['eager_us']:.1f} | {comp} "
            f"| {r['floor_us']:.2f} | {r['pct_of_floor']:.1f} | {step} | {r['step_kind'] or '-'} | {pct} "
            f"| {r['max_rel_err']:.1e} | {'yes' if r['correct'] else 'NO'} |"
        )
    if doc.get("steps"):
        lines += ["", "| bs | decode step eager (ms) | decode step CUDA graph (ms) |", "|---|---|---|"]
        for bs, s in doc["steps"]["bs"].items():
            graph = f"{s['graph_us'] / 1e3:.2f}" if s["graph_us"] else f"n/a ({s['graph_error']})"
            lines.append(f"| {bs} | {s['eager_us'] / 1e3:.2f} | {graph} |")
    lines += ["", "Targets:"]
    for name, t in doc["targets"].items():
        extra = f" (failing: {t['failing']})" if t.get("failing") else ""
        lines.append(f"- {name}: {verdict(t['pass'])}{extra}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bs", type=int, nargs="+", default=None, help="batch sizes (default 1 8 64 256 512)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes (default 576 3584 8192)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["ours", "paper"])
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 100)")
    p.add_argument("--model-reps", type=int, default=None, help="timed decode steps per batch size (default 20)")
    p.add_argument("--ctx", type=int, default=None, help="KV context of the decode step (default 1024)")
    p.add_argument("--no-model", action="store_true", help="skip the 7B decode step")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke: eager)")
    p.add_argument("--weight-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--precision", choices=["tf32", "tf32x3", "ieee"], default="tf32")
    p.add_argument("--num-sms", type=int, default=None, help="plan for this many SMs (default: the device's)")
    p.add_argument("--block-n", type=int, default=None, help="kernel tile: output columns of a wide layer (16)")
    p.add_argument("--block-k", type=int, default=None, help="kernel tile: inputs per step, layers > 0 (64)")
    p.add_argument("--block-k0", type=int, default=None, help="kernel tile: inputs per step, layer 0 (128)")
    p.add_argument("--num-warps", type=int, default=None, help="warps per program (default 4, or 8 for 64-row tiles)")
    p.add_argument("--num-stages", type=int, default=None, help="software pipeline stages (3)")
    p.add_argument("--tol", type=float, default=2e-2, help="max relative error vs the fp32 reference (tf32/bf16)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmark/results)")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="no GPU: tiny sizes through the reference and the Triton interpreter"
    )
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.bs = args.bs or ([1, 3] if smoke else [1, 8, 64, 256, 512])
    args.hidden = args.hidden or ([64] if smoke else [576, 3584, 8192])
    args.reps = args.reps or (1 if smoke else 100)
    args.model_reps = args.model_reps or (1 if smoke else 20)
    if smoke:  # the interpreter's time grows with the number of tile steps: wide tiles keep the smoke short
        args.block_n, args.block_k, args.block_k0 = args.block_n or 64, args.block_k or 256, args.block_k0 or 256
    args.ctx = args.ctx or (32 if smoke else 1024)
    args.compile_backend = args.compile_backend or ("eager" if smoke else "inductor")
    if smoke:
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="kernel_bench_smoke_"))
        if args.out.resolve().is_relative_to(RESULTS.resolve()):
            p.error("--cpu-smoke writes nothing under benchmark/results: pass another --out")
    args.out = args.out or RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels become interpreted functions
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "kernel_bench: no CUDA device (torch.cuda.is_available() is False). This benchmark times the Triton "
            "kernel on a GPU; use --cpu-smoke --out DIR to check the script's plumbing on a CPU machine.",
            file=sys.stderr,
        )
        return 2
    import triton

    ak, HeadConfig, LengthHead = import_project()
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
        if not args.no_model:
            print("kernel_bench: transformers is not installed (needed for the decode step; --no-model skips it)")
            return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        if not sys.modules["ares_kernels.length_head_triton"].interpreting():
            raise SystemExit("TRITON_INTERPRET was not in effect: triton was imported before it was set")
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    timer = Timer(device, args.reps, warmup=0 if args.cpu_smoke else 10)
    bandwidth = measure_bandwidth(device, timer)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"device {name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    steps = None if args.no_model else run_model_steps(args, device, timer)
    rows = run_heads(args, ak, HeadConfig, LengthHead, device, timer, bandwidth)
    targets = evaluate(rows, steps, args.tol)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
        "mode": "cpu-smoke (Triton interpreter; times are meaningless)" if args.cpu_smoke else "gpu",
        "commit": commit_label(ROOT),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "bandwidth_gbs": bandwidth / 1e9,
        "weight_dtype": args.weight_dtype,
        "precision": args.precision,
        "tiles": tile_kwargs(args) or "defaults",
        "reps": args.reps,
        "ctx": args.ctx,
        "model": "none (--no-model)" if args.no_model else f"{steps['name']}, attention {steps['attn']}",
        "wall_s": time.perf_counter() - T0,
    }
    doc = {"meta": meta, "rows": rows, "steps": steps, "targets": targets}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_bench.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (args.out / "kernel_bench.md").write_text(to_markdown(doc))
    for name, t in targets.items():
        failing = f" failing {t['failing']}" if t.get("failing") else ""
        print(f"target {name}: {verdict(t['pass'])}{failing}")
    log(f"wrote {args.out / 'kernel_bench.json'} and .md")
    return 0 if targets["correct_all"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
