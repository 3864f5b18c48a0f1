"""What a client asks the serving engine for, and what it gets back.

These records are the contract between the HTTP layer (:mod:`moa.serve.app`) and the
engine loop (:mod:`moa.serve.engine`): the app turns an OpenAI request into a
:class:`GenerationRequest`, the engine streams :class:`TokenEvent` back and ends with one
:class:`Completion`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from moa.errors import MoaError

#: The routing of one request: ``None`` (the base), an adapter name, a weighted mixture, or "auto".
AUTO = "auto"


class ServeError(MoaError):
    """Base of the serving errors; ``status`` is the HTTP status the app answers with."""

    status: int = 500
    code: str = "internal_error"


class BadRequestError(ServeError, ValueError):
    """The request is malformed (bad sampling values, prompt too long...)."""

    status = 400
    code = "invalid_request_error"


class UnknownModelError(ServeError, LookupError):
    """The request names a model/adapter that is not served."""

    status = 404
    code = "model_not_found"


class OverloadedError(ServeError, RuntimeError):
    """The request queue is full; try again after ``retry_after`` seconds."""

    status = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ConflictError(ServeError, RuntimeError):
    """The operation conflicts with the server's state (unloading an adapter in use...)."""

    status = 409
    code = "conflict"


class EngineDeadError(ServeError, RuntimeError):
    """The engine loop stopped (crashed or shut down); nothing more will be served."""

    status = 503
    code = "engine_unavailable"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (OpenAI's names).

    Attributes:
        max_tokens: New tokens at most.
        temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / T)``.
        top_p: Nucleus sampling mass (1 = off).
        stop: Strings that end the completion (not included in the text).
        seed: Seed of this request's own generator (sampling is then reproducible).
        min_tokens: EOS is masked out (and stop strings ignored) until this many tokens
            exist, as ``generate``'s ``min_new_tokens`` and vLLM's ``min_tokens``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequestError(f"max_tokens must be a positive integer; got {self.max_tokens!r}.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0 <= self.temperature <= 2):
            raise BadRequestError(f"temperature must be between 0 and 2; got {self.temperature!r}.")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise BadRequestError(f"top_p must be in (0, 1]; got {self.top_p!r}.")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise BadRequestError(f"min_tokens must be between 0 and max_tokens; got {self.min_tokens!r}.")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise BadRequestError(f"stop must be up to 4 non-empty strings; got {list(self.stop)!r}.")

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax."""
        return self.temperature == 0


@dataclass(frozen=True)
class RowRouting:
    """Which adapters a request uses for its whole life.

    Attributes:
        mixture: ``{adapter: weight}`` (one entry = a single adapter), ``{}`` = the base.
        auto: The router decides (from the prompt, once, inside the prefill).
    """

    mixture: Mapping[str, float] = field(default_factory=dict)
    auto: bool = False

    @classmethod
    def base(cls) -> RowRouting:
        return cls()

    @classmethod
    def adapter(cls, name: str) -> RowRouting:
        return cls({name: 1.0})

    @classmethod
    def routed(cls) -> RowRouting:
        return cls(auto=True)

    def adapters(self) -> tuple[str, ...]:
        """The adapters this request names (none for base and auto)."""
        return tuple(self.mixture)


@dataclass
class GenerationRequest:
    """One completion request as the engine sees it.

    Attributes:
        request_id: Unique id (``cmpl-...``), used in logs, metrics and cancellation.
        prompt_ids: The prompt's token ids (chat template already applied).
        routing: The request's adapters.
        params: Sampling parameters.
    """

    request_id: str
    prompt_ids: list[int]
    routing: RowRouting
    params: SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request: a new token and the text it adds (may be ``""`` mid-character)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class Completion:
    """How a request ended.

    Attributes:
        text: The whole completion text (stop string excluded).
        token_ids: The generated token ids.
        finish_reason: ``"stop"`` (EOS or a stop string), ``"length"`` (max_tokens) or
            ``"cancelled"`` (the client went away / shutdown).
        routing: The decision used, ``{adapter: weight}`` (``{}`` = base).
        prompt_tokens: Prompt length.
        seconds_queued: Time between submission and the prefill.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    routing: dict[str, float]
    prompt_tokens: int
    seconds_queued: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
