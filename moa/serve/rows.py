"""One request's life inside the engine: its routing, tokens, text and how it ends.

A row picks its own tokens from its own logits (greedy or with its own seeded generator),
after its own masks (``min_tokens``, a structured-output :class:`~moa.serve.structured.Guide`),
and records log-probabilities from those same logits before any mask (:mod:`moa.serve.logprobs`).

A row whose mixture names an input-level adapter (prompt / prefix tuning) carries its
:class:`~moa.adapters.input_level.VirtualInput` and routes only the rest of its mixture
through the Linear-level adapters (:mod:`moa.serve.virtual_rows`); its virtual positions come
before its prompt, so its positions are shifted by :attr:`Row.offset`.

``n`` choices of one prompt are one *group*: a leader row, queued and prefilled like any
other, and its followers, which ride along until the prefill. The prompt is prefilled once;
every member picks its first token from the leader's last logits (each with its own
generator) and joins the batch with a copy of the leader's KV cache; from then on each one
decodes as a row of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from moa.errors import NonFiniteOutputError
from moa.routing.decision import RoutingDecision
from moa.serve.logprobs import prompt_logprobs, step_logprob
from moa.serve.packing import from_layer_argument
from moa.serve.requests import Completion, GenerationRequest, TokenEvent, TokenLogprob
from moa.serve.virtual_rows import RowInputs, offset_of, packable

if TYPE_CHECKING:
    from moa.adapters.input_level import VirtualInput
    from moa.serve.engine import Engine
    from moa.serve.handle import RequestHandle

logger = logging.getLogger(__name__)


class Row:
    """A running (or waiting) request.

    Its routing is fixed for its whole life: the mixture it names, or for ``auto`` the
    router's decision made once from the prompt (applied from the router's layer on, as
    inside a routed forward). ``length`` counts the prompt and the generated tokens; the
    last generated token is the next step's input, at position ``length - 1`` plus the
    row's virtual positions (:attr:`offset`).

    Attributes:
        mixture: The routing as asked for (input-level adapters included), reported back.
        linear: The Linear-level part of it (``None``: the base), what routing decisions get.
        virtual: The input-level adapters' virtual input, or ``None``.
    """

    def __init__(self, request: GenerationRequest, handle: RequestHandle, engine: Engine, submitted: float):
        self.request = request
        self.handle = handle
        self.engine = engine
        self.submitted = submitted
        self.seconds_queued = 0.0
        self.tokens: list[int] = []
        self.mixture: dict[str, float] = dict(request.routing.mixture)
        self.linear: dict[str, float] | None = self.mixture or None
        self.virtual: VirtualInput | None = None
        self.from_layer = 0
        self.finished = False
        self.cache: Any = None  # the row's own KV cache (deterministic mode)
        self.followers: list[Row] = []  # the other choices of this prompt, until the prefill
        self.guide = request.guide
        params = request.params
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._sent = ""  # text already streamed
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator()
            if params.seed is not None:
                self._generator.manual_seed(int(params.seed))
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

    @property
    def offset(self) -> int:
        """Virtual positions before the prompt (prefix entries and virtual embeddings)."""
        return offset_of(self.virtual)

    @property
    def position(self) -> int:
        """The position of the next step's input (the last token)."""
        return self.length - 1 + self.offset

    @property
    def packable(self) -> bool:
        """Whether its prefill may share a packed forward or a mixed step (no prefix)."""
        return packable(self.virtual)

    @property
    def prefill_ids(self) -> list[int]:
        """The sequence a packed prefill runs for it: a placeholder per virtual embedding, then the
        prompt (the placeholders' embeddings are put in, :func:`moa.serve.virtual_rows.embed_segments`)."""
        embeddings = self.virtual.embedding_length if self.virtual is not None else 0
        return [0] * embeddings + list(self.request.prompt_ids)

    @property
    def width(self) -> int:
        """Rows this one brings into the batch (itself and its followers)."""
        return 1 + len(self.followers)

    @property
    def prompt_logits(self) -> int:
        """Prompt positions whose logits the prefill must keep: all for prompt log-probabilities
        (``echo``), else the last."""
        return len(self.request.prompt_ids) if self.request.params.prompt_logprobs is not None else 1

    def group(self) -> list[Row]:
        """This row and its followers (the choices prefilled with it)."""
        return [self, *self.followers]

    def take_group(self) -> list[Row]:
        """:meth:`group`, detaching the followers: from now on each member is a row of its own."""
        members, self.followers = self.group(), []
        return members

    def adapters(self) -> tuple[str, ...]:
        """The adapters this row uses (for eviction and metrics)."""
        return tuple(self.mixture)

    def start_prefill(self) -> None:
        now = time.perf_counter()
        for row in self.group():
            row.seconds_queued = now - row.submitted

    def set_decided(self, mixture: dict[str, float], from_layer: int) -> None:
        """Pin the router's decision for this row and its followers (made from their prompt)."""
        for row in self.group():
            row.mixture = dict(mixture)
            row.linear = dict(mixture) or None
            row.from_layer = int(from_layer)

    def use_inputs(self, inputs: RowInputs) -> None:
        """Take the split of its mixture (:func:`moa.serve.virtual_rows.split_row`)."""
        self.linear, self.virtual = inputs.linear, inputs.virtual

    # -- routing ---------------------------------------------------------------------------

    def routing_kwargs(self, model: Any) -> dict[str, Any]:
        """The model arguments that give this row, alone, its routing."""
        return Row.batch_routing_kwargs([self], model)

    @staticmethod
    def batch_routing_kwargs(rows: Sequence[Row], model: Any) -> dict[str, Any]:
        """The model arguments giving each row of a batch its own routing (Linear-level adapters,
        numbered in the bank's slot order)."""
        decision = RoutingDecision.from_mixtures([row.linear for row in rows], model.bank.names)
        return {"routing_decision": decision,
                "adapters_from_layer": from_layer_argument([row.from_layer for row in rows])}

    # -- tokens ----------------------------------------------------------------------------

    def accept_prefill(self, logits: torch.Tensor) -> None:
        """Take the prefill's logits (``[prompt_logits, vocab]``): the prompt's log-probabilities
        when asked for, then each group member's first token from the last position."""
        scored = None
        params = self.request.params
        if params.prompt_logprobs is not None:
            scored = prompt_logprobs(logits[:-1], self.request.prompt_ids, params.prompt_logprobs)
        followers, self.followers = self.followers, []  # so a failing leader fails alone here
        for row in (self, *followers):
            row.prompt_logprobs = scored
            row.accept(logits[-1])  # a member that fails fails alone
        self.followers = followers  # they join the batch with the leader's cache (take_group)

    def accept(self, logits: torch.Tensor) -> None:
        """Pick the next token from this row's last logits, stream its text, maybe finish.

        Logits holding NaN or infinities (an adapter's weights overflowing) fail this request
        alone with :class:`~moa.errors.NonFiniteOutputError`; so does any other error here (a
        structured-output grammar refusing a token...): the engine's other rows go on.
        """
        try:
            self._accept(logits)
        except Exception as error:  # noqa: BLE001 - this row only; never the engine loop
            logger.warning("Request %s failed at token %d: %s", self.request_id, len(self.tokens), error)
            self.fail(error)

    def _accept(self, logits: torch.Tensor) -> None:
        if not bool(torch.isfinite(logits).all()):
            self.fail(NonFiniteOutputError(
                f"Request {self.request_id}: the model's logits hold NaN or infinite values (routing "
                f"{self.mixture or 'base'}); an adapter's weights overflow on this input. Reload the adapter "
                f"from its file or send the request to another adapter."))
            return
        params = self.request.params
        token = self._pick(logits)
        self.tokens.append(token)
        entry = None
        if self.logprobs is not None:
            entry = step_logprob(logits, token, params.logprobs or 0)
            self.logprobs.append(entry)
        eos = self.engine.eos_ids
        if token in eos:
            self._end("stop", self._text(), entry)
            return
        if self.guide is not None:
            self.guide.advance(token)
        text = self._text()
        stop_at = _first_stop(text, params.stop) if len(self.tokens) >= params.min_tokens else None
        if stop_at is not None:
            self._end("stop", text[:stop_at], entry)
        elif self.guide is not None and self.guide.stopped:
            self._end("stop", text, entry)
        elif len(self.tokens) >= params.max_tokens or self.length + self.offset >= self.engine.max_context:
            self._end("length", text, entry)
        else:
            self._stream(text, final=False, entry=entry)

    def _pick(self, logits: torch.Tensor) -> int:
        params = self.request.params
        if len(self.tokens) < params.min_tokens and self.engine.eos_ids:
            logits = logits.clone()
            logits[list(self.engine.eos_ids)] = float("-inf")  # as generate's min_new_tokens
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

    def _text(self) -> str:
        tokenizer = self.engine.model.tokenizer
        ids = [t for t in self.tokens if t not in self.engine.eos_ids]
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""

    def _stream(self, text: str, final: bool, entry: TokenLogprob | None) -> None:
        """Send the newest token's event with the text not sent yet, holding back what may still
        change (a split UTF-8 character, the start of a stop string) unless this is the end."""
        safe = text if final else _stable_prefix(text, self.request.params.stop)
        delta = safe[len(self._sent):] if safe.startswith(self._sent) else ""
        self._sent += delta
        first = len(self.tokens) == 1
        self.handle.emit(TokenEvent(self.tokens[-1], delta, entry,
                                    self.prompt_logprobs if first else None))

    def _end(self, reason: str, text: str, entry: TokenLogprob | None) -> None:
        """Stream the last token (and the rest of the text), then finish."""
        self._stream(text, final=True, entry=entry)
        self.finish(reason, text)

    def fail(self, error: Exception) -> None:
        """End the request with ``error`` (its client gets it; the other rows go on). Followers
        not yet prefilled fail with it."""
        for row in self.take_group():
            if not row.finished:
                row.finished = True
                row.handle.finish(None, error)

    def finish(self, reason: str, text: str | None = None) -> None:
        """End the request: hand the completion to the client. Cancelling a leader before its
        prefill cancels its followers."""
        if self.finished:
            return
        if reason == "cancelled":
            for row in self.take_group()[1:]:
                row.finish(reason)
        self.finished = True
        completion = Completion(
            text=self._text() if text is None else text,
            token_ids=list(self.tokens),
            finish_reason=reason,
            routing=dict(self.mixture),
            prompt_tokens=len(self.request.prompt_ids),
            seconds_queued=self.seconds_queued,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
        )
        self.handle.finish(completion)


def eos_ids(model: Any) -> frozenset[int]:
    """Token ids that end a completion (the generation config's and the tokenizer's EOS)."""
    ids: set[int] = set()
    config = getattr(model.base_model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(e) for e in eos)
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


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
