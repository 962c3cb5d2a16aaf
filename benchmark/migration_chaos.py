"""Chaos run of live migration: does any request lose, repeat or drop a token while requests move around at random
and servers stop, crash and come back?

One live cluster: 1 prefill + 3 `--ares` decode servers (SmolLM2-135M, CPU, Mooncake TCP on loopback) behind the
ARES router (round robin, no rebalancer: every move is this script's). Requests: greedy (temperature 0,
`ignore_eos`) on `/generate`, `/v1/chat/completions` and `/v1/completions`, streamed and not, a random prompt and
length each, `--concurrency` at a time.

1. Reference pass: every request once through the router, nothing moved, nothing injected.
2. Chaos pass, the same requests again, while
   - a mover moves a random running request (`POST /ares/migrate`) every few seconds, several at once, favouring
     requests that moved already (repeated moves) and sending some back to a server they left;
   - a decode server is SIGSTOPped for 5-20 s now and then (its process group: server, scheduler, detokenizer);
   - once, a decode server holding requests is SIGKILLed and restarted on its port (`Cluster.kill`/`restart`);
     what ran on it, or was moving to or from it, at that moment is recorded from the router
     (`GET /ares/migrations` rows, just before and just after the kill);
   - a few clients hang up after a random time.
3. Per request, a verdict against its reference (`ares.migration.chaos.verdict`): identical, clean error (only for
   requests the crash hit), disconnected, or a failure: lost, duplicated, truncated, diverged, malformed.
4. At the end: KV tokens and requests left on every decode server (`/ares/state`, and the agents' own records),
   waited for up to `--settle` s; moves committed and failed (this script's answers and the router's
   `ares_migrations_total`); moves per request.

    python benchmark/migration_chaos.py                    # 200 requests, results under benchmark/results/
    python benchmark/migration_chaos.py --quick            # 30 requests, short answers, under .ares/
    python benchmark/migration_chaos.py --requests 400 --seed 2 --out /tmp/chaos
Writes migration_chaos.json and migration_chaos.md under --out, with a `met` flag per target.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import orjson
from provenance import record

ROOT = Path(__file__).resolve().parent.parent

from ares.cluster import Cluster, ClusterSpec  # noqa: E402
from ares.migration.chaos import OK_VERDICTS, VERDICTS, Answer, verdict  # noqa: E402
from ares.models import prepare_model  # noqa: E402
from ares_router.wire import MIGRATE_CMD_PATH  # noqa: E402

ENDPOINTS = ("/generate", "/v1/chat/completions", "/v1/completions")
INTERNAL = b"ares_migrated"
WORDS = (
    "river stone light garden window morning quiet market engine paper silver forest letter winter harbor bridge "
    "candle music orange violet thunder meadow castle pocket ladder mirror shadow story travel signal rocket "
    "planet ocean valley summer village teacher doctor kitchen island picture button wonder yellow circle"
).split()
TARGETS = {  # name: (what, value's key, wanted)
    "lost": "0 lost requests",
    "duplicated": "0 duplicated",
    "truncated": "0 truncated",
    "kv_left": "0 KV tokens left on every decode server",
    "committed": ">= 50 committed moves",
    "moved_twice": ">= 10 requests moved twice or more",
    "other_failures": "0 other failures (diverged, malformed)",
}


@dataclass
class Spec:
    """One request of the run."""

    index: int
    endpoint: str
    stream: bool
    prompt: str
    max_tokens: int
    hang_up_s: float | None  # the client leaves after this many seconds (None: it waits for the answer)

    def body(self, model: str) -> dict:
        """The request body: greedy, every token up to `max_tokens` (`ignore_eos`)."""
        if self.endpoint == "/generate":
            params = {"max_new_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
            return {"text": self.prompt, "sampling_params": params, "stream": self.stream}
        body: dict = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": self.stream,
        }
        if self.endpoint == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body


def make_specs(n: int, seed: int, tokens: tuple[int, int], hang_up_fraction: float) -> list[Spec]:
    """`n` requests: endpoint and stream mode in turn (every combination equally often), random prompts (8-60
    words) and lengths, a seeded few that hang up after 2-12 s."""
    rng = random.Random(seed)
    combos = [(e, s) for e in ENDPOINTS for s in (True, False)]
    specs = []
    for i in range(n):
        endpoint, stream = combos[i % len(combos)]
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
        hang_up = rng.uniform(2.0, 12.0) if rng.random() < hang_up_fraction else None
        specs.append(Spec(i, endpoint, stream, prompt, rng.randint(*tokens), hang_up))
    rng.shuffle(specs)
    return specs


# -- the client ----------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request's run: its answer and when / where it ran."""

    answer: Answer
    t0: float
    t1: float = 0.0
    decode: str | None = None  # where the router placed it first (`X-Ares-Decode`)
    hung_up: bool = False


def _error_text(raw: bytes) -> str:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode(errors="replace")
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    return str(err.get("message", err) if isinstance(err, dict) else err)[:300]


def _generate_finish(meta: dict) -> tuple[str | None, str | None, bool]:
    """(finish type, error, internal) of a `/generate` meta_info: an abort with a status code is an error the
    client is told; one without is a normal end (SGLang's graceful abort)."""
    fin = meta.get("finish_reason")
    if not isinstance(fin, dict):
        return (fin if isinstance(fin, str) else None), None, False
    message = str(fin.get("message") or "")
    error = f"abort {fin.get('status_code')}: {message[:200]}" if fin.get("status_code") else None
    return fin.get("type"), error, message.startswith("ares_migrated")


def parse_answer(endpoint: str, status: int, raw: bytes) -> Answer:
    """A non-streamed answer."""
    if status != 200:
        return Answer(status, error=f"HTTP {status}: {_error_text(raw)}", internal=INTERNAL in raw)
    obj = orjson.loads(raw)
    if endpoint == "/generate":
        meta = obj["meta_info"]
        finish, error, internal = _generate_finish(meta)
        return Answer(
            status,
            obj["text"],
            list(obj["output_ids"]),
            meta["completion_tokens"],
            finish,
            error,
            internal=internal or INTERNAL in raw,
        )
    choice = obj["choices"][0]
    text = (choice.get("message") or {}).get("content") if endpoint == "/v1/chat/completions" else choice["text"]
    return Answer(
        status, text or "", None, obj["usage"]["completion_tokens"], choice["finish_reason"], internal=INTERNAL in raw
    )


class StreamReader:
    """Builds the `Answer` of a stream event by event."""

    def __init__(self, endpoint: str, status: int):
        self.endpoint = endpoint
        self.a = Answer(status, complete=False, finishes=0, tokens=[] if endpoint == "/generate" else None)
        self.ids: set[str] = set()
        self.events = 0

    def feed(self, data: bytes) -> None:
        """One `data:` payload."""
        a = self.a
        if data == b"[DONE]":
            a.complete = True
            return
        a.internal = a.internal or INTERNAL in data
        obj = orjson.loads(data)
        if "error" in obj or obj.get("object") == "error":
            a.error = f"in-band error: {_error_text(data)}"
            return
        self.events += 1
        if self.endpoint == "/generate":
            meta = obj["meta_info"]
            self.ids.add(meta["id"])
            tokens = list(obj.get("output_ids") or [])
            if tokens[: len(a.tokens or [])] != a.tokens or not obj["text"].startswith(a.text):
                a.stepped_back = True  # cumulative output that does not extend what came before
            a.tokens, a.text, a.completion_tokens = tokens, obj["text"], meta["completion_tokens"]
            finish, error, internal = _generate_finish(meta)
            a.internal = a.internal or internal
            if finish is not None:
                a.finishes += 1
                a.finish = finish
            a.error = a.error or error
        else:
            self.ids.add(obj["id"])
            for choice in obj.get("choices") or []:
                delta = choice.get("delta") or {}
                a.text += delta.get("content") or choice.get("text") or ""
                if choice.get("finish_reason"):
                    a.finishes += 1
                    a.finish = choice["finish_reason"]
            if obj.get("usage"):
                a.completion_tokens = obj["usage"]["completion_tokens"]
        a.ids = len(self.ids)


async def run_request(session: aiohttp.ClientSession, url: str, spec: Spec, model: str, rid: str) -> Outcome:
    """Send `spec` through the router at `url` as request `rid` and read its whole answer."""
    out = Outcome(Answer(None), time.monotonic())
    headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
    try:
        async with session.post(url + spec.endpoint, data=orjson.dumps(spec.body(model)), headers=headers) as resp:
            out.decode = resp.headers.get("X-Ares-Decode")
            if not spec.stream or resp.status != 200:
                out.answer = parse_answer(spec.endpoint, resp.status, await resp.read())
            else:
                reader = StreamReader(spec.endpoint, resp.status)
                async for line in resp.content:
                    line = line.strip()
                    if line.startswith(b"data:"):
                        reader.feed(line[5:].strip())
                out.answer = reader.a
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, orjson.JSONDecodeError) as e:
        kept = out.answer if out.answer.status is not None else Answer(None)
        kept.error = f"client: {type(e).__name__}: {e}"[:300]
        out.answer = kept
    out.t1 = time.monotonic()
    return out


# -- the chaos -------------------------------------------------------------------------------------------------------
@dataclass
class Chaos:
    """Shared state of one chaos pass."""

    cluster: Cluster
    router: str
    session: aiohttp.ClientSession
    rng: random.Random
    args: argparse.Namespace
    t_start: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    moves: list[dict] = field(default_factory=list)  # every /ares/migrate call and its answer
    moving: set[str] = field(default_factory=set)  # request ids with a move call in flight
    events: list[dict] = field(default_factory=list)  # faults injected
    stopped: str | None = None  # the decode server SIGSTOPped now
    down: str | None = None  # the decode server killed and not back yet
    crash_hit: set[str] = field(default_factory=set)  # request ids the crash hit
    launched: int = 0
    finished: int = 0

    def now(self) -> float:
        return round(time.monotonic() - self.t_start, 3)

    def event(self, kind: str, **kw: object) -> None:
        self.events.append({"t": self.now(), "event": kind, **kw})
        print(f"[{self.now():7.1f}s] {kind} " + " ".join(f"{k}={v}" for k, v in kw.items()), flush=True)

    async def get(self, path: str) -> dict:
        async with self.session.get(self.router + path, timeout=aiohttp.ClientTimeout(total=30)) as r:
            return await r.json(content_type=None)

    async def rows(self) -> list[dict]:
        """The router's rows of the requests it relays (`GET /ares/migrations`), retried until it answers."""
        while True:
            try:
                return (await self.get("/ares/migrations"))["requests"]
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, KeyError) as e:
                print(f"router not answering /ares/migrations: {e!r}", flush=True)
                await asyncio.sleep(0.5)

    def decode_names(self) -> list[str]:
        return [f"decode{i}" for i in range(len(self.cluster.decode_urls))]


async def mover(c: Chaos) -> None:
    """Every few seconds move a random running request (several moves may be in flight)."""
    lo, hi = c.args.move_interval
    while not c.done.is_set():
        await asyncio.sleep(c.rng.uniform(lo, hi))
        if len(c.moving) >= c.args.moves_in_flight:
            continue
        try:
            rows = (await c.get("/ares/migrations"))["requests"]
            snap = await c.get("/ares/cluster")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, KeyError) as e:
            print(f"mover: router not answering: {e!r}", flush=True)
            continue
        generated = {r["rid"]: r["generated"] for d in snap["decode"] for r in d["requests"]}
        ready = [
            r
            for r in rows
            if r["moving"] is None
            and r["request_id"] not in c.moving
            and r["request_id"].startswith("chaos-")
            and generated.get(r["backend_rid"], 0) >= 3
        ]
        if not ready:
            continue
        moved = [r for r in ready if len(r["hops"]) > 1]
        row = c.rng.choice(moved if moved and c.rng.random() < c.args.repeat_bias else ready)
        # Most moves go to live servers; some to the one that is down (they must fail cleanly too).
        avoid = {row["decode"]} | ({c.down} if c.down and c.rng.random() < 0.8 else set())
        here, left = row["decode"], [h for h in row["hops"][:-1] if h not in avoid]
        if left and c.rng.random() < c.args.back_bias:
            to = c.rng.choice(left)  # back to a server it left
        else:
            to = c.rng.choice([d for d in c.decode_names() if d not in avoid])
        c.moving.add(row["request_id"])
        task = asyncio.create_task(move(c, row["request_id"], here, to, list(row["hops"])))
        task.add_done_callback(lambda _t, rid=row["request_id"]: c.moving.discard(rid))


async def move(c: Chaos, rid: str, source: str, to: str, hops: list[str], chained: bool = False) -> None:
    """One `POST /ares/migrate` and its answer; after a committed one, now and then (`--chain-bias`) the next move
    of the same request at once (back where it came from or on to the third server), before its new server has
    even run it a step."""
    entry = {
        "chained": chained,
        "request_id": rid,
        "source": source,
        "target": to,
        "back": to in hops,
        "hops_before": len(hops) - 1,
        "t0": c.now(),
        "stopped": c.stopped,
        "down": c.down,
    }
    try:
        async with c.session.post(
            c.router + "/ares/migrate", json={"rid": rid, "to": to}, timeout=aiohttp.ClientTimeout(total=600)
        ) as r:
            raw = await r.read()
            entry["status"] = r.status
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = {"message": raw[:200].decode(errors="replace")}
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
        entry["status"], body = None, {"message": repr(e)}
    entry["t1"] = c.now()
    if "state" in body:  # the migration's record: it ran (committed or failed)
        entry.update(
            state=body["state"],
            reason=body.get("reason"),
            mid=body.get("mid"),
            total_ms=body.get("total_ms"),
            pause_ms=body.get("pause_ms"),
            kv_tokens=body.get("kv_tokens"),
            stages=body.get("stages"),
        )
    else:  # refused before it started (the request ended, already there, ...)
        entry.update(state="refused", reason=_error_text(orjson.dumps(body)))
    c.moves.append(entry)
    if entry["state"] == "committed" and not c.done.is_set() and c.rng.random() < c.args.chain_bias:
        then = c.rng.choice([d for d in c.decode_names() if d != to])
        await move(c, rid, to, then, [*hops, to], chained=True)


async def stopper(c: Chaos) -> None:
    """Now and then SIGSTOP a decode server for 5-20 s (one at a time, never the one that is down)."""
    lo, hi = c.args.stop_gap
    while not c.done.is_set():
        try:
            await asyncio.wait_for(c.done.wait(), c.rng.uniform(lo, hi))
            return
        except asyncio.TimeoutError:
            pass
        name = c.rng.choice([d for d in c.decode_names() if d != c.down])
        pid = c.cluster.pids.get(name)
        if pid is None:
            continue
        seconds = round(c.rng.uniform(*c.args.stop_seconds), 1)
        os.killpg(pid, signal.SIGSTOP)  # a process group this script started
        c.stopped = name
        c.event("SIGSTOP", server=name, seconds=seconds)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.killpg(pid, signal.SIGCONT)
            c.stopped = None
            c.event("SIGCONT", server=name)


async def killer(c: Chaos, n: int) -> None:
    """Once `--kill-at` of the requests finished: SIGKILL the decode server with the most requests (not the
    stopped one), note what it hit, restart it."""
    while c.finished < c.args.kill_at * n and not c.done.is_set():
        await asyncio.sleep(0.5)
    while not c.done.is_set():
        rows = await c.rows()
        counts = collections.Counter(r["decode"] for r in rows if r["decode"] != c.stopped)
        if counts:
            break
        await asyncio.sleep(0.5)
    else:
        return
    victim = counts.most_common(1)[0][0]
    before = rows
    c.down = victim
    await asyncio.to_thread(c.cluster.kill, victim)
    after = await c.rows()
    for r in before + after:
        if victim in (r["decode"], r["moving_to"]):
            c.crash_hit.add(r["request_id"])
    hit = sorted(c.crash_hit)
    c.event("SIGKILL", server=victim, requests_hit=len(hit))
    t = time.monotonic()
    await asyncio.to_thread(c.cluster.restart, victim)
    c.down = None
    c.event("restarted", server=victim, seconds=round(time.monotonic() - t, 1))


async def progress(c: Chaos, n: int) -> None:
    while not c.done.is_set():
        try:
            await asyncio.wait_for(c.done.wait(), 15)
        except asyncio.TimeoutError:
            pass
        states = collections.Counter(m["state"] for m in c.moves)
        print(
            f"[{c.now():7.1f}s] requests {c.finished}/{n} done, {c.launched - c.finished} running; moves: "
            f"{states['committed']} committed, {states['failed']} failed, {states['refused']} refused, "
            f"{len(c.moving)} in flight; stopped={c.stopped} down={c.down}",
            flush=True,
        )


async def run_pass(
    session: aiohttp.ClientSession,
    router: str,
    specs: list[Spec],
    model: str,
    concurrency: int,
    prefix: str,
    chaos: Chaos | None = None,
) -> dict[int, Outcome]:
    """Every spec through the router, `concurrency` at a time; in the chaos pass clients hang up as planned."""
    sem = asyncio.Semaphore(concurrency)
    out: dict[int, Outcome] = {}
    t0 = time.monotonic()

    async def one(spec: Spec) -> None:
        async with sem:
            if chaos is not None:
                chaos.launched += 1
            rid = f"{prefix}-{spec.index:04d}"
            task = asyncio.create_task(run_request(session, router, spec, model, rid))
            hang_up = spec.hang_up_s if chaos is not None else None
            done, _ = await asyncio.wait({task}, timeout=hang_up)
            if done:
                out[spec.index] = task.result()
            else:  # the client leaves: its connection closes, the router must abort it everywhere
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                out[spec.index] = Outcome(Answer(None, error="hung up"), time.monotonic() - hang_up, hung_up=True)
                out[spec.index].t1 = time.monotonic()
            if chaos is not None:
                chaos.finished += 1
            elif len(out) % 20 == 0:
                print(f"reference pass: {len(out)}/{len(specs)} ({time.monotonic() - t0:.0f} s)", flush=True)

    await asyncio.gather(*(one(s) for s in specs))
    return out


# -- the end: what is left ----------------------------------------------------------------------------------------
async def leftovers(session: aiohttp.ClientSession, decode_urls: list[str]) -> list[dict]:
    """Per decode server: KV tokens in use, running and queued requests (`/ares/state`) and the migration agent's
    own records (reserved KV, migrations not ended)."""
    rows = []
    for i, url in enumerate(decode_urls):
        row: dict = {"server": f"decode{i}"}
        try:
            async with session.get(url + "/ares/state", timeout=aiohttp.ClientTimeout(total=10)) as r:
                st = await r.json(content_type=None)
            row.update(used_tokens=st["used_tokens"], requests=len(st["requests"]), queued=st.get("queued_reqs"))
            mig = st.get("migration") or {}
            row.update(
                reserved_tokens=mig.get("reserved_tokens"), migrating_in=mig.get("in"), migrating_out=mig.get("out")
            )
            async with session.post(
                url + MIGRATE_CMD_PATH, json={"cmd": "status"}, timeout=aiohttp.ClientTimeout(total=10)
            ) as r:
                status = await r.json(content_type=None)
            live = ("attached", "reserved", "pulling", "precopy", "paused")
            row["agent_open_records"] = sum(v in live for k in ("incoming", "outgoing") for v in status[k].values())
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, KeyError) as e:
            row["error"] = repr(e)
        rows.append(row)
    return rows


def _kv_clean(rows: list[dict]) -> bool:
    """No KV in use, no request running or queued on any decode server."""
    return all(not r.get("error") and r["used_tokens"] == 0 and r["requests"] == 0 and not r["queued"] for r in rows)


def _clean(rows: list[dict]) -> bool:
    """`_kv_clean`, and no migration record left open in any agent."""
    return _kv_clean(rows) and not any(r.get("agent_open_records") for r in rows)


async def settle(session: aiohttp.ClientSession, decode_urls: list[str], limit_s: float) -> dict:
    """Leftovers right after the last request, then again until nothing is left or `limit_s` passed."""
    t0 = time.monotonic()
    first = await leftovers(session, decode_urls)
    last, kv_clean_s = first, None
    while True:
        if kv_clean_s is None and _kv_clean(last):
            kv_clean_s = round(time.monotonic() - t0, 1)
        if _clean(last) or time.monotonic() - t0 > limit_s:
            break
        await asyncio.sleep(1.0)
        last = await leftovers(session, decode_urls)
    return {
        "at_end": first,
        "settled": last,
        "kv_clean": _kv_clean(last),
        "seconds_to_kv_clean": kv_clean_s,
        "clean": _clean(last),
        "seconds_to_clean": round(time.monotonic() - t0, 1) if _clean(last) else None,
    }


async def router_counts(session: aiohttp.ClientSession, router: str) -> dict:
    """The router's `ares_migrations_total` by outcome and by (outcome, reason)."""
    async with session.get(router + "/metrics") as r:
        text = await r.text()
    by_outcome: collections.Counter = collections.Counter()
    by_reason: collections.Counter = collections.Counter()
    for line in text.splitlines():
        if not line.startswith("ares_migrations_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        fields = dict(p.split("=", 1) for p in labels[labels.index("{") + 1 : -1].split('",') if "=" in p)
        fields = {k: v.strip('"') for k, v in fields.items()}
        by_outcome[fields.get("outcome", "?")] += float(value)
        by_reason[f"{fields.get('outcome')}: {fields.get('reason')}"] += float(value)
    return {"by_outcome": dict(by_outcome), "by_reason": dict(by_reason)}


# -- report --------------------------------------------------------------------------------------------------------
def summarize(specs: list[Spec], refs: dict[int, Outcome], got: dict[int, Outcome], chaos: Chaos) -> dict:
    """Verdicts per request, moves, and the tables of the report."""
    committed = collections.Counter(m["request_id"] for m in chaos.moves if m["state"] == "committed")
    rows = []
    for s in sorted(specs, key=lambda s: s.index):
        rid = f"chaos-{s.index:04d}"
        ref, out = refs[s.index], got[s.index]
        if ref.answer.status != 200 or ref.answer.error or not ref.answer.complete:
            v, why = "no_reference", f"the reference run failed: {ref.answer.error or ref.answer.status}"
        else:
            v, why = verdict(out.answer, ref.answer, disconnected=out.hung_up, error_allowed=rid in chaos.crash_hit)
        rows.append(
            {
                "request_id": rid,
                "endpoint": s.endpoint,
                "stream": s.stream,
                "max_tokens": s.max_tokens,
                "moves": committed[rid],
                "crash_hit": rid in chaos.crash_hit,
                "hung_up": out.hung_up,
                "first_decode": out.decode,
                "seconds": round(out.t1 - out.t0, 2),
                "verdict": v,
                "why": why,
            }
        )
    counts = collections.Counter(r["verdict"] for r in rows)
    by_moves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_moves[str(min(r["moves"], 3)) + ("+" if r["moves"] >= 3 else "")][r["verdict"]] += 1
        by_kind[f"{r['endpoint']} {'stream' if r['stream'] else 'answer'}"][r["verdict"]] += 1
    states = collections.Counter(m["state"] for m in chaos.moves)
    failed_reasons = collections.Counter(_reason_class(m["reason"]) for m in chaos.moves if m["state"] == "failed")
    refused_reasons = collections.Counter(_reason_class(m["reason"]) for m in chaos.moves if m["state"] == "refused")
    repeat_failed = [m for m in chaos.moves if m["state"] == "failed" and m["hops_before"] >= 1]
    return {
        "verdicts": {v: counts.get(v, 0) for v in (*VERDICTS, "no_reference")},
        "verdicts_by_moves": {k: dict(v) for k, v in sorted(by_moves.items())},
        "verdicts_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "moves": {
            "attempted": len(chaos.moves),
            "committed": states["committed"],
            "failed": states["failed"],
            "refused": states["refused"],
            "committed_back_to_a_server_left": sum(m["state"] == "committed" and m["back"] for m in chaos.moves),
            "committed_while_a_server_was_stopped": sum(
                m["state"] == "committed" and bool(m["stopped"]) for m in chaos.moves
            ),
            "failed_reasons": dict(failed_reasons.most_common()),
            "refused_reasons": dict(refused_reasons.most_common()),
            "chained_at_once": dict(collections.Counter(m["state"] for m in chaos.moves if m.get("chained"))),
            "chained_failed_reasons": dict(
                collections.Counter(
                    _reason_class(m["reason"]) for m in chaos.moves if m.get("chained") and m["state"] != "committed"
                ).most_common()
            ),
            "failed_on_a_repeat_move": len(repeat_failed),
            "failed_on_a_repeat_move_reasons": dict(
                collections.Counter(_reason_class(m["reason"]) for m in repeat_failed).most_common()
            ),
        },
        "moves_per_request": dict(sorted(collections.Counter(r["moves"] for r in rows).items())),
        "requests_moved_twice_or_more": sum(r["moves"] >= 2 for r in rows),
        "requests": rows,
    }


def _reason_class(reason: str | None) -> str:
    """A move's reason without its ids and numbers (`decode2` -> `decodeN`), for counting."""
    if not reason:
        return "none"
    text = re.sub(r"\b[0-9a-f]{8,}\b", "<id>", reason)
    return re.sub(r"\d+", "N", text)[:160]


def targets(summary: dict, settled: dict) -> list[dict]:
    v = summary["verdicts"]
    kv = sum(r.get("used_tokens") or 0 for r in settled["settled"])  # reserved KV is inside used_tokens
    other = v["diverged"] + v["malformed"]
    values = {
        "lost": (v["lost"], v["lost"] == 0),
        "duplicated": (v["duplicated"], v["duplicated"] == 0),
        "truncated": (v["truncated"], v["truncated"] == 0),
        "kv_left": (kv, settled["kv_clean"] and kv == 0),
        "committed": (summary["moves"]["committed"], summary["moves"]["committed"] >= 50),
        "moved_twice": (summary["requests_moved_twice_or_more"], summary["requests_moved_twice_or_more"] >= 10),
        "other_failures": (other, other == 0),
    }
    return [{"target": name, "wanted": TARGETS[name], "value": val, "met": met} for name, (val, met) in values.items()]



def _verdict_table(key: str, counts: dict[str, dict[str, int]]) -> list[str]:
    """A markdown table: one row per `key` value, one column per verdict (request counts)."""
    return [
        f"| {key} | " + " | ".join(VERDICTS) + " |",
        "|---" * (len(VERDICTS) + 1) + "|",
        *(f"| {k} | " + " | ".join(str(c.get(v, 0)) for v in VERDICTS) + " |" for k, c in counts.items()),
    ]


def markdown(result: dict) -> str:
    """The report."""
    s, prov = result["summary"], result["provenance"]
    left = result["leftovers"]
    kv_clean = f"after {left['seconds_to_kv_clean']} s" if left["kv_clean"] else "**never**"
    clean = f"after {left['seconds_to_clean']} s" if left["clean"] else "**never**"
    lines = [
        f"# Migration chaos run (commit {prov['commit'][:10]}{' dirty' if prov['dirty'] else ''})",
        "",
        f"`{prov['command']}` on {result['device']}. {result['setup']}",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {t['wanted']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]),
        "",
        "## Verdicts",
        "",
        "| verdict | requests |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in s["verdicts"].items() if n or k in ("lost", "duplicated", "truncated")),
        "",
        "By committed moves of the request:",
        "",
        *_verdict_table("moves", s["verdicts_by_moves"]),
        "",
        "By endpoint:",
        "",
        *_verdict_table("endpoint", s["verdicts_by_kind"]),
        "",
        "## Moves",
        "",
    ]
    m = s["moves"]
    lines += [
        f"- `POST /ares/migrate` calls: {m['attempted']}: {m['committed']} committed, {m['failed']} failed (the "
        f"request went on where it was), {m['refused']} refused before starting.",
        f"- Committed back to a server the request had left: {m['committed_back_to_a_server_left']}; committed while "
        f"a server was SIGSTOPped: {m['committed_while_a_server_was_stopped']}.",
        f"- The router's `ares_migrations_total`: {result['router_migrations']['by_outcome']}.",
        f"- Moves per request (committed): {s['moves_per_request']}; requests moved twice or more: "
        f"{s['requests_moved_twice_or_more']}.",
        f"- Moves made at once after a commit (the request not yet run a step on its new server): "
        f"{m['chained_at_once']}; not committed because: {m['chained_failed_reasons']}.",
        f"- Failed moves of a request that had moved before: {m['failed_on_a_repeat_move']} "
        f"({m['failed_on_a_repeat_move_reasons']}).",
        "",
        "| failed because | moves |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in m["failed_reasons"].items()),
        "",
        "| refused because | calls |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in m["refused_reasons"].items()),
        "",
        "## Faults injected",
        "",
        "| t (s) | event | detail |",
        "|---|---|---|",
        *(
            f"| {e['t']:.1f} | {e['event']} | "
            + ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("t", "event"))
            + " |"
            for e in result["faults"]
        ),
        "",
        f"Clients that hung up: {s['verdicts']['disconnected']}.",
        "",
        "## Left on the decode servers",
        "",
        f"No KV, running or queued request left {kv_clean}; no migration record open in any agent {clean} "
        f"(waited up to {result['inputs']['settle_s']} s).",
        "",
        "| server | when | used KV tokens | reserved KV tokens | running | queued | agent records open |",
        "|---|---|---|---|---|---|---|",
    ]
    for when in ("at_end", "settled"):
        for r in result["leftovers"][when]:
            lines.append(
                f"| {r['server']} | {when.replace('_', ' ')} | {r.get('used_tokens')} | "
                f"{r.get('reserved_tokens')} | {r.get('requests')} | {r.get('queued')} | "
                f"{r.get('agent_open_records')} |"
            )
    bad = [r for r in s["requests"] if r["verdict"] not in OK_VERDICTS]
    lines += ["", "## Requests that failed", ""]
    if not bad:
        lines.append("None.")
    else:
        lines += ["| request | endpoint | stream | moves | crash hit | verdict | why |", "|---" * 7 + "|"]
        lines += [
            f"| {r['request_id']} | {r['endpoint']} | {r['stream']} | {r['moves']} | {r['crash_hit']} | "
            f"{r['verdict']} | {r['why']} |"
            for r in bad
        ]
    errors = [r for r in s["requests"] if r["verdict"] == "clean_error"]
    if errors:
        lines += [
            "",
            "## Clean errors (requests the crash hit)",
            "",
            "| request | endpoint | stream | why |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['request_id']} | {r['endpoint']} | {r['stream']} | {r['why']} |" for r in errors]
    lines += ["", f"Timings: {result['timings']}."]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------------------------
async def chaos_main(cluster: Cluster, specs: list[Spec], args: argparse.Namespace) -> dict:
    router = cluster.router_url
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=args.request_timeout)
    ) as session:
        async with session.get(router + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        t0 = time.monotonic()
        print(f"reference pass: {len(specs)} requests, nothing moved", flush=True)
        refs = await run_pass(session, router, specs, model, args.ref_concurrency, "ref")
        t_ref = time.monotonic() - t0
        settled_ref = await settle(session, cluster.decode_urls, 60)
        if not settled_ref["clean"]:
            print(f"warning: the servers were not clean after the reference pass: {settled_ref['settled']}")
        chaos = Chaos(cluster, router, session, random.Random(args.seed + 1), args)
        print(f"chaos pass: {len(specs)} requests, {args.concurrency} at a time", flush=True)
        helpers = [
            asyncio.create_task(f)
            for f in (mover(chaos), stopper(chaos), killer(chaos, len(specs)), progress(chaos, len(specs)))
        ]
        got = await run_pass(session, router, specs, model, args.concurrency, "chaos", chaos)
        t_chaos = chaos.now()
        chaos.done.set()
        for h in helpers:
            await h  # the stopper resumes its server; the killer waits for the restart
        while chaos.moving:
            await asyncio.sleep(0.2)
        t1 = time.monotonic()
        settled = await settle(session, cluster.decode_urls, args.settle)
        counts = await router_counts(session, router)
        return {
            "refs": refs,
            "got": got,
            "chaos": chaos,
            "settled": settled,
            "router_counts": counts,
            "settled_after_reference": settled_ref,
            "model": model,
            "timings": {
                "reference_s": round(t_ref, 1),
                "chaos_s": round(t_chaos, 1),
                "settle_s": round(time.monotonic() - t1, 1),
            },
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=None, help="requests (default 200; --quick: 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmark/results/migration_chaos; --quick: .ares/migration_chaos_quick)",
    )
    ap.add_argument("--quick", action="store_true", help="30 short requests, one short stop (a smoke run)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests at once in the chaos pass")
    ap.add_argument("--ref-concurrency", type=int, default=32, help="requests at once in the reference pass")
    ap.add_argument(
        "--tokens",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="output tokens per request, uniform (default 32 160; --quick: 32 128)",
    )
    ap.add_argument("--hang-up-fraction", type=float, default=0.06, help="clients that hang up after 2-12 s")
    ap.add_argument(
        "--move-interval",
        type=float,
        nargs=2,
        default=(0.3, 2.0),
        metavar=("MIN", "MAX"),
        help="seconds between move attempts, uniform",
    )
    ap.add_argument("--moves-in-flight", type=int, default=3, help="move calls at once at most")
    ap.add_argument("--repeat-bias", type=float, default=0.6, help="chance to pick a request that moved already")
    ap.add_argument("--back-bias", type=float, default=0.4, help="chance to send a moved request to a server it left")
    ap.add_argument("--chain-bias", type=float, default=0.15, help="chance to move again at once after a commit")
    ap.add_argument(
        "--stop-gap",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="seconds between SIGSTOPs (default 20 45; --quick: 15 25)",
    )
    ap.add_argument("--stop-seconds", type=float, nargs=2, default=(5.0, 20.0), metavar=("MIN", "MAX"))
    ap.add_argument("--kill-at", type=float, default=0.3, help="SIGKILL once this fraction of requests finished")
    ap.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the servers to be clean")
    ap.add_argument("--request-timeout", type=float, default=900.0, help="client timeout per request (s)")
    ap.add_argument("--max-total-tokens", type=int, default=8192, help="KV pool per decode server")
    args = ap.parse_args()
    n = args.requests or (30 if args.quick else 200)
    args.tokens = tuple(args.tokens or ((32, 128) if args.quick else (32, 160)))
    args.stop_gap = tuple(args.stop_gap or ((15.0, 25.0) if args.quick else (20.0, 45.0)))
    out = args.out or (
        ROOT / ".ares" / "migration_chaos_quick" if args.quick else ROOT / "benchmark" / "results" / "migration_chaos"
    )
    prov = record(ROOT)
    specs = make_specs(n, args.seed, args.tokens, args.hang_up_fraction)
    spec = ClusterSpec(
        model_path=str(prepare_model("smollm2")),
        n_prefill=1,
        n_decode=3,
        ares=True,
        max_total_tokens=args.max_total_tokens,
        router="ares",
        router_policy="round_robin",
    )
    log_dir = ROOT / ".ares" / "migration_chaos_logs"
    t0 = time.monotonic()
    print(f"starting 1 prefill + 3 decode servers and the router (logs: {log_dir})", flush=True)
    with Cluster(spec, log_dir=log_dir) as cluster:
        print(f"cluster up in {time.monotonic() - t0:.0f} s", flush=True)
        res = asyncio.run(chaos_main(cluster, specs, args))
    chaos: Chaos = res["chaos"]
    summary = summarize(specs, res["refs"], res["got"], chaos)
    result = {
        "benchmark": "migration_chaos",
        "provenance": prov,
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU",
        "setup": "1 prefill + 3 `--ares` decode servers (SmolLM2-135M-Instruct, CPU, Mooncake TCP on loopback), the "
        "ARES router (round robin, rebalancer off: every move is the script's).",
        "inputs": {
            "model": res["model"],
            "requests": n,
            "seed": args.seed,
            "quick": args.quick,
            "concurrency": args.concurrency,
            "ref_concurrency": args.ref_concurrency,
            "tokens": list(args.tokens),
            "endpoints": list(ENDPOINTS),
            "hang_up_fraction": args.hang_up_fraction,
            "hang_ups_planned": sum(s.hang_up_s is not None for s in specs),
            "move_interval_s": list(args.move_interval),
            "moves_in_flight": args.moves_in_flight,
            "repeat_bias": args.repeat_bias,
            "back_bias": args.back_bias,
            "chain_bias": args.chain_bias,
            "stop_gap_s": list(args.stop_gap),
            "stop_seconds": list(args.stop_seconds),
            "kill_at": args.kill_at,
            "settle_s": args.settle,
            "max_total_tokens": args.max_total_tokens,
            "cluster_spec": {k: v for k, v in asdict(spec).items() if k != "python"},
        },
        "timings": res["timings"],
        "targets": targets(summary, res["settled"]),
        "summary": summary,
        "router_migrations": res["router_counts"],
        "faults": chaos.events,
        "crash_hit": sorted(chaos.crash_hit),
        "leftovers": res["settled"],
        "leftovers_after_reference": res["settled_after_reference"],
        "moves": chaos.moves,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "migration_chaos.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "migration_chaos.md").write_text(md)
    print(md)
    print(f"written under {out}")


if __name__ == "__main__":
    main()
