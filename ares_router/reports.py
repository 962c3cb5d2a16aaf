"""What decode servers report about their load, and how the router reads it (`parse_ares_state`,
`parse_v1_loads`, `parse_models`); the poller (`ares_router/poller.py`) asks, this module reads.

The schema of `/ares/state` (both versions) is in `ares_router.wire`.
"""

from __future__ import annotations

import binascii
from typing import Any

import numpy as np

from ares_router.policy import admission_mode
from ares_router.state import DecodeLoad


class BadPayload(ValueError):
    """A server answered 200 with JSON the router cannot read."""


def _col(rows: list[dict], key: str, required: bool) -> np.ndarray:
    vals = [r[key] if required else r.get(key) for r in rows]
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)


def parse_ares_state(data: Any) -> DecodeLoad:
    """A `DecodeLoad` from an `/ares/state` body of either version (schemas in the module docstring)."""
    version = data.get("version", 1) if isinstance(data, dict) else None
    if version == 2:
        return _parse_columns(data)
    if version == 1:
        return _parse_rows(data)
    raise BadPayload(f"bad /ares/state payload: unsupported version {version!r} (this router reads 1 and 2)")


def _parse_rows(data: dict) -> DecodeLoad:
    try:
        rows = data["requests"]
        if not isinstance(rows, list):
            raise TypeError("'requests' must be a list")
        prompt, generated = _col(rows, "prompt_tokens", True), _col(rows, "generated_tokens", True)
        _check_counts(prompt, generated)
        return DecodeLoad(
            capacity_tokens=int(data["capacity_tokens"]),
            used_tokens=int(data["used_tokens"]),
            running_reqs=len(rows),
            queued_reqs=int(data.get("queued_reqs", 0)),
            source="ares_state",
            rids=tuple(str(r["rid"]) for r in rows),
            prompt_tokens=prompt,
            generated_tokens=generated,
            predicted_remaining=_col(rows, "predicted_remaining", False),
            predicted_p90=_col(rows, "predicted_p90", False),
            kv_bytes_per_token=_kv_bytes_per_token(data),
            admission=admission_mode(data),  # the server's own rule: the snapshot admits by it
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadPayload(f"bad /ares/state payload: {e!r}") from None


def _kv_bytes_per_token(data: dict) -> float | None:
    """KV bytes per token from the optional migration block (servers that migrate report it)."""
    value = (data.get("migration") or {}).get("kv_bytes_per_token")
    return None if value is None else float(value)


def _check_counts(*cols: np.ndarray) -> None:
    for c in cols:
        if c.size and not (np.isfinite(c).all() and (c >= 0).all()):
            raise ValueError("prompt_tokens and generated_tokens must be non-negative numbers")


# The binary form's element types (little-endian): token counts int32, predictions float32.
_COLUMN_DTYPE = {
    "prompt_tokens": np.dtype("<i4"),
    "generated_tokens": np.dtype("<i4"),
    "predicted_remaining": np.dtype("<f4"),
    "predicted_p90": np.dtype("<f4"),
}


def _array(data: dict, key: str, n: int, required: bool) -> np.ndarray:
    """Column `key` (schema version 2: base64 little-endian binary, or a JSON array) as float64 with exactly `n`
    values; null -> NaN. An optional column may be null or absent (all NaN)."""
    v = data[key] if required else data.get(key)
    if v is None and not required:
        return np.full(n, np.nan)
    if isinstance(v, str):
        dtype = _COLUMN_DTYPE[key]
        try:
            raw = binascii.a2b_base64(v)
        except binascii.Error as e:
            raise ValueError(f"'{key}' is not valid base64: {e}") from None
        if len(raw) != n * dtype.itemsize:
            raise ValueError(f"'{key}' must hold {n} {dtype.name} values ({n * dtype.itemsize} bytes), got {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).astype(np.float64)
    if not isinstance(v, list) or len(v) != n:
        raise ValueError(f"'{key}' must be a base64 string or a list of {n} numbers (one per rid)")
    # numpy converts the whole list in C; null becomes NaN, a string or a nested list raises.
    return np.array(v, dtype=np.float64)


def _parse_columns(data: dict) -> DecodeLoad:
    try:
        rids = data["rids"]
        if not isinstance(rids, list):
            raise TypeError("'rids' must be a list of strings")
        "".join(rids)  # a TypeError unless every rid is a string: checked in C, not per row in Python
        n = len(rids)
        prompt = _array(data, "prompt_tokens", n, True)
        generated = _array(data, "generated_tokens", n, True)
        _check_counts(prompt, generated)
        return DecodeLoad(
            capacity_tokens=int(data["capacity_tokens"]),
            used_tokens=int(data["used_tokens"]),
            running_reqs=n,
            queued_reqs=int(data.get("queued_reqs") or 0),
            source="ares_state",
            rids=tuple(rids),
            prompt_tokens=prompt,
            generated_tokens=generated,
            predicted_remaining=_array(data, "predicted_remaining", n, False),
            predicted_p90=_array(data, "predicted_p90", n, False),
            kv_bytes_per_token=_kv_bytes_per_token(data),
            admission=admission_mode(data),  # the server's own rule: the snapshot admits by it
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadPayload(f"bad /ares/state payload (version 2): {e!r}") from None


def parse_models(data: Any) -> frozenset[str]:
    """Model ids from a `/v1/models` body (`{"data": [{"id": ...}, ...]}`) or `/server_info`
    (`{"served_model_name": ...}`)."""
    try:
        if "data" in data:
            return frozenset(str(m["id"]) for m in data["data"])
        return frozenset([str(data["served_model_name"])])
    except (KeyError, TypeError) as e:
        raise BadPayload(f"bad model list: {e!r}") from None


def parse_v1_loads(data: Any) -> DecodeLoad:
    """A `DecodeLoad` from SGLang's `/v1/loads` body, summed over its DP ranks."""
    try:
        loads = data["loads"]
        cap = sum(int(x["max_total_num_tokens"]) for x in loads)
        used = sum(int(x["num_used_tokens"]) for x in loads)
        running = sum(int(x["num_running_reqs"]) for x in loads)
        queued = 0
        for x in loads:
            queued += int(x.get("num_waiting_reqs", 0))
            disagg = x.get("disaggregation") or {}
            for key in ("decode_prealloc_queue_reqs", "decode_transfer_queue_reqs", "decode_retracted_queue_reqs"):
                queued += int(disagg.get(key, 0))
        return DecodeLoad(cap, used, running, queued, source="v1_loads")
    except (KeyError, TypeError, ValueError) as e:
        raise BadPayload(f"bad /v1/loads payload: {e!r}") from None
