"""What a client asks the serving engine for, and what it gets back.

These records are the contract between the HTTP layer (:mod:`moa.serve.app`) and the
engine loop (:mod:`moa.serve.engine`): the app turns an OpenAI request into a
:class:`GenerationRequest`, the engine streams :class:`TokenEvent` back and ends with one
:class:`Completion`.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moa.errors import MoaError

#: The routing of one request: ``None`` (the base), an adapter name, a weighted mixture, or "auto".
AUTO = "auto"


class ServeError(MoaError):
    """Base of the serving errors; ``status`` is the HTTP status the app answers with."""

    status: int = 500
    code: str = "internal_error"


class BadRequestError(ServeError, ValueError):
    """The request is malformed (bad sampling values, prompt too long...).

    Args:
        message: What is wrong, the value, what to do instead.
        param: The request field at fault (OpenAI's error ``param``), when there is one.
    """

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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


class EngineTimeoutError(ServeError, TimeoutError):
    """An admin call (adapter load/unload) did not run on the engine thread in time; it was
    withdrawn if it had not started."""

    status = 503
    code = "engine_timeout"


#: Smallest non-zero temperature: sampling divides the float32 logits by it, and below this the
#: quotient can overflow to infinity (5e-324 is 0 in float32); 0 asks for greedy decoding.
MIN_TEMPERATURE = 1e-4
#: Seeds are 64-bit signed integers (OpenAI's and vLLM's range; torch generators take them).
SEED_RANGE = (-(2**63), 2**63 - 1)
#: Most alternatives ``logprobs`` / ``top_logprobs`` may ask for (OpenAI's chat limit, vLLM's default).
MAX_LOGPROBS = 20
#: Most stop strings (OpenAI takes 4; evaluation harnesses send a task's stop list and the EOS text).
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (OpenAI's names) and what to report about them.

    Attributes:
        max_tokens: New tokens at most.
        temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / T)``.
        top_p: Nucleus sampling mass (1 = off).
        stop: Strings that end the completion (not included in the text).
        seed: Seed of this request's own generator (sampling is then reproducible).
        min_tokens: EOS is masked out (and stop strings ignored) until this many tokens
            exist, as ``generate``'s ``min_new_tokens`` and vLLM's ``min_tokens``.
        logprobs: ``None``: no log-probabilities; ``k`` >= 0: each generated token's
            log-probability and the ``k`` most likely alternatives at its step.
        prompt_logprobs: ``None``, or ``k`` >= 0: the same for every prompt token (``echo``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequestError(f"max_tokens must be a positive integer; got {self.max_tokens!r}.", "max_tokens")
        self._check_temperature()
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise BadRequestError(f"top_p must be in (0, 1]; got {self.top_p!r}.", "top_p")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise BadRequestError(f"min_tokens must be between 0 and max_tokens; got {self.min_tokens!r}.",
                                  "min_tokens")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise BadRequestError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings; got "
                                  f"{list(self.stop)!r}.", "stop")
        low, high = SEED_RANGE
        if self.seed is not None and not (isinstance(self.seed, int) and low <= self.seed <= high):
            raise BadRequestError(f"seed={self.seed!r} is out of range: seeds are 64-bit signed integers, from "
                                  f"{low} to {high}.", "seed")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS):
                raise BadRequestError(f"{name} must be between 0 and {MAX_LOGPROBS}; got {value!r}.", name)

    def _check_temperature(self) -> None:
        value = self.temperature
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 2):
            raise BadRequestError(f"temperature must be between 0 and 2; got {value!r}.", "temperature")
        if 0 < value < MIN_TEMPERATURE:
            raise BadRequestError(
                f"temperature={value!r} is too small: sampling divides the float32 logits by it, and below "
                f"{MIN_TEMPERATURE:g} the quotient can overflow to infinity ({value!r} is {_float32(value)!r} in "
                f"float32) while the answer is greedy anyway. Use 0 for greedy decoding, or a temperature of at "
                f"least {MIN_TEMPERATURE:g}.", "temperature")

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of ``n``: seeded ``seed + index`` (wrapping around
        within 64 bits), so seeded choices differ from each other and are reproducible."""
        if self.seed is None or index == 0:
            return self
        low, high = SEED_RANGE
        return dataclasses.replace(self, seed=(self.seed + index - low) % (high - low + 1) + low)

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


def _float32(value: float) -> float:
    """``value`` rounded to float32 (what a float32 tensor operation sees)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass
class GenerationRequest:
    """One completion request as the engine sees it.

    Attributes:
        request_id: Unique id (``cmpl-...``), used in logs, metrics and cancellation.
        prompt_ids: The prompt's token ids (chat template already applied).
        routing: The request's adapters.
        params: Sampling parameters.
        guide: Structured output: a fresh :class:`~moa.serve.structured.Guide` that masks
            the tokens its grammar forbids at each step (``None``: free text).
    """

    request_id: str
    prompt_ids: list[int]
    routing: RowRouting
    params: SamplingParams
    guide: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities, from the logits the row sampled (or scored) it from.

    Attributes:
        token_id: The token at this position (sampled, or the prompt's).
        logprob: Its log-probability (``log_softmax`` of the raw logits, float32).
        top: The ``k`` most likely tokens ``(token_id, logprob)``, most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request: a new token and the text it adds (may be ``""`` mid-character).

    Attributes:
        token_id: The token.
        text: The text it adds to the stream.
        logprob: Its log-probabilities (when the request asked for them).
        prompt_logprobs: On the first event only, the prompt's (``echo`` with ``logprobs``).
    """

    token_id: int
    text: str
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
        logprobs: One entry per generated token (EOS included), when asked for.
        prompt_logprobs: One entry per prompt token (the first is ``None``: nothing
            precedes it), when asked for.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    routing: dict[str, float]
    prompt_tokens: int
    seconds_queued: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
