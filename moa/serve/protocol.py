"""The OpenAI wire format moa serves: request bodies we accept, responses we build.

Requests are pydantic models that ignore unknown fields (as OpenAI does) and reject what
moa cannot honour (``n`` other than 1, several prompts, ``echo``, ``logprobs``) with a
400 naming the field. Responses are plain dicts in OpenAI's shape, plus moa's extension
field ``"moa": {"routing": {adapter: weight}}`` (on the response, or on the last chunk of
a stream), which tells the client which adapters answered.

Example::

    body = CompletionRequest.model_validate({"model": "sql", "prompt": "SELECT", "max_tokens": 8})
    params = body.sampling_params()
    response = completion_response(new_request_id("cmpl"), "sql", completion)
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from moa.serve.requests import BadRequestError, Completion, SamplingParams

#: OpenAI's default ``max_tokens`` for ``/v1/completions``.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: ``/v1/chat/completions`` without ``max_tokens`` (OpenAI: "until the context ends"; we cap it).
DEFAULT_CHAT_MAX_TOKENS = 256
#: OpenAI's "object" of each response kind.
COMPLETION_OBJECT = "text_completion"
CHAT_OBJECT = "chat.completion"
CHAT_CHUNK_OBJECT = "chat.completion.chunk"


def new_request_id(prefix: Literal["cmpl", "chatcmpl"]) -> str:
    """A fresh id in OpenAI's style: ``cmpl-<32 hex>`` or ``chatcmpl-<32 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


# -- requests ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share (OpenAI's names) and moa's ``adapter_weights``."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    #: moa's extension: an exact mixture ``{adapter: weight}`` that overrides ``model``'s adapter.
    adapter_weights: dict[str, float] | None = None
    #: vLLM's extension: no EOS or stop string ends the completion before this many tokens.
    min_tokens: int = 0

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported; moa returns one choice per request (n=1). "
                             f"Send {value} requests instead.")
        return value

    @field_validator("adapter_weights")
    @classmethod
    def _finite_weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        bad = {name: w for name, w in value.items() if not math.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"adapter_weights must be finite and >= 0; got {bad}. "
                             f"Example: {{\"sql\": 0.7, \"code\": 0.3}}.")
        return value

    def default_max_tokens(self) -> int:
        """``max_tokens`` when the request gives none."""
        return DEFAULT_COMPLETION_MAX_TOKENS

    def sampling_params(self) -> SamplingParams:
        """The engine's :class:`SamplingParams` (OpenAI's defaults for missing fields).

        Raises:
            BadRequestError: a value out of range (``temperature`` above 2...).
        """
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else self.default_max_tokens(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=stop,
            seed=self.seed,
            min_tokens=self.min_tokens,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """Body of ``POST /v1/completions``.

    ``prompt`` is a string, a list holding one string, or a list of token ids.
    """

    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt is empty; give a string (or a list with one string).")
            if isinstance(value[0], str) and len(value) != 1:
                raise ValueError(f"prompt holds {len(value)} strings; moa takes one prompt per request. "
                                 f"Send one request per prompt.")
        return value

    @field_validator("echo", "logprobs", "best_of", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        supported = {"echo": value is False, "logprobs": value is None, "best_of": value in (None, 1),
                     "suffix": not value}
        if supported[info.field_name]:
            return value
        raise ValueError(f"{info.field_name}={value!r} is not supported by moa; drop it.")

    def prompt_text(self) -> str | None:
        """The prompt as text, or ``None`` when it was given as token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if isinstance(self.prompt[0], str) else None

    def prompt_token_ids(self) -> list[int] | None:
        """The prompt's token ids when given as such, else ``None``."""
        if isinstance(self.prompt, list) and not isinstance(self.prompt[0], str):
            return [int(t) for t in self.prompt]
        return None


class TextPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message: ``role`` and ``content`` (a string or a list of text parts)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined); other part types raise ``ValueError``."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {p.type for p in self.content if p.type != "text"}
        if kinds:
            raise ValueError(f"message content of type {sorted(kinds)} is not supported; moa serves text "
                             f"only (parts of type 'text').")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name}={value!r} is not supported by moa; drop it.")
        return value

    @field_validator("messages")
    @classmethod
    def _text_only(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        for message in value:
            message.text()  # raises for non-text parts
        return value

    def default_max_tokens(self) -> int:
        return self.max_completion_tokens or DEFAULT_CHAT_MAX_TOKENS

    def message_dicts(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` with text content, as a chat template expects."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class LoadAdapterRequest(BaseModel):
    """Body of ``POST /v1/load_lora_adapter`` (vLLM's names)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    """Body of ``POST /v1/unload_lora_adapter`` (vLLM's names)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str


# -- responses -----------------------------------------------------------------------------


def usage(completion: Completion) -> dict[str, int]:
    """OpenAI's ``usage``: prompt, completion and total tokens."""
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def moa_extension(routing: Mapping[str, float]) -> dict[str, Any]:
    """moa's extension field: the adapters that answered (``{}`` = the base alone)."""
    return {"routing": {name: float(w) for name, w in routing.items()}}


def _envelope(request_id: str, obj: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": int(time.time()) if created is None else created,
            "model": model}


def completion_response(request_id: str, model: str, completion: Completion, created: int | None = None) -> dict:
    """The body of a non-streamed ``/v1/completions`` answer."""
    body = _envelope(request_id, COMPLETION_OBJECT, model, created)
    body["choices"] = [{"index": 0, "text": completion.text, "logprobs": None,
                        "finish_reason": completion.finish_reason}]
    body["usage"] = usage(completion)
    body["moa"] = moa_extension(completion.routing)
    return body


def chat_response(request_id: str, model: str, completion: Completion, created: int | None = None) -> dict:
    """The body of a non-streamed ``/v1/chat/completions`` answer."""
    body = _envelope(request_id, CHAT_OBJECT, model, created)
    body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                        "logprobs": None, "finish_reason": completion.finish_reason}]
    body["usage"] = usage(completion)
    body["moa"] = moa_extension(completion.routing)
    return body


def completion_chunk(
    request_id: str, model: str, created: int, text: str, *,
    finish_reason: str | None = None, completion: Completion | None = None,
) -> dict:
    """One streamed ``/v1/completions`` chunk; the last one (with ``completion``) carries ``moa``."""
    body = _envelope(request_id, COMPLETION_OBJECT, model, created)
    body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    if completion is not None:
        body["moa"] = moa_extension(completion.routing)
    return body


def chat_chunk(
    request_id: str, model: str, created: int, delta: dict[str, str], *,
    finish_reason: str | None = None, completion: Completion | None = None,
) -> dict:
    """One streamed ``/v1/chat/completions`` chunk; the last one (with ``completion``) carries ``moa``."""
    body = _envelope(request_id, CHAT_CHUNK_OBJECT, model, created)
    body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if completion is not None:
        body["moa"] = moa_extension(completion.routing)
    return body


def usage_chunk(request_id: str, obj: str, model: str, created: int, completion: Completion) -> dict:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    body = _envelope(request_id, obj, model, created)
    body["choices"] = []
    body["usage"] = usage(completion)
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


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the offending field from pydantic's error list."""
    parts = []
    param = None
    for error in errors[:5]:
        location = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(location) or "body"
        param = param or (location[0] if location else None)
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "Invalid request body: " + "; ".join(parts), param


def check_prompt_not_empty(prompt_ids: list[int]) -> None:
    """Raise :class:`BadRequestError` for an empty prompt (nothing to continue)."""
    if not prompt_ids:
        raise BadRequestError("The prompt is empty after tokenization; give at least one token of text.")
