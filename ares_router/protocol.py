"""Request validation for the router's generation endpoints, the served-model check, and errors in SGLang's shape.

The router checks only what it must understand to route (the prompt, `max_tokens`, `stream`, the model name) plus
the types of the fields SGLang would reject anyway, so a bad request fails fast with a clear 4xx instead of
occupying a prefill and a decode server. Unknown fields pass through untouched: the backend is the authority on
everything else.

Error shapes. A backend's own error answer is relayed unchanged (status and body). Every error the router makes
itself has the shape SGLang 0.5.23 gives on the same endpoint, so a client sees one shape per endpoint whoever
answered:

- `/v1/chat/completions`, `/v1/completions` and the router's other endpoints: SGLang's `ErrorResponse`
  (`OpenAIServingBase.create_error_response`), at the top level of the body:
  `{"object": "error", "message": str, "type": str, "param": str | null, "code": int}` (`code` = the HTTP status).
  Inside an event stream that has already started: `data: {"error": <ErrorResponse>}` then `data: [DONE]`
  (`create_streaming_error_response`).
- `/generate`: `{"error": {"message": str}}` (SGLang's `http_server._create_error_response`); inside a started
  stream: `data: {"error": {"message": str, "type": str, "code": int, "retryable": bool}}` then `data: [DONE]`.

`type` follows SGLang's naming (`BadRequestError` is its default for a 400); an unknown model is 404 with
`type` `model_not_found` and `param` `model` (OpenAI's code for it; SGLang's `code` field is the HTTP status).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

# Rough tokens-per-character of English/code text for BPE tokenizers; the router does not tokenise (it would cost
# more than the whole routing decision). Only used for load estimates, never for anything the client sees.
CHARS_PER_TOKEN = 4.0
CHAT_TOKENS_PER_MESSAGE = 4  # role markers and separators the chat template adds around each message

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/generate")
DEFAULT_MAX_TOKENS = {"/v1/chat/completions": None, "/v1/completions": 16, "/generate": 128}
GENERATE = "/generate"  # SGLang's native endpoint: no `model` field, its own error shape
# What SGLang's OpenAI protocol fills in when a request names no model (`protocol.DEFAULT_MODEL_NAME`).
SGLANG_DEFAULT_MODEL = "default"
MODEL_NOT_FOUND = "model_not_found"


def error_type(status: int) -> str:
    """SGLang-style error type for an HTTP status: 400 -> BadRequestError, 503 -> ServiceUnavailableError."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    return phrase.replace(" ", "").replace("-", "") + "Error"


class APIError(Exception):
    """An error the router answers itself, in SGLang's shape for the endpoint (module docstring)."""

    def __init__(self, status: int, message: str, param: str | None = None, err_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = err_type or error_type(status)

    def payload(self, endpoint: str) -> dict[str, Any]:
        """The JSON body answered on `endpoint`."""
        if endpoint == GENERATE:
            return {"error": {"message": self.message}}
        return {
            "object": "error",
            "message": self.message,
            "type": self.err_type,
            "param": self.param,
            "code": self.status,
        }

    def body(self, endpoint: str) -> bytes:
        """`payload` as bytes."""
        return orjson.dumps(self.payload(endpoint))

    def stream_event(self, endpoint: str) -> bytes:
        """The error as the last events of a stream that already started (SGLang ends it with `[DONE]` too)."""
        if endpoint == GENERATE:
            err = {"message": self.message, "type": self.err_type, "code": self.status, "retryable": self.status >= 500}
        else:
            err = self.payload(endpoint)
        return b"data: " + orjson.dumps({"error": err}) + b"\n\n" + b"data: [DONE]\n\n"


def model_accepted(model: str | None, served: Collection[str]) -> bool:
    """Whether a request naming `model` is for one of the `served` model ids, as SGLang reads a model name.

    No model, and SGLang's placeholder name `default`, mean "whatever is loaded". A served id (a base model or a
    LoRA adapter `/v1/models` lists) matches exactly; `base:adapter` names an adapter of a served base model
    (SGLang's `_parse_model_parameter`, which also keeps a served id that itself contains ':'), and the server
    judges the adapter.
    """
    if model is None or model == SGLANG_DEFAULT_MODEL or model in served:
        return True
    if ":" not in model:
        return False
    if any(model.startswith(f"{name}:") for name in served):
        return True
    return model.split(":", 1)[0].strip() in served


def check_model(parsed: ParsedRequest, served: Collection[str]) -> None:
    """Raise 404 `model_not_found` when an OpenAI request names a model none of the servers serves."""
    if parsed.endpoint == GENERATE:
        return
    model = parsed.body.get("model")
    if not model_accepted(model, served):
        names = ", ".join(sorted(served)) or "none reported"
        raise APIError(404, f"The model '{model}' does not exist (served: {names})", "model", MODEL_NOT_FOUND)


@dataclass
class ParsedRequest:
    """A validated generation request: the body to forward plus what routing needs to know about it."""

    endpoint: str
    body: dict[str, Any]
    stream: bool
    prompt_tokens: int  # exact for token-id prompts, estimated from characters for text
    max_tokens: int | None  # the output cap the client asked for (None: up to the context length)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


# field -> (check, expected-type text). Only fields SGLang itself types strictly; None is always allowed.
_Check = tuple[Callable[[Any], bool], str]
_COMMON: dict[str, _Check] = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "max_tokens": (_is_int, "an integer"),
    "n": (_is_int, "an integer"),
    "temperature": (_is_num, "a number"),
    "top_p": (_is_num, "a number"),
    "top_k": (_is_int, "an integer"),
    "min_p": (_is_num, "a number"),
    "frequency_penalty": (_is_num, "a number"),
    "presence_penalty": (_is_num, "a number"),
    "repetition_penalty": (_is_num, "a number"),
    "seed": (_is_int, "an integer"),
    "stop": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "stop_token_ids": (_is_int_list, "a list of integers"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a boolean"),
    "min_tokens": (_is_int, "an integer"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "rid": (lambda v: isinstance(v, str), "a string"),
}
_CHAT: dict[str, _Check] = {
    **_COMMON,
    "messages": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of messages"),
    "max_completion_tokens": (_is_int, "an integer"),
    "logprobs": (lambda v: isinstance(v, bool), "a boolean"),
    "top_logprobs": (_is_int, "an integer"),
}
_COMPLETION: dict[str, _Check] = {
    **_COMMON,
    "prompt": (lambda v: isinstance(v, str) or _is_int_list(v) or _is_str_list(v), "a string or a list of tokens"),
    "best_of": (_is_int, "an integer"),
    "echo": (lambda v: isinstance(v, bool), "a boolean"),
    "logprobs": (_is_int, "an integer"),
    "suffix": (lambda v: isinstance(v, str), "a string"),
}
_GENERATE: dict[str, _Check] = {
    "text": (lambda v: isinstance(v, (str, list)), "a string"),
    "input_ids": (lambda v: isinstance(v, list), "a list of token ids"),
    "sampling_params": (lambda v: isinstance(v, dict), "an object"),
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "rid": (lambda v: isinstance(v, str), "a string"),
    "return_logprob": (lambda v: isinstance(v, bool), "a boolean"),
}
_SAMPLING: dict[str, _Check] = {
    "max_new_tokens": (_is_int, "an integer"),
    "min_new_tokens": (_is_int, "an integer"),
    "n": (_is_int, "an integer"),
    "temperature": (_is_num, "a number"),
    "top_p": (_is_num, "a number"),
    "top_k": (_is_int, "an integer"),
    "stop": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "ignore_eos": (lambda v: isinstance(v, bool), "a boolean"),
}
_SCHEMAS = {"/v1/chat/completions": _CHAT, "/v1/completions": _COMPLETION, "/generate": _GENERATE}
# Fields the router sets itself: a client must not pick the PD bootstrap of another request.
_RESERVED = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


def _check_types(body: dict[str, Any], schema: dict[str, _Check], prefix: str = "") -> None:
    for name, (ok, expected) in schema.items():
        v = body.get(name)
        if v is not None and not ok(v):
            raise APIError(400, f"'{prefix}{name}' must be {expected}, got {type(v).__name__}", param=prefix + name)


def _text_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _message_tokens(messages: list[Any]) -> int:
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"'messages[{i}]' must be an object with a string 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, str):
            total += _text_tokens(content)
        elif isinstance(content, list):  # content parts; only text parts cost prompt tokens we can estimate
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += _text_tokens(part["text"])
        elif content is not None:
            raise APIError(400, f"'messages[{i}].content' must be a string or a list of parts", f"messages[{i}]")
        total += CHAT_TOKENS_PER_MESSAGE
    return total


def _positive(value: int | None, name: str) -> int | None:
    if value is not None and value < 0:
        raise APIError(400, f"'{name}' must be >= 0, got {value}", param=name)
    return value


def _reject_multi(n: Any, name: str) -> None:
    if n is not None and n != 1:
        raise APIError(400, f"'{name}' = {n} is not supported by the ARES router (only 1)", param=name)


def parse_request(endpoint: str, raw: bytes) -> ParsedRequest:
    """Validate a generation request body for `endpoint`; raise `APIError` (4xx) with a message if it is invalid."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    schema = _SCHEMAS[endpoint]
    _check_types(body, schema)
    for name in _RESERVED:
        if name in body:
            raise APIError(400, f"'{name}' is set by the router and must not be in the request", param=name)
    stream = bool(body.get("stream", False))

    if endpoint == "/v1/chat/completions":
        if "messages" not in body:
            raise APIError(400, "'messages' is required", param="messages")
        _reject_multi(body.get("n"), "n")
        prompt_tokens = _message_tokens(body["messages"])
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _positive(max_tokens, "max_tokens")
    elif endpoint == "/v1/completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise APIError(400, "'prompt' is required", param="prompt")
        if _is_str_list(prompt) and not (len(prompt) == 1):
            raise APIError(
                400, "batched prompts (a list of strings) are not supported; send one request each", "prompt"
            )
        _reject_multi(body.get("n"), "n")
        _reject_multi(body.get("best_of"), "best_of")
        if isinstance(prompt, str):
            prompt_tokens = _text_tokens(prompt)
        elif _is_str_list(prompt):
            prompt_tokens = _text_tokens(prompt[0])
        else:
            prompt_tokens = len(prompt)
        max_tokens = _positive(body.get("max_tokens", DEFAULT_MAX_TOKENS[endpoint]), "max_tokens")
    else:
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise APIError(400, "exactly one of 'text' or 'input_ids' is required")
        if isinstance(text, list) or (ids is not None and not _is_int_list(ids)):
            raise APIError(400, "batched /generate requests are not supported; send one request each")
        if ids is not None and not ids:
            raise APIError(400, "'input_ids' must not be empty", param="input_ids")
        sampling = body.get("sampling_params") or {}
        _check_types(sampling, _SAMPLING, prefix="sampling_params.")
        _reject_multi(sampling.get("n"), "sampling_params.n")
        prompt_tokens = _text_tokens(text) if text is not None else len(ids)
        max_tokens = _positive(sampling.get("max_new_tokens", DEFAULT_MAX_TOKENS[endpoint]), "max_new_tokens")
    return ParsedRequest(endpoint, body, stream, prompt_tokens, max_tokens)
