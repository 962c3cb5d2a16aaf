"""Replay a request list against a router at its arrival times (SGLang's `/generate`, streamed) and record, per
request, every streamed event's time and token count: what `sglang.benchmark.serving` measures (TTFT, per-request
mean TPOT, inter-token gaps), plus checks that no token was lost or sent twice."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from ares.live.workload import LiveRequest


@dataclass
class Outcome:
    """What the client saw of one request."""

    rid: str
    arrival_s: float  # scheduled send time, s from the replay's start
    sent_s: float = 0.0
    event_s: list[float] = field(default_factory=list)  # time of each streamed event with new tokens
    event_tokens: list[int] = field(default_factory=list)  # cumulative completion tokens at that event
    finish: str | None = None  # "stop" | "length" | None (did not finish)
    error: str | None = None
    decode: str | None = None  # the decode server the router placed it on (X-Ares-Decode)
    backend_rid: str | None = None  # the id the servers know it by (the router's, X-Request-Id)
    output_ids: list[int] = field(default_factory=list)
    duplicated: bool = False  # the stream stepped back or the ids disagree with the count

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish is not None and bool(self.event_s)

    @property
    def n_output(self) -> int:
        return self.event_tokens[-1] if self.event_tokens else 0

    @property
    def ttft_s(self) -> float | None:
        return self.event_s[0] - self.sent_s if self.event_s else None

    @property
    def tpot_s(self) -> float | None:
        """Per-request mean time per output token after the first, as `sglang.benchmark.serving` computes it."""
        if not self.ok or self.n_output < 2:
            return None
        return (self.event_s[-1] - self.event_s[0]) / (self.n_output - 1)

    def itl_s(self) -> list[float]:
        """Gap before each streamed token after the first (an event carrying k tokens counts its gap once, then
        k - 1 zero gaps: the client saw them at once)."""
        gaps: list[float] = []
        for i in range(1, len(self.event_s)):
            k = self.event_tokens[i] - self.event_tokens[i - 1]
            gaps += [self.event_s[i] - self.event_s[i - 1]] + [0.0] * max(k - 1, 0)
        return gaps


def generate_body(req: LiveRequest, max_new_tokens: int, ignore_eos: bool = False) -> dict:
    """The `/generate` body: greedy, one cap for every request; the model's own end unless `ignore_eos` (used only
    to measure the servers' step time, never in a replay: it would hand the router the length)."""
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0, **({"ignore_eos": True} if ignore_eos else {})}
    # No `rid`: the router then names the request itself, passes that id to the servers and returns it in
    # X-Request-Id, so the servers' reports can be matched to it (a client's own id never reaches them).
    return {"input_ids": list(req.input_ids), "sampling_params": sampling, "stream": True}


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    req: LiveRequest,
    max_new: int,
    t0: float,
    ignore_eos: bool,
    request_timeout_s: float | None = None,
) -> Outcome:
    out = Outcome(req.rid, req.arrival_s)
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
    out.sent_s = time.monotonic() - t0
    # A client gives up on a request that has not finished after `request_timeout_s` (it is then lost, with the
    # reason); without one, a request stuck in a server would hold the whole replay until the session's limit.
    limit = aiohttp.ClientTimeout(total=request_timeout_s) if request_timeout_s else None
    try:
        async with session.post(
            url + "/generate", json=generate_body(req, max_new, ignore_eos), **({"timeout": limit} if limit else {})
        ) as resp:
            out.decode = resp.headers.get("X-Ares-Decode")
            out.backend_rid = resp.headers.get("X-Request-Id")
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return out
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    out.error = str(ev["error"])[:300]
                    break
                meta = ev.get("meta_info", {})
                n = int(meta.get("completion_tokens", 0))
                if out.event_tokens and n < out.event_tokens[-1]:
                    out.duplicated = True
                if not out.event_tokens or n > out.event_tokens[-1]:
                    out.event_s.append(time.monotonic() - t0)
                    out.event_tokens.append(n)
                out.output_ids = ev.get("output_ids", out.output_ids)
                fin = meta.get("finish_reason")
                if fin:
                    out.finish = fin.get("type") if isinstance(fin, dict) else str(fin)
            if out.finish not in (None, "stop", "length"):
                out.error, out.finish = f"finished with {out.finish}", None
            if out.output_ids and len(out.output_ids) != out.n_output:
                out.duplicated = True
    except asyncio.TimeoutError:
        out.error = f"no answer within {request_timeout_s:g} s (client gave up)" if limit else "TimeoutError"
    except (aiohttp.ClientError, OSError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


async def replay(
    url: str,
    requests: list[LiveRequest],
    max_new_tokens: int,
    on_done: Callable[[Outcome], None] | None = None,
    timeout_s: float = 3600.0,
    ignore_eos: bool = False,
    request_timeout_s: float | None = None,
) -> list[Outcome]:
    """Send every request at its arrival time (s after the call) and wait for all answers (each for at most
    `request_timeout_s` after it was sent, when given)."""
    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def run(req: LiveRequest) -> Outcome:
            o = await _one(session, url, req, max_new_tokens, t0, ignore_eos, request_timeout_s)
            if on_done:
                on_done(o)
            return o

        return list(await asyncio.gather(*(run(r) for r in requests)))
