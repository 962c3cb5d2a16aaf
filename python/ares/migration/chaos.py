"""Verdicts of the migration chaos benchmark (`benchmark/migration_chaos.py`): what one client got for a greedy
request, against the unmigrated greedy answer of the same request. Pure: no I/O.

A greedy (temperature 0, `ignore_eos`) answer does not depend on where it ran or how often it moved, so anything but
the reference answer, token for token, with the same count and finish, is a fault of the path, unless the request
ended with an error the client was told about and the fault injected explains it (it ran on the server that was
killed) or the client itself left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Verdicts. OK ones first; every other one is a failure of the migration path (or of the cluster under faults).
IDENTICAL = "identical"
CLEAN_ERROR = "clean_error"  # an error the client was told about, on a request the injected crash hit
DISCONNECTED = "disconnected"  # the client left on purpose
LOST = "lost"  # no answer, an error on a request no crash hit, or tokens missing from the middle
DUPLICATED = "duplicated"  # more tokens than the reference, or a stream whose count stepped back
TRUNCATED = "truncated"  # an answer that looks complete but stops early
DIVERGED = "diverged"  # different tokens (same, or no prefix relation)
MALFORMED = "malformed"  # the right tokens, but a wrong count, finish, id, or an internal message shown
VERDICTS = (IDENTICAL, CLEAN_ERROR, DISCONNECTED, LOST, DUPLICATED, TRUNCATED, DIVERGED, MALFORMED)
OK_VERDICTS = frozenset({IDENTICAL, CLEAN_ERROR, DISCONNECTED})


@dataclass
class Answer:
    """What a client received for one request (or the reference run of it)."""

    status: int | None  # HTTP status; None: no response at all (connection failed, client timeout)
    text: str = ""  # the answer's text (a stream's deltas joined; `/generate`: the last cumulative text)
    tokens: list[int] | None = None  # `/generate`'s output ids (None on the OpenAI endpoints: text only)
    completion_tokens: int | None = None  # the count the answer states (usage / meta_info)
    finish: str | None = None  # the finish reason's type: "length", "stop", "abort", ...
    error: str | None = None  # an error the client was told: HTTP error, in-band error event, abort with a status
    complete: bool = True  # a stream reached `[DONE]` (a non-streamed answer is complete when it arrived)
    internal: bool = False  # the router's internal migration message reached the client
    ids: int = 1  # distinct response ids in a stream (must be 1)
    finishes: int = 1  # stream events carrying a finish reason (must be 1)
    stepped_back: bool = False  # a stream's cumulative output shrank or changed (a repeated or replaced token)

    def sequence(self, by_tokens: bool) -> Sequence:
        """What is compared with the reference: token ids where both have them, else the text."""
        return (self.tokens or []) if by_tokens else self.text


def relation(got: Sequence, ref: Sequence) -> str:
    """How `got` relates to `ref`: equal | prefix (a strict prefix) | longer (`ref` is a strict prefix of it, or
    it is just longer) | gapped (shorter, `ref` with pieces missing) | diverged."""
    if len(got) == len(ref) and list(got) == list(ref):
        return "equal"
    if len(got) < len(ref):
        if list(got) == list(ref[: len(got)]):
            return "prefix"
        return "gapped" if _subsequence(got, ref) else "diverged"
    if list(got[: len(ref)]) == list(ref) or _subsequence(ref, got):
        return "longer"
    return "diverged"


def _subsequence(small: Sequence, big: Sequence) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def verdict(got: Answer, ref: Answer, *, disconnected: bool = False, error_allowed: bool = False) -> tuple[str, str]:
    """(verdict, why) of `got` against the reference `ref` (which must be a complete 200 answer).
    `disconnected`: the client left on purpose; `error_allowed`: the injected crash hit this request (it ran on,
    or was moving to or from, the killed server), so an error it was told about is the expected outcome."""
    if disconnected:
        return DISCONNECTED, "the client left"
    if got.status is None:
        return LOST, got.error or "no answer"
    error = got.error or (f"HTTP {got.status}" if got.status >= 400 else None)
    by_tokens = got.tokens is not None and ref.tokens is not None
    rel = relation(got.sequence(by_tokens), ref.sequence(by_tokens))
    unit = "tokens" if by_tokens else "characters"
    sizes = f"{len(got.sequence(by_tokens))} of {len(ref.sequence(by_tokens))} {unit}"
    if got.stepped_back:
        return DUPLICATED, "the stream's cumulative output stepped back"
    if error is not None and rel in ("equal", "prefix"):  # what arrived is right; the end is an error it saw
        if error_allowed:
            return CLEAN_ERROR, f"{error} ({sizes})"
        return LOST, f"error on a request the crash did not hit: {error} ({sizes})"
    if rel == "longer":
        return DUPLICATED, sizes
    if rel == "gapped":
        return LOST, f"tokens missing from the middle: {sizes}"
    if rel == "diverged":
        at = _first_difference(got.sequence(by_tokens), ref.sequence(by_tokens))
        return DIVERGED, f"{sizes}, first difference at {at}"
    if rel == "prefix":
        why = "the internal migration finish reached the client" if got.internal else f"finish {got.finish}"
        return TRUNCATED, f"{sizes}, {why}" + ("" if got.complete else ", no [DONE]")
    # Equal content, no error: the rest of the answer must be the reference's too.
    wrong = []
    if got.completion_tokens != ref.completion_tokens:
        wrong.append(f"completion_tokens {got.completion_tokens} != {ref.completion_tokens}")
    if got.finish != ref.finish:
        wrong.append(f"finish {got.finish} != {ref.finish}")
    if got.internal:
        wrong.append("the internal migration message reached the client")
    if got.ids != 1:
        wrong.append(f"{got.ids} response ids")
    if got.finishes != 1:
        wrong.append(f"{got.finishes} finish events")
    if not got.complete:
        wrong.append("no [DONE]")
    return (MALFORMED, "; ".join(wrong)) if wrong else (IDENTICAL, sizes)


def _first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))
