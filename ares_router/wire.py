"""What crosses the process boundary between the ARES router and ARES decode servers, in one place: the paths, a
migration's wire constants, the `/ares/state` schema, and which requests can migrate. The router (`poller`,
`reports`, `migration`, `relay`, `splice`, `migration_control`) and the servers' side (`ares.engine.http_routes`,
`ares.migration.agent`) import them from here; neither side spells them again.

Live migration on the wire: `MIGRATE_CMD_PATH` is the command endpoint of every `--ares` decode server (behind
SGLang's admin key when the server has one), `MID_PARAM` the `custom_params` key that marks the router's copy of a
moving request on its target, `MIGRATED_PREFIX` the start of the finish message that ends a request's stream on a
server it left (`ares_migrated:<mid>`; the router never lets it reach a client).

`/ares/state` is served by decode servers started with `--ares`. The router always asks with `?format=columns` and
reads whichever version the body declares, so a server that only knows version 1 (and ignores the query) keeps
working. Unknown keys are ignored in both versions.

Version 1 (rows; what `GET /ares/state` without the query returns):

    {"version": 1,
     "capacity_tokens": int,     # KV pool size in tokens
     "used_tokens": int,         # KV tokens in use now
     "queued_reqs": int,         # waiting, preallocating, transferring or retracted requests (optional, default 0)
     "migration": {"version": 1, "reserved_tokens": int, "in": int, "out": int,   # optional: servers that
                   "kv_bytes_per_token": float},                                # migrate (the router reads the last)
     "requests": [               # running requests
        {"rid": str,
         "prompt_tokens": int,
         "generated_tokens": int,
         "predicted_remaining": float | null,   # the length head's prediction of tokens still to come
         "predicted_p90": float | null}]}       # optional upper quantile of the same

Version 2 (columns; the answer to `GET /ares/state?format=columns`): the same numbers, one entry per field, so the
router turns each field into a numpy array in one call instead of building a Python dict per request (at 256
instances x 256 running requests, version 1 costs more than a 100 ms poll interval allows on one core):

    {"version": 2,
     "capacity_tokens": int,
     "used_tokens": int,
     "queued_reqs": int,              # optional, default 0
     "migration": {...},              # optional, as in version 1
     "rids": [str, ...],              # the n running requests, any order; row k of every column is rids[k]
     "prompt_tokens": COLUMN,         # n token counts (int32)
     "generated_tokens": COLUMN,      # n token counts (int32)
     "predicted_remaining": COLUMN,   # n predictions (float32); NaN/null: no prediction yet for that request.
                                      #   The key may also be null or absent: no predictions at all (no head)
     "predicted_p90": COLUMN}         # optional, as predicted_remaining

    COLUMN = a base64 string (RFC 4648, with padding) of the n values as little-endian binary: int32 (`<i4`) for
             the two token counts, float32 (`<f4`) for the predictions, NaN for "no prediction"; this is the fast
             form: numpy.frombuffer, no Python object per value. Server side, e.g.
             base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
           | a JSON array of n numbers (null for "no prediction"): the readable form, same meaning, ~5x slower to
             read (one Python object per value).

Every column has exactly n values (n = 0: "" or []); token counts must be finite and >= 0; a body that breaks this
is a bad poll (`BadPayload`), like a missing key.
"""

from __future__ import annotations

from ares_router.protocol import GENERATE

STATE_PATH = "/ares/state"
STATE_QUERY = "?format=columns"  # asks for version 2; a version-1 server ignores it
MIGRATE_CMD_PATH = "/ares/migrate/cmd"
MID_PARAM = "ares_mid"
MIGRATED_PREFIX = "ares_migrated:"

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MIGRATABLE_ENDPOINTS = (GENERATE, COMPLETIONS, CHAT)


def not_migratable(endpoint: str, body: dict) -> str | None:
    """Why a request to `endpoint` with this body cannot move (state that lives in A's HTTP handler, or several
    requests behind one id), or None. What lives in A's scheduler (grammar, logprobs, penalties) A checks itself."""
    if endpoint not in MIGRATABLE_ENDPOINTS:
        return f"requests to {endpoint} cannot migrate (only {', '.join(MIGRATABLE_ENDPOINTS)})"
    if endpoint == GENERATE:
        return None
    if (body.get("n") or 1) != 1:
        return "n > 1 (several choices behind one id)"
    if body.get("echo"):
        return "echo (B would echo the prompt again)"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "logprobs"
    if body.get("tools") or body.get("functions"):
        return "tools (the tool-call parser's state lives in A's handler)"
    if body.get("response_format") or body.get("regex") or body.get("ebnf") or body.get("json_schema"):
        return "constrained decoding"
    return None
