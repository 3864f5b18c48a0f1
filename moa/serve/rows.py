"""One request's life inside the engine: its routing, tokens, text and how it ends."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from moa.errors import NonFiniteOutputError
from moa.routing.decision import RoutingDecision
from moa.serve.packing import from_layer_argument
from moa.serve.requests import Completion, GenerationRequest, TokenEvent

if TYPE_CHECKING:
    from moa.serve.engine import Engine
    from moa.serve.handle import RequestHandle


class Row:
    """A running (or waiting) request.

    Its routing is fixed for its whole life: the mixture it names, or for ``auto`` the
    router's decision made once from the prompt (applied from the router's layer on, as
    inside a routed forward). ``length`` counts the prompt and the generated tokens; the
    last generated token is the next step's input, at position ``length - 1``.
    """

    def __init__(self, request: GenerationRequest, handle: RequestHandle, engine: Engine, submitted: float):
        self.request = request
        self.handle = handle
        self.engine = engine
        self.submitted = submitted
        self.seconds_queued = 0.0
        self.tokens: list[int] = []
        self.mixture: dict[str, float] = dict(request.routing.mixture)
        self.from_layer = 0
        self.finished = False
        self.cache: Any = None  # the row's own KV cache (deterministic mode)
        self._sent = ""  # text already streamed
        self._generator: torch.Generator | None = None
        if not request.params.greedy:
            self._generator = torch.Generator()
            if request.params.seed is not None:
                self._generator.manual_seed(int(request.params.seed))
            else:
                self._generator.seed()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.tokens)

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    def adapters(self) -> tuple[str, ...]:
        """The adapters this row uses (for eviction and metrics)."""
        return tuple(self.mixture)

    def start_prefill(self) -> None:
        self.seconds_queued = time.perf_counter() - self.submitted

    def set_decided(self, mixture: dict[str, float], from_layer: int) -> None:
        """Pin the router's decision for this row (made from its prompt)."""
        self.mixture = dict(mixture)
        self.from_layer = int(from_layer)

    # -- routing ---------------------------------------------------------------------------

    def routing_kwargs(self, model: Any) -> dict[str, Any]:
        """The model arguments that give this row, alone, its routing."""
        return Row.batch_routing_kwargs([self], model)

    @staticmethod
    def batch_routing_kwargs(rows: Sequence[Row], model: Any) -> dict[str, Any]:
        """The model arguments giving each row of a batch its own routing."""
        decision = RoutingDecision.from_mixtures([row.mixture or None for row in rows], model.adapter_names)
        return {"routing_decision": decision,
                "adapters_from_layer": from_layer_argument([row.from_layer for row in rows])}

    # -- tokens ----------------------------------------------------------------------------

    def accept(self, logits: torch.Tensor) -> None:
        """Pick the next token from this row's last logits, stream its text, maybe finish.

        Logits holding NaN or infinities (an adapter's weights overflowing) fail this request
        alone with :class:`~moa.errors.NonFiniteOutputError`; the engine's other rows go on.
        """
        if not bool(torch.isfinite(logits).all()):
            self.fail(NonFiniteOutputError(
                f"Request {self.request_id}: the model's logits hold NaN or infinite values (routing "
                f"{self.mixture or 'base'}); an adapter's weights overflow on this input. Reload the adapter "
                f"from its file or send the request to another adapter."))
            return
        token = self._pick(logits)
        self.tokens.append(token)
        params = self.request.params
        if token in self.engine.eos_ids:
            self.finish("stop")
            return
        text = self._text()
        stop_at = _first_stop(text, params.stop) if len(self.tokens) >= params.min_tokens else None
        if stop_at is not None:
            self._stream(text[:stop_at], final=True)
            self.finish("stop", text[:stop_at])
            return
        if len(self.tokens) >= params.max_tokens or self.length >= self.engine.max_context:
            self.finish("length")
            return
        self._stream(text, final=False, event_token=token)

    def _pick(self, logits: torch.Tensor) -> int:
        params = self.request.params
        if len(self.tokens) < params.min_tokens and self.engine.eos_ids:
            logits = logits.clone()
            logits[list(self.engine.eos_ids)] = float("-inf")  # as generate's min_new_tokens
        if params.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1).cpu()
        if params.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p  # the nucleus
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def _text(self) -> str:
        tokenizer = self.engine.model.tokenizer
        ids = [t for t in self.tokens if t not in self.engine.eos_ids]
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""

    def _stream(self, text: str, final: bool, event_token: int | None = None) -> None:
        """Send the text not sent yet, holding back what may still change (a split UTF-8
        character, the start of a stop string) unless this is the end."""
        safe = text if final else _stable_prefix(text, self.request.params.stop)
        delta = safe[len(self._sent):] if safe.startswith(self._sent) else ""
        if delta or event_token is not None:
            self._sent += delta
            self.handle.emit(TokenEvent(self.tokens[-1] if event_token is None else event_token, delta))

    def fail(self, error: Exception) -> None:
        """End the request with ``error`` (its client gets it; the other rows go on)."""
        if not self.finished:
            self.finished = True
            self.handle.finish(None, error)

    def finish(self, reason: str, text: str | None = None) -> None:
        """End the request: flush the text, hand the completion to the client."""
        if self.finished:
            return
        self.finished = True
        if text is None:
            text = self._text()
            if reason != "cancelled":
                self._stream(text, final=True)
        completion = Completion(
            text=text,
            token_ids=list(self.tokens),
            finish_reason=reason,
            routing=dict(self.mixture),
            prompt_tokens=len(self.request.prompt_ids),
            seconds_queued=self.seconds_queued,
        )
        self.handle.finish(completion)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None


def _stable_prefix(text: str, stops: Sequence[str]) -> str:
    """``text`` minus a trailing replacement character and any tail that starts a stop string."""
    if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return text[: len(text) - hold] if hold else text
