"""What the decode servers report while a replay runs: KV used per server over time, and the head's predictions
of each running request's remaining tokens (for its live error once the request's true length is known).
Retractions are read from each server's own log, where SGLang's scheduler reports every one."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RETRACT_LINE = re.compile(rb"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")


@dataclass
class Trace:
    """Samples of every decode server's `/ares/state`."""

    t_s: list[float] = field(default_factory=list)
    used: list[list[int]] = field(default_factory=list)  # per sample, per server
    running: list[list[int]] = field(default_factory=list)
    capacity: list[int] = field(default_factory=list)
    # rid -> [(generated tokens, predicted remaining)] of every poll that saw a prediction
    predictions: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    failed_polls: int = 0


class Monitor:
    """Polls every decode server's `/ares/state` each `interval_s` on a thread until stopped."""

    def __init__(self, decode_urls: list[str], interval_s: float = 0.5):
        self.urls = decode_urls
        self.interval_s = interval_s
        self.trace = Trace()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> Monitor:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def latest(self) -> tuple[list[int], list[int]]:
        """(used KV tokens, capacity) per server at the last sample (zeros before the first)."""
        tr = self.trace
        return (tr.used[-1] if tr.used else [0] * len(self.urls)), (tr.capacity or [1] * len(self.urls))

    def _loop(self) -> None:
        while not self._stop.is_set():
            used, running, caps = [], [], []
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url + "/ares/state", timeout=5) as r:
                        s = json.loads(r.read())
                except OSError:
                    self.trace.failed_polls += 1
                    used.append(0), running.append(0), caps.append(0)
                    continue
                used.append(int(s["used_tokens"]))
                caps.append(int(s["capacity_tokens"]))
                running.append(len(s["requests"]))
                for row in s["requests"]:
                    if row.get("predicted_remaining") is not None:
                        self.trace.predictions.setdefault(row["rid"], []).append(
                            (int(row["generated_tokens"]), float(row["predicted_remaining"]))
                        )
            self.trace.t_s.append(time.monotonic() - self._t0)
            self.trace.used.append(used)
            self.trace.running.append(running)
            if not self.trace.capacity and all(caps):
                self.trace.capacity = caps
            self._stop.wait(self.interval_s)


def log_offsets(logs: list[Path]) -> list[int]:
    """Current size of each log: where a later `retractions` call starts counting."""
    return [p.stat().st_size if p.exists() else 0 for p in logs]


def retractions(logs: list[Path], offsets: list[int]) -> list[int]:
    """Requests each server retracted (its scheduler's own log lines) since `offsets`."""
    out = []
    for p, off in zip(logs, offsets, strict=True):
        with open(p, "rb") as f:
            f.seek(off)
            out.append(sum(int(m.group(1)) for m in RETRACT_LINE.finditer(f.read())))
    return out
