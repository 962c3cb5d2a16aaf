"""Sampler for the ServeGen DeepSeek-R1 production data (73 clients, 24 h).

Per client, `chunk-N-trace.csv` gives the arrival process of every 600 s window (`ts,rate,cv,dist,p1,p2`:
Gamma(shape=p1, scale=p2) or Weibull(shape=p1, scale=p2) inter-arrival times; rate 0 = silent), and
`chunk-N-dataset.json` gives PMFs of input and output tokens per 6 h window. We draw each client's arrivals
window by window as a renewal process with that window's distribution, and each request's input and output
length independently from the client's PMFs of the 6 h window it falls in (as ServeGen itself does).
Rate scaling compresses or stretches time so the mean rate is the one asked for (burst shapes scale with it).

The arrival parameters alone ship with the package (`data/servegen_r1_arrivals.csv.gz`, written by
`benchmark/pack_r1_arrivals.py`; ServeGen's Apache-2.0 licence beside it): `r1_arrival_times` draws from them the
same arrival times `servegen_r1` draws from the full folder, so the live benchmark and `ares demo` run from a bare
clone. Lengths need the full folder (under `$ARES_DATA_DIR`).
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ares.shared_data import require_data

from .base import Workload, traces_dir

PACKED_ARRIVALS = Path(__file__).resolve().parent / "data" / "servegen_r1_arrivals.csv.gz"
WINDOW_S = 600.0
DAY_S = 86400.0
LENGTH_WINDOWS = (0, 21600, 43200, 64800)


@dataclass(frozen=True)
class ClientData:
    """One ServeGen client: per-600 s arrival parameters and per-6 h length PMFs."""

    name: str
    window_ts: np.ndarray  # start of each 600 s window (s of day)
    rate: np.ndarray
    dist: tuple[str, ...]
    p1: np.ndarray
    p2: np.ndarray
    # per 6 h window: (values, cumulative probabilities) for input and output, or None when empty
    input_pmf: tuple[tuple[np.ndarray, np.ndarray] | None, ...]
    output_pmf: tuple[tuple[np.ndarray, np.ndarray] | None, ...]


def _parse_pmf(text) -> tuple[np.ndarray, np.ndarray] | None:
    pmf = ast.literal_eval(text) if isinstance(text, str) else text
    if not pmf:
        return None
    values = np.array(list(pmf.keys()), dtype=np.float64)
    probs = np.array(list(pmf.values()), dtype=np.float64)
    if probs.sum() <= 0:
        return None
    cdf = np.cumsum(probs) / probs.sum()
    return values, cdf


def _fill_missing(pmfs: list) -> tuple:
    """A window with an empty PMF borrows the nearest non-empty window of the same client."""
    present = [i for i, p in enumerate(pmfs) if p is not None]
    if not present:
        return tuple(pmfs)
    return tuple(
        pmfs[i] if pmfs[i] is not None else pmfs[min(present, key=lambda j: abs(j - i))] for i in range(len(pmfs))
    )


@dataclass(frozen=True)
class ArrivalClient:
    """One ServeGen client's arrival process alone: per-600 s window rate and inter-arrival distribution."""

    name: str
    rate: np.ndarray
    dist: tuple[str, ...]
    p1: np.ndarray
    p2: np.ndarray


@lru_cache(maxsize=1)
def packed_arrival_clients() -> tuple[ArrivalClient, ...]:
    """The arrival processes shipped with the package (see the module docstring), in `load_clients` order."""
    rows = list(csv.DictReader(io.StringIO(gzip.decompress(PACKED_ARRIVALS.read_bytes()).decode())))
    n_win = int(DAY_S // WINDOW_S)
    clients: dict[str, dict] = {}
    for r in rows:
        c = clients.setdefault(
            r["client"], {"rate": np.zeros(n_win), "dist": [""] * n_win, "p1": np.zeros(n_win), "p2": np.zeros(n_win)}
        )
        k = int(r["window"])
        c["rate"][k], c["dist"][k], c["p1"][k], c["p2"][k] = float(r["rate"]), r["dist"], float(r["p1"]), float(r["p2"])
    return tuple(
        ArrivalClient(name, c["rate"], tuple(c["dist"]), c["p1"], c["p2"]) for name, c in clients.items()
    )


@lru_cache(maxsize=4)
def load_clients(folder: str | None = None) -> tuple[ClientData, ...]:
    """Parse every client of the ServeGen DeepSeek-R1 folder (cached; read in place)."""
    root = Path(folder) if folder else require_data(traces_dir() / "servegen" / "deepseek-r1", "chunk-0-trace.csv")
    clients = []
    for trace in sorted(root.glob("chunk-*-trace.csv"), key=lambda p: int(p.name.split("-")[1])):
        rows = [r for r in csv.reader(open(trace, newline="")) if r]
        dataset = json.loads((root / trace.name.replace("-trace.csv", "-dataset.json")).read_text())
        inp, out = [], []
        for key in LENGTH_WINDOWS:
            win = dataset.get(str(key)) or {}
            inp.append(_parse_pmf(win.get("input_tokens", "{}")))
            out.append(_parse_pmf(win.get("output_tokens", "{}")))
        inp_t, out_t = _fill_missing(inp), _fill_missing(out)
        if all(p is None for p in inp_t) or all(p is None for p in out_t):
            continue  # a client without any length data cannot produce requests
        clients.append(
            ClientData(
                name=trace.name.replace("-trace.csv", ""),
                window_ts=np.array([float(r[0]) for r in rows]),
                rate=np.array([float(r[1] or 0.0) for r in rows]),
                dist=tuple(r[3] for r in rows),
                p1=np.array([float(r[4] or 0.0) for r in rows]),
                p2=np.array([float(r[5] or 0.0) for r in rows]),
                input_pmf=inp_t,
                output_pmf=out_t,
            )
        )
    if not clients:
        raise FileNotFoundError(f"no ServeGen clients under {root}")
    return tuple(clients)


def _gaps(rng: np.random.Generator, dist: str, p1: float, p2: float, rate: float, n: int) -> np.ndarray:
    if dist == "Gamma" and p1 > 0 and p2 > 0:
        return rng.gamma(p1, p2, n)
    if dist == "Weibull" and p1 > 0 and p2 > 0:
        return p2 * rng.weibull(p1, n)
    return rng.exponential(1.0 / rate, n)  # Exponential or unknown: Poisson at the window's rate


def _window_arrivals(rng: np.random.Generator, c: ClientData | ArrivalClient, w: int, start: float) -> np.ndarray:
    rate = c.rate[w]
    if rate <= 0:
        return np.zeros(0)
    n = int(rate * WINDOW_S * 2 + 20)
    gaps = _gaps(rng, c.dist[w], c.p1[w], c.p2[w], rate, n)
    gaps[0] *= rng.random()  # enter the renewal process mid-gap
    t = np.cumsum(gaps)
    while t[-1] < WINDOW_S:
        more = np.cumsum(_gaps(rng, c.dist[w], c.p1[w], c.p2[w], rate, n)) + t[-1]
        t = np.concatenate((t, more))
    return start + t[t < WINDOW_S]


def _sample_pmf(rng: np.random.Generator, pmf: tuple[np.ndarray, np.ndarray], n: int) -> np.ndarray:
    values, cdf = pmf
    idx = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(values) - 1)
    return values[idx]


def natural_rate(start_s: float = 0.0, folder: str | None = None) -> float:
    """Total natural request rate (req/s) of all clients in the 600 s window containing `start_s`."""
    return _natural_rate(load_clients(folder), start_s)


def _natural_rate(clients, start_s: float) -> float:
    w = int((start_s % DAY_S) // WINDOW_S)
    return float(sum(c.rate[w] for c in clients if w < len(c.rate)))


def _natural_span(clients, rate: float | None, duration_s: float, start_s: float) -> float:
    """How much natural time to draw: `duration_s`, or enough expected arrivals for rate * duration."""
    need = (rate or 0.0) * duration_s
    span, expected = 0.0, 0.0
    while (rate is None and span < duration_s) or (rate is not None and expected < need * 1.02 + 50):
        expected += _natural_rate(clients, start_s + span) * WINDOW_S
        span += WINDOW_S
        if span > 30 * DAY_S:
            raise ValueError("ServeGen clients are silent: cannot reach the asked rate")
    return span


def _client_arrivals(rng: np.random.Generator, c, span: float, start_s: float) -> np.ndarray:
    ct = []
    for k in range(int(span // WINDOW_S)):
        w = int(((start_s + k * WINDOW_S) % DAY_S) // WINDOW_S)
        if w < len(c.rate):
            ct.append(_window_arrivals(rng, c, w, k * WINDOW_S))
    return np.concatenate(ct) if ct else np.zeros(0)


def _length_windows(t: np.ndarray, start_s: float) -> np.ndarray:
    return (((start_s + t) % DAY_S) // 21600).astype(int)  # which 6 h length window


def _scaled(t: np.ndarray, rate: float | None, duration_s: float) -> np.ndarray:
    if rate is not None and len(t) > 1:
        # Scale so that exactly round(rate * duration) arrivals fall in [0, duration): the offered rate is
        # the asked one even though the natural rate varies from window to window.
        k = min(max(int(round(rate * duration_s)), 1), len(t) - 1)
        t = t * (duration_s / t[k]) if t[k] > 0 else t
    return t


def servegen_r1(
    rate: float | None = None,
    duration_s: float = 3600.0,
    seed: int = 0,
    start_s: float = 0.0,
    folder: str | None = None,
) -> Workload:
    """DeepSeek-R1 workload: `duration_s` seconds at mean `rate` req/s (None: natural rate), taken from the
    day starting at `start_s` (s of day; wraps around midnight)."""
    clients = load_clients(folder)
    rng = np.random.default_rng(seed)
    span = _natural_span(clients, rate, duration_s, start_s)
    times, prompts, outputs = [], [], []
    for c in clients:
        t = _client_arrivals(rng, c, span, start_s)
        if not len(t):
            continue
        lw = _length_windows(t, start_s)
        p = np.empty(len(t))
        o = np.empty(len(t))
        for j in range(len(LENGTH_WINDOWS)):
            sel = lw == j
            if sel.any():
                p[sel] = _sample_pmf(rng, c.input_pmf[j], int(sel.sum()))
                o[sel] = _sample_pmf(rng, c.output_pmf[j], int(sel.sum()))
        times.append(t)
        prompts.append(p)
        outputs.append(o)
    t = np.concatenate(times)
    order = np.argsort(t, kind="stable")
    t, p, o = _scaled(t[order], rate, duration_s), np.concatenate(prompts)[order], np.concatenate(outputs)[order]
    wl = Workload("r1", t, np.maximum(p.astype(np.int64), 1), np.maximum(o.astype(np.int64), 1))
    return wl.head(duration_s)


def r1_arrival_times(rate: float, duration_s: float, seed: int = 0, start_s: float = 0.0) -> np.ndarray:
    """The arrival times `servegen_r1(rate, duration_s, seed, start_s)` gives, drawn from the packaged arrival
    processes alone (no trace folder needed; `test_workloads` checks the two agree where the folder is present)."""
    clients = packed_arrival_clients()
    rng = np.random.default_rng(seed)
    span = _natural_span(clients, rate, duration_s, start_s)
    times = []
    for c in clients:
        t = _client_arrivals(rng, c, span, start_s)
        if not len(t):
            continue
        lw = _length_windows(t, start_s)
        for j in range(len(LENGTH_WINDOWS)):
            n = int((lw == j).sum())
            if n:
                rng.random(n), rng.random(n)  # the draws servegen_r1 makes for lengths: same stream, same times
        times.append(t)
    t = _scaled(np.sort(np.concatenate(times), kind="stable"), rate, duration_s)
    return t[t < duration_s]
