"""One row's output processor: picks its tokens, streams its text, decides how it ends.

Per row and step (as vLLM v1's output processor): the token from the row's logits (greedy or
with its own seeded generator, after its masks: ``min_tokens``, a structured-output
:class:`~moa.serve.structured.Guide`), its log-probability from those logits before any mask
(:mod:`moa.serve.logprobs`), its text by incremental detokenization
(:class:`~moa.serve.detokenizer.IncrementalDetokenizer`: each token decoded once, never the whole
answer again), then stop strings, EOS, the length limits. Everything here concerns this row only:
an exception raised here fails this request alone (:meth:`moa.serve.rows.Row.accept`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moa.errors import NonFiniteOutputError
from moa.serve.detokenizer import IncrementalDetokenizer
from moa.serve.logprobs import step_logprob
from moa.serve.requests import GenerationRequest, TokenEvent, TokenLogprob


@dataclass(frozen=True)
class OutputLimits:
    """What every row of one engine ends on.

    Attributes:
        eos_ids: Token ids that end a completion.
        max_context: Positions at most (prompt, virtual positions and answer).
        tokenizer: Decodes the answers (``None``: no text).
    """

    eos_ids: frozenset[int]
    max_context: int
    tokenizer: Any


@dataclass(frozen=True)
class Ending:
    """How a row ended: OpenAI's finish reason and the answer's whole text."""

    reason: str
    text: str


class OutputProcessor:
    """Tokens, log-probabilities and text of one row.

    Args:
        request: The row's request (sampling parameters, stop strings, guide).
        handle: Where its token events go.
        limits: The engine's :class:`OutputLimits`.
    """

    def __init__(self, request: GenerationRequest, handle: Any, limits: OutputLimits):
        self.request = request
        self.handle = handle
        self.limits = limits
        self.guide = request.guide
        params = request.params
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._detokenizer = IncrementalDetokenizer(limits.tokenizer, skip_special_tokens=True, stops=params.stop)
        self._sent = ""  # text already streamed
        self._stop_scan = 0  # where the next stop-string search starts in the text
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator()
            if params.seed is not None:
                self._generator.manual_seed(int(params.seed))
            else:
                self._generator.seed()

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return self._detokenizer.text

    def accept(self, logits: torch.Tensor, length: int) -> Ending | None:
        """Take one step's logits (``[vocab]``): pick, record and stream the token.

        Args:
            logits: The row's next-token logits.
            length: Positions the row takes once this token is added (prompt, virtual
                positions, answer).

        Returns:
            How the row ended, or ``None`` while it goes on.

        Raises:
            NonFiniteOutputError: the logits hold NaN or infinities.
        """
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteOutputError(
                f"Request {self.request.request_id}: the model's logits hold NaN or infinite values; an "
                f"adapter's weights overflow on this input. Reload the adapter from its file or send the "
                f"request to another adapter.")
        params = self.request.params
        token = self._pick(logits)
        self.tokens.append(token)
        entry = None
        if self.logprobs is not None:
            entry = step_logprob(logits, token, params.logprobs or 0)
            self.logprobs.append(entry)
        if token in self.limits.eos_ids:
            return self._end("stop", entry)
        if self.guide is not None:
            self.guide.advance(token)
        fresh = self._detokenizer.push(token)
        if len(self.tokens) >= params.min_tokens and (stop_at := self._find_stop()) is not None:
            return self._end("stop", entry, fresh, cut=stop_at)
        if self.guide is not None and self.guide.stopped:
            return self._end("stop", entry, fresh)
        if len(self.tokens) >= params.max_tokens or length >= self.limits.max_context:
            return self._end("length", entry, fresh)
        self._emit(fresh, entry)
        return None

    def _pick(self, logits: torch.Tensor) -> int:
        params = self.request.params
        eos = self.limits.eos_ids
        if len(self.tokens) < params.min_tokens and eos:
            logits = logits.clone()
            logits[list(eos)] = float("-inf")  # as generate's min_new_tokens
        if self.guide is not None:
            logits = self.guide.mask(logits)
        if params.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1).cpu()
        if params.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p  # the nucleus
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def _find_stop(self) -> int | None:
        """Where the first stop string starts in the text, searching only what is new (and the
        longest stop's length before it, for a stop that straddles two tokens)."""
        stops = self.request.params.stop
        if not stops:
            return None
        text = self.text
        start = max(0, self._stop_scan - max(len(s) for s in stops))
        self._stop_scan = len(text)
        positions = [at for s in stops if (at := text.find(s, start)) >= 0]
        return min(positions) if positions else None

    def _emit(self, fresh: str, entry: TokenLogprob | None) -> None:
        self._sent += fresh
        first = len(self.tokens) == 1
        self.handle.emit(TokenEvent(self.tokens[-1], fresh, entry, self.prompt_logprobs if first else None))

    def _end(self, reason: str, entry: TokenLogprob | None, fresh: str = "", cut: int | None = None) -> Ending:
        """Stream the last token's event with the rest of the text (up to a stop string); ``fresh``:
        the text its token released."""
        rest = self._detokenizer.finish()
        text = self._sent + fresh + rest if cut is None else self.text[:cut]
        self._emit(text[len(self._sent):] if text.startswith(self._sent) else "", entry)
        return Ending(reason, text)

