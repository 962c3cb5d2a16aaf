"""One response out of a migrated request's two parts: A's (the source decode server) up to the switch, then B's.

The router relays A's stream event by event. Once the migration is committed, A ends its part with a graceful
`abort` finish (`/generate`: the message `ares_migrated:<mid>`; the OpenAI endpoints only say `"abort"`, so there the
migration's committed state tells). That end event loses its finish (it may still carry A's last text), every later
event of A (usage, `[DONE]`) is dropped, and B's events follow, rewritten to continue A's: one stream, same id, every
token once, B's finish and usage (B's counts include A's tokens: its request carries A's outputs). Non-streaming
answers are put together the same way.

Per endpoint, what is cumulative differs: SGLang's `/generate` text and `output_ids` are cumulative per server, so
B's are prefixed with A's; OpenAI streams carry deltas, so B's deltas go out as they are, without B's opening
role-only chunk, and with A's `created`.
"""

from __future__ import annotations

from typing import Any

MIGRATED_PREFIX = "ares_migrated:"  # the finish message of A's `/generate` stream once B has committed
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATE = "/generate"
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


def _finish(obj: dict) -> Any:
    choices = obj.get("choices")
    return choices[0].get("finish_reason") if isinstance(choices, list) and choices else None


class Splicer:
    """The rewriting of one migrated request's response; `for_endpoint` picks the endpoint's kind."""

    @staticmethod
    def for_endpoint(endpoint: str) -> Splicer:
        """The splicer for a request to `endpoint`."""
        return {CHAT: ChatSplicer, COMPLETIONS: CompletionSplicer}.get(endpoint, GenerateSplicer)()

    def is_source_end(self, obj: dict, committed: bool) -> bool:
        """Whether `obj` (an event or the whole answer of A) is A's end because the request moved."""
        raise NotImplementedError

    def source_end(self, obj: dict) -> dict | None:
        """A's end event, remembered, relayed without its finish (None: nothing left to relay)."""
        raise NotImplementedError

    def target(self, obj: dict) -> dict | None:
        """One of B's events, continued from A's (None: drop it)."""
        raise NotImplementedError

    def answer(self, a: dict, b: dict) -> dict:
        """The whole non-streaming answer: A's answer (ended by the migration) continued with B's."""
        raise NotImplementedError


class GenerateSplicer(Splicer):
    """SGLang's `/generate`: cumulative `text` and `output_ids` per server; `meta_info` (counts, finish) from B."""

    def __init__(self) -> None:
        self.text = ""
        self.ids: list[int] = []

    def is_source_end(self, obj: dict, committed: bool) -> bool:
        fin = (obj.get("meta_info") or {}).get("finish_reason") or {}
        return isinstance(fin, dict) and str(fin.get("message", "")).startswith(MIGRATED_PREFIX)

    def source_end(self, obj: dict) -> dict | None:
        self.text, self.ids = obj.get("text", ""), list(obj.get("output_ids") or [])
        meta = dict(obj.get("meta_info") or {})
        meta["finish_reason"] = None
        return {**obj, "meta_info": meta}

    def target(self, obj: dict) -> dict | None:
        return {
            **obj,
            "text": self.text + obj.get("text", ""),
            "output_ids": self.ids + list(obj.get("output_ids") or []),
        }

    def answer(self, a: dict, b: dict) -> dict:
        self.source_end(a)
        return self.target(b)  # type: ignore[return-value] - never None here


class _OpenAISplicer(Splicer):
    """OpenAI streams carry deltas: B's go out as they are, under A's `id` and `created`."""

    def __init__(self) -> None:
        self.a_id: str | None = None
        self.created: int | None = None
        self.a_content = ""

    def is_source_end(self, obj: dict, committed: bool) -> bool:
        return committed and _finish(obj) == "abort"

    def _remember(self, obj: dict) -> None:
        self.a_id, self.created = obj.get("id"), obj.get("created")

    def _as_a(self, obj: dict) -> dict:
        out = dict(obj)
        if self.a_id is not None:
            out["id"] = self.a_id
        if self.created is not None:
            out["created"] = self.created
        return out


class ChatSplicer(_OpenAISplicer):
    """`/v1/chat/completions`: SGLang's stream opens with a role-only delta and ends with a finish-only chunk."""

    def source_end(self, obj: dict) -> dict | None:
        self._remember(obj)
        choice = obj["choices"][0]
        delta = choice.get("delta") or {}
        if not delta.get("content"):
            return None  # the usual finish-only chunk
        return {**obj, "choices": [{**choice, "finish_reason": None}]}

    def target(self, obj: dict) -> dict | None:
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            delta = choices[0].get("delta") or {}
            if delta.get("role") and not delta.get("content") and not delta.get("reasoning_content"):
                return None  # B's opening role chunk: the client got A's
        return self._as_a(obj)

    def answer(self, a: dict, b: dict) -> dict:
        self._remember(a)
        choice = b["choices"][0]
        message = dict(choice.get("message") or {})
        message["content"] = (a["choices"][0]["message"].get("content") or "") + (message.get("content") or "")
        return self._as_a({**b, "choices": [{**choice, "message": message}]})


class CompletionSplicer(_OpenAISplicer):
    """`/v1/completions`: the finish reason rides on the last token's event, which may carry text."""

    def source_end(self, obj: dict) -> dict | None:
        self._remember(obj)
        choice = obj["choices"][0]
        if not choice.get("text"):
            return None
        return {**obj, "choices": [{**choice, "finish_reason": None, "matched_stop": None}]}

    def target(self, obj: dict) -> dict | None:
        return self._as_a(obj)

    def answer(self, a: dict, b: dict) -> dict:
        self._remember(a)
        choice = b["choices"][0]
        text = (a["choices"][0].get("text") or "") + (choice.get("text") or "")
        return self._as_a({**b, "choices": [{**choice, "text": text}]})
