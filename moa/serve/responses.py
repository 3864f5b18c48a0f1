"""The bodies ``moa serve`` answers with, in OpenAI's shapes.

Plain dicts: a response (``text_completion`` / ``chat.completion``) holds one entry in
``choices`` per choice (``index`` = prompt ``i``'s choice ``j`` at ``i * n + j``); a stream
sends chunks (``text_completion`` / ``chat.completion.chunk``), each with one choice.
moa's extension field ``"moa": {"routing": {adapter: weight}}`` tells which adapters
answered: on the response (the first choice's routing; each choice carries its own when
there are several) and on each choice's last chunk.

Example::

    choice = completion_choice(0, "SELECT 1", "stop")
    body = response("cmpl-1", "completion", "sql", [choice], usage(3, 2), {"sql": 1.0})
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

#: OpenAI's "object" of each response kind.
COMPLETION_OBJECT = "text_completion"
CHAT_OBJECT = "chat.completion"
CHAT_CHUNK_OBJECT = "chat.completion.chunk"


def new_request_id(prefix: Literal["cmpl", "chatcmpl"]) -> str:
    """A fresh id in OpenAI's style: ``cmpl-<32 hex>`` or ``chatcmpl-<32 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage``: prompt, completion and total tokens."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def moa_extension(routing: Mapping[str, float]) -> dict[str, Any]:
    """moa's extension field: the adapters that answered (``{}`` = the base alone)."""
    return {"routing": {name: float(w) for name, w in routing.items()}}


def _envelope(request_id: str, obj: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": int(time.time()) if created is None else created,
            "model": model}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of a ``/v1/completions`` answer's ``choices``."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, content: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of a ``/v1/chat/completions`` answer's ``choices``."""
    return {"index": index, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def response(request_id: str, kind: str, model: str, choices: Sequence[dict[str, Any]], usage_body: dict[str, int],
             routing: Mapping[str, float], created: int | None = None) -> dict[str, Any]:
    """A non-streamed answer (``kind``: ``"completion"`` or ``"chat"``)."""
    body = _envelope(request_id, CHAT_OBJECT if kind == "chat" else COMPLETION_OBJECT, model, created)
    body["choices"] = list(choices)
    body["usage"] = usage_body
    body["moa"] = moa_extension(routing)
    return body


def completion_chunk(
    request_id: str, model: str, created: int, text: str, *, index: int = 0, finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None, routing: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One streamed ``/v1/completions`` chunk; a choice's last one (with ``routing``) carries ``moa``."""
    body = _envelope(request_id, COMPLETION_OBJECT, model, created)
    body["choices"] = [completion_choice(index, text, finish_reason, logprobs)]
    if routing is not None:
        body["moa"] = moa_extension(routing)
    return body


def chat_chunk(
    request_id: str, model: str, created: int, delta: dict[str, str], *, index: int = 0,
    finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
    routing: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One streamed ``/v1/chat/completions`` chunk; a choice's last one (with ``routing``) carries ``moa``."""
    body = _envelope(request_id, CHAT_CHUNK_OBJECT, model, created)
    body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    if routing is not None:
        body["moa"] = moa_extension(routing)
    return body


def usage_chunk(request_id: str, obj: str, model: str, created: int, usage_body: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    body = _envelope(request_id, obj, model, created)
    body["choices"] = []
    body["usage"] = usage_body
    return body


def model_card(model_id: str, *, parent: str | None = None, root: str | None = None,
               created: int | None = None, **extra: Any) -> dict[str, Any]:
    """One entry of ``GET /v1/models`` (vLLM's fields: ``root`` and ``parent``)."""
    return {"id": model_id, "object": "model", "created": int(time.time()) if created is None else created,
            "owned_by": "moa", "root": root or model_id, "parent": parent, **extra}


#: OpenAI's error ``type`` for each HTTP status we answer with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


def error_body(message: str, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
