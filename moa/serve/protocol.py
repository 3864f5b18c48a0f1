"""The OpenAI request bodies ``moa serve`` accepts, validated into what the engine needs.

Requests are pydantic models of the fields moa honours. Any other field gets a 400 naming
it (:mod:`moa.serve.fields`): OpenAI's and vLLM's fields that moa does not implement are
taken only at their neutral values (``frequency_penalty: 0``...), and unknown fields are
refused, so nothing a client asks for is silently ignored. Values are range-checked
(a ``seed`` beyond 64 bits, a ``temperature`` that would overflow the float32 logits) with
a 400 naming the field. The answers' shapes are in :mod:`moa.serve.responses`.

Example::

    body = CompletionRequest.model_validate({"model": "sql", "prompt": "SELECT", "max_tokens": 8,
                                             "logprobs": 2, "n": 2})
    params = body.sampling_params()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moa.serve.fields import FieldError, check_fields
from moa.serve.requests import MAX_LOGPROBS, BadRequestError, SamplingParams
from moa.serve.responses import (  # noqa: F401 - re-exported: the wire format's names in one place
    CHAT_CHUNK_OBJECT,
    CHAT_OBJECT,
    COMPLETION_OBJECT,
    ERROR_TYPES,
    error_body,
    model_card,
    new_request_id,
)

#: OpenAI's default ``max_tokens`` for ``/v1/completions``.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: ``/v1/chat/completions`` without ``max_tokens`` (OpenAI: "until the context ends"; we cap it).
DEFAULT_CHAT_MAX_TOKENS = 256
#: Most choices per prompt (``n``); the server's batch size bounds it further.
MAX_N = 128


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted only off (checked below)

    @field_validator("continuous_usage_stats")
    @classmethod
    def _off(cls, value: bool) -> bool:
        if value:
            raise ValueError("continuous_usage_stats is not supported; usage comes in the last chunk "
                             "(include_usage).")
        return value


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: ``name``, ``schema`` (a JSON Schema), ``strict``, ``description``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "response"
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (:mod:`moa.serve.structured`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}.')
        return self

    def spec(self) -> dict[str, Any]:
        """As :meth:`moa.serve.structured.StructuredOutput.grammar` takes it."""
        spec: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            spec["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.json_schema}
        return spec


class SamplingFields(BaseModel):
    """The fields both endpoints share (OpenAI's names), vLLM's and moa's extensions."""

    model_config = ConfigDict(extra="ignore")
    ENDPOINT: ClassVar[str] = "/v1"

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
    response_format: ResponseFormat | None = None
    #: moa's extension: an exact mixture ``{adapter: weight}`` that overrides ``model``'s adapter.
    adapter_weights: dict[str, float] | None = None
    #: vLLM's extension: no EOS or stop string ends the completion before this many tokens.
    min_tokens: int = 0
    #: vLLM's extension: log-probabilities name tokens as ``token_id:<id>`` instead of their text.
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="before")
    @classmethod
    def _only_honoured_fields(cls, data: Any) -> Any:
        return check_fields(data, cls.model_fields, cls.ENDPOINT)

    @field_validator("n")
    @classmethod
    def _choices(cls, value: int) -> int:
        if not 1 <= value <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}; got {value}.")
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

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """``(logprobs, prompt_logprobs)`` of :class:`SamplingParams` (``None``: not asked for)."""
        return None, None

    def sampling_params(self) -> SamplingParams:
        """The engine's :class:`SamplingParams` (OpenAI's defaults for missing fields).

        Raises:
            BadRequestError: a value out of range (``temperature`` above 2...), naming the field.
        """
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else self.default_max_tokens(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=stop,
            seed=self.seed,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def response_spec(self) -> dict[str, Any] | None:
        """The ``response_format`` to enforce (``None`` for free text)."""
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.min_tokens:
            raise BadRequestError("min_tokens cannot be combined with a JSON response_format: the grammar decides "
                                  "where the answer ends. Drop min_tokens.", "min_tokens")
        return self.response_format.spec()

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its text (``None`` when given as token ids) or its token ids."""

    text: str | None
    token_ids: list[int] | None


class CompletionRequest(SamplingFields):
    """Body of ``POST /v1/completions``.

    ``prompt`` is a string, a list of strings, a list of token ids, or a list of such lists
    (several prompts: ``n`` choices each, ``index = i * n + j``).
    """

    ENDPOINT: ClassVar[str] = "/v1/completions"

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt is empty; give a string, a list of strings or a list of token ids.")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("prompt holds an empty list of token ids; give at least one token per prompt.")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}; got {value}.")
        return value

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, (self.logprobs if self.echo and self.logprobs is not None else None)

    def prompts(self) -> list[Prompt]:
        """The request's prompts, in order."""
        value = self.prompt
        if isinstance(value, str):
            return [Prompt(value, None)]
        if all(isinstance(p, str) for p in value):
            return [Prompt(p, None) for p in value]
        if all(isinstance(p, int) for p in value):
            return [Prompt(None, [int(t) for t in value])]
        return [Prompt(None, [int(t) for t in p]) for p in value]


class TextPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


#: Message fields moa takes at their empty values only (an assistant turn sent back as received).
_EMPTY_MESSAGE_FIELDS = ("tool_calls", "function_call", "audio", "refusal", "annotations", "reasoning_content")


class ChatMessage(BaseModel):
    """One message: ``role`` and ``content`` (a string or a list of text parts)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_tool_calls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key in _EMPTY_MESSAGE_FIELDS:
            if data.get(key):
                raise ValueError(f"a message's {key} is not supported: moa serve has no tool-call parser and "
                                 f"answers with text only. Send the turn's text as content.")
        return {k: v for k, v in data.items() if k not in _EMPTY_MESSAGE_FIELDS}

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

    ENDPOINT: ClassVar[str] = "/v1/chat/completions"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}; got {value}.")
        return value

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs needs logprobs: true (as OpenAI's API).", "top_logprobs")
        return self

    @field_validator("messages")
    @classmethod
    def _text_only(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        for message in value:
            message.text()  # raises for non-text parts
        return value

    def default_max_tokens(self) -> int:
        return self.max_completion_tokens or DEFAULT_CHAT_MAX_TOKENS

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def message_dicts(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` with text content (and ``name`` / ``tool_call_id`` when given),
        as a chat template expects."""
        dicts = []
        for m in self.messages:
            message = {"role": m.role, "content": m.text()}
            message.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v})
            dicts.append(message)
        return dicts


class LoadAdapterRequest(BaseModel):
    """Body of ``POST /v1/load_lora_adapter`` (vLLM's names)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    """Body of ``POST /v1/unload_lora_adapter`` (vLLM's names)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the offending field from pydantic's error list."""
    parts = []
    param = None
    for error in errors[:5]:
        location = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":  # its location is a character offset, not a field
            at = f" at character {location[0]}" if location else ""
            parts.append(f"body: not valid JSON{at} ({error.get('msg', 'invalid JSON')})")
            continue
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError | BadRequestError) and getattr(cause, "param", None):
            location = [cause.param, *location]
        where = ".".join(location) or "body"
        param = param or (location[0] if location else None)
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "Invalid request body: " + "; ".join(parts), param


def check_prompt_not_empty(prompt_ids: list[int]) -> None:
    """Raise :class:`BadRequestError` for an empty prompt (nothing to continue)."""
    if not prompt_ids:
        raise BadRequestError("The prompt is empty after tokenization; give at least one token of text.", "prompt")
