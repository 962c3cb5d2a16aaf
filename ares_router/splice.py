"""One response out of a request's parts on every server it ran on (hop 0 on A, hop 1 on B, hop 2 on C, ...).

The relay (`ares_router.relay`) passes the first hop's stream through as bytes while no move of the request is
pending. Once one is, it hands each event to the request's `Splicer`. A hop ends when its server, told by the
router after the next server's commit, finishes the request with a graceful `abort` (`/generate`: the message
`ares_migrated:<mid>`; the OpenAI endpoints only say `"abort"`, so there the committed move from that hop tells).
That end event loses its finish (it may still carry the hop's last text), every later event of the hop (usage,
`[DONE]`) is dropped, and the next hop's events follow, rewritten to continue the earlier ones: one stream, the
first hop's id, every token once, the last server's finish and usage (each server's counts include the tokens of
the hops before: its request carries them). Non-streaming answers are joined across every hop the same way.

Per endpoint, what is cumulative differs: SGLang's `/generate` text and `output_ids` are cumulative per server, so
a later hop's are prefixed with those of every hop before. The prefix is kept as already-encoded JSON and spliced
into each event's bytes, so an event costs the work of its own hop's part, not of everything before it. OpenAI
streams carry deltas: later hops' deltas go out as they are, without their opening role-only chunk, under the
first hop's `id` and `created`.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from ares_router.wire import CHAT, COMPLETIONS, MIGRATED_PREFIX

# Stand-ins for the spliced fields while an event is encoded (then replaced by the joined bytes): random, so no
# text a model writes can be one.
_MARK = uuid.uuid4().hex
_TEXT_MARK = f"ares-text-{_MARK}"
_IDS_MARK = f"ares-ids-{_MARK}"


def _finish(obj: dict) -> Any:
    choices = obj.get("choices")
    return choices[0].get("finish_reason") if isinstance(choices, list) and choices else None


_dumps = orjson.dumps


class Splicer:
    """The rewriting of one request's response across its hops; `for_endpoint` picks the endpoint's kind. `hop`
    is the hop whose events it is given now."""

    def __init__(self) -> None:
        self.hop = 0

    @staticmethod
    def for_endpoint(endpoint: str) -> Splicer:
        """The splicer for a request to `endpoint`."""
        return {CHAT: ChatSplicer, COMPLETIONS: CompletionSplicer}.get(endpoint, GenerateSplicer)()

    def ends_hop(self, obj: dict) -> bool:
        """Whether `obj` (an event or a whole answer) looks like the graceful end of a hop whose request moved on
        (the caller confirms with the committed move, `migration_id` naming it where the endpoint says)."""
        raise NotImplementedError

    def migration_id(self, obj: dict) -> str | None:
        """The id of the move that ended the hop, where the end event names it (`/generate`), else None."""
        return None

    def is_internal(self, obj: dict) -> bool:
        """Whether `obj` carries the router's internal finish message (it must never reach a client)."""
        return False

    def end_hop(self, obj: dict) -> bytes | None:
        """The current hop's end event, encoded for the client without its finish (None: nothing to relay);
        the next events belong to the next hop."""
        raise NotImplementedError

    def event(self, obj: dict, raw: bytes) -> bytes | None:
        """One event of the current hop (`raw`: its JSON as received), encoded for the client (None: drop it)."""
        raise NotImplementedError

    def answer(self, parts: list[dict]) -> dict:
        """The whole non-streaming answer out of each hop's answer, in hop order."""
        raise NotImplementedError


class GenerateSplicer(Splicer):
    """SGLang's `/generate`: cumulative `text` and `output_ids` per server; `meta_info` (counts, finish) from the
    last server, under the first hop's id."""

    def __init__(self) -> None:
        super().__init__()
        self.request_id: str | None = None  # the first hop's `meta_info.id`
        self._text = b""  # the text of the hops before, JSON-escaped, no quotes
        self._ids = b""  # their output ids, JSON, no brackets

    @staticmethod
    def _message(obj: dict) -> str:
        fin = (obj.get("meta_info") or {}).get("finish_reason")
        return str(fin.get("message") or "") if isinstance(fin, dict) else ""

    def ends_hop(self, obj: dict) -> bool:
        return self._message(obj).startswith(MIGRATED_PREFIX)

    def migration_id(self, obj: dict) -> str | None:
        message = self._message(obj)
        return message[len(MIGRATED_PREFIX) :] if message.startswith(MIGRATED_PREFIX) else None

    def is_internal(self, obj: dict) -> bool:
        return self.ends_hop(obj)

    def _remember_id(self, obj: dict) -> None:
        if self.hop == 0 and self.request_id is None:
            self.request_id = (obj.get("meta_info") or {}).get("id")

    def _continued(self, obj: dict) -> bytes:
        """`obj` of hop > 0 with the earlier hops' text and ids in front, as JSON bytes."""
        out = dict(obj)
        meta = obj.get("meta_info")
        if isinstance(meta, dict) and self.request_id is not None:
            out["meta_info"] = {**meta, "id": self.request_id}
        text = ids = None
        if "text" in obj:
            text, out["text"] = _dumps(obj.get("text") or "")[1:-1], _TEXT_MARK
        if "output_ids" in obj:
            ids, out["output_ids"] = _dumps(list(obj.get("output_ids") or []))[1:-1], _IDS_MARK
        raw = _dumps(out)
        if text is not None:
            raw = raw.replace(f'"{_TEXT_MARK}"'.encode(), b'"' + self._text + text + b'"', 1)
        if ids is not None:
            joined = self._ids + b"," + ids if self._ids and ids else self._ids or ids
            raw = raw.replace(f'"{_IDS_MARK}"'.encode(), b"[" + joined + b"]", 1)
        return raw

    def event(self, obj: dict, raw: bytes) -> bytes | None:
        self._remember_id(obj)
        return raw if self.hop == 0 else self._continued(obj)

    def end_hop(self, obj: dict) -> bytes | None:
        self._remember_id(obj)
        meta = dict(obj.get("meta_info") or {})
        meta["finish_reason"] = None
        out = self._continued({**obj, "meta_info": meta})
        # This hop's cumulative text and ids (its last event has them all) join the prefix of the next hops.
        text = _dumps(obj.get("text") or "")[1:-1]
        ids = _dumps(list(obj.get("output_ids") or []))[1:-1]
        self._text += text
        self._ids = self._ids + b"," + ids if self._ids and ids else self._ids or ids
        self.hop += 1
        return out

    def answer(self, parts: list[dict]) -> dict:
        last = parts[-1]
        meta = dict(last.get("meta_info") or {})
        first_id = (parts[0].get("meta_info") or {}).get("id")
        if first_id is not None:
            meta["id"] = first_id
        return {
            **last,
            "text": "".join(p.get("text") or "" for p in parts),
            "output_ids": [i for p in parts for i in (p.get("output_ids") or [])],
            "meta_info": meta,
        }


class _OpenAISplicer(Splicer):
    """OpenAI streams carry deltas: later hops' go out as they are, under the first hop's `id` and `created`."""

    def __init__(self) -> None:
        super().__init__()
        self.first_id: str | None = None
        self.created: int | None = None

    def ends_hop(self, obj: dict) -> bool:
        return _finish(obj) == "abort"

    def _remember(self, obj: dict) -> None:
        if self.hop == 0 and self.first_id is None:
            self.first_id, self.created = obj.get("id"), obj.get("created")

    def _as_first(self, obj: dict) -> dict:
        out = dict(obj)
        if self.first_id is not None:
            out["id"] = self.first_id
        if self.created is not None:
            out["created"] = self.created
        return out

    def _source_end(self, obj: dict) -> dict | None:
        raise NotImplementedError

    def _later(self, obj: dict) -> dict | None:
        """An event of hop > 0 as the client gets it (None: drop it)."""
        return self._as_first(obj)

    def event(self, obj: dict, raw: bytes) -> bytes | None:
        self._remember(obj)
        if self.hop == 0:
            return raw
        out = self._later(obj)
        return None if out is None else _dumps(out)

    def end_hop(self, obj: dict) -> bytes | None:
        self._remember(obj)
        out = self._source_end(obj)
        self.hop += 1
        return None if out is None else _dumps(self._as_first(out))


class ChatSplicer(_OpenAISplicer):
    """`/v1/chat/completions`: SGLang's stream opens with a role-only delta and ends with a finish-only chunk."""

    def _source_end(self, obj: dict) -> dict | None:
        choice = obj["choices"][0]
        delta = choice.get("delta") or {}
        if not delta.get("content"):
            return None  # the usual finish-only chunk
        return {**obj, "choices": [{**choice, "finish_reason": None}]}

    def _later(self, obj: dict) -> dict | None:
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            delta = choices[0].get("delta") or {}
            if delta.get("role") and not delta.get("content") and not delta.get("reasoning_content"):
                return None  # a later hop's opening role chunk: the client got the first hop's
        return self._as_first(obj)

    def answer(self, parts: list[dict]) -> dict:
        self._remember(parts[0])
        last = parts[-1]
        choice = last["choices"][0]
        message = dict(choice.get("message") or {})
        message["content"] = "".join((p["choices"][0].get("message") or {}).get("content") or "" for p in parts)
        return self._as_first({**last, "choices": [{**choice, "message": message}]})


class CompletionSplicer(_OpenAISplicer):
    """`/v1/completions`: the finish reason rides on the last token's event, which may carry text."""

    def _source_end(self, obj: dict) -> dict | None:
        choice = obj["choices"][0]
        if not choice.get("text"):
            return None
        return {**obj, "choices": [{**choice, "finish_reason": None, "matched_stop": None}]}

    def answer(self, parts: list[dict]) -> dict:
        self._remember(parts[0])
        last = parts[-1]
        choice = last["choices"][0]
        text = "".join(p["choices"][0].get("text") or "" for p in parts)
        return self._as_first({**last, "choices": [{**choice, "text": text}]})
