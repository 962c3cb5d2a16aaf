"""Helpers shared by the tests that drive real servers: plain HTTP calls, waiting for a condition, and an extra
`python -m ares_router` process on a free port, stopped by PID (`ares.cluster.router_proc`)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from ares.cluster import router_proc

HOST = "127.0.0.1"


def request(url: str, body: object = None, headers: dict | None = None, timeout: float = 120.0):
    """(status, headers, body bytes) of a GET (body None) or POST (JSON body, or raw bytes)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str, timeout: float = 30.0) -> Any:
    """The JSON body of a GET that must answer 200."""
    status, _, body = request(url, timeout=timeout)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def stream_events(url: str, body: dict, timeout: float = 600.0) -> Iterator[dict]:
    """POST `body` with `"stream": true` and yield each `data:` event of the server-sent stream as JSON, up to
    `[DONE]`. The caller reads at its own pace; the server keeps generating meanwhile."""
    req = urllib.request.Request(
        url, data=json.dumps({**body, "stream": True}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.status == 200, r.status
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[len(b"data:") :].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` seconds pass (AssertionError).
    Tests wait for conditions this way, never for a fixed time: CI machines are busy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


ares_router = router_proc.policy_router  # tests start their routers the way benchmarks do
