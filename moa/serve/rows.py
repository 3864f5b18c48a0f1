"""One request's life inside the engine: its routing, its prefill progress, how it ends.

A row's tokens, text and ending are its :class:`~moa.serve.output.OutputProcessor`'s; the row
adds its routing (:class:`RowRoute`: a mixture pinned for its whole life, or a token-level
router asked at every step, exactly as inside ``model.generate``), where its prefill stands
(chunks prefilled so far and their keys/values), and its group.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moa.serve.logprobs import prompt_logprobs
from moa.serve.output import OutputLimits, OutputProcessor
from moa.serve.requests import Completion, GenerationRequest
from moa.serve.virtual_rows import RowInputs, offset_of, packable

if TYPE_CHECKING:
    from moa.adapters.input_level import VirtualInput
    from moa.serve.handle import RequestHandle
    from moa.serve.packing import RowKV

logger = logging.getLogger(__name__)


@dataclass
class RowRoute:
    """A row's Linear-level routing.

    Attributes:
        linear: The mixture applied (``None``: the base); for a token-level row, the
            prompt's average decision, reported only.
        from_layer: The first decoder layer its adapters apply at (a router's layer for a
            routed row, so layers below run on the base, as when it was routed).
        per_token: The router decides every new token (a token-level router), inside each
            forward, as ``generate`` does; ``linear`` is then not applied.
    """

    linear: dict[str, float] | None = None
    from_layer: int = 0
    per_token: bool = False


class Row:
    """A waiting, prefilling or running request.

    Its routing is fixed for its whole life (:class:`RowRoute`). ``length`` counts the prompt
    and the generated tokens; the last generated token is the next step's input, at position
    ``length - 1`` plus the row's virtual positions (:attr:`offset`).

    Attributes:
        mixture: The routing as asked for (input-level adapters included), reported back.
        route: Its Linear-level routing.
        virtual: The input-level adapters' virtual input, or ``None``.
        output: Its tokens, text and ending.
        prefilled: Prefill tokens whose keys/values exist (earlier chunks, a cached prefix).
        prompt_kv: Their per-layer keys/values while the prefill is under way.
        cached_prefix: Prompt tokens taken from the prefix cache.
    """

    def __init__(self, request: GenerationRequest, handle: RequestHandle, limits: OutputLimits, submitted: float):
        self.request = request
        self.handle = handle
        self.submitted = submitted
        self.seconds_queued = 0.0
        self.mixture: dict[str, float] = dict(request.routing.mixture)
        self.route = RowRoute(self.mixture or None)
        self.virtual: VirtualInput | None = None
        self.finished = False
        self.cache: Any = None  # the row's own KV cache (deterministic mode)
        self.followers: list[Row] = []  # the other choices of this prompt, until the prefill
        self.output = OutputProcessor(request, handle, limits)
        self.prefilled = 0
        self.prompt_kv: RowKV | None = None
        self.cached_prefix = 0  # prompt tokens whose keys/values came from the prefix cache

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        return self.output.tokens

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
    def cancelled(self) -> bool:
        return self.handle.cancelled.is_set()

    @property
    def packable(self) -> bool:
        """Whether its prefill may share a packed forward or a mixed step (no prefix, and its
        routing is fixed: a token-level router's prefill runs alone, as in ``generate``)."""
        return packable(self.virtual) and not self.route.per_token

    @property
    def chunkable(self) -> bool:
        """Whether its prompt may be prefilled over several steps: packable, no virtual
        embeddings and no prompt log-probabilities (they need every position's logits at once)."""
        return self.packable and self.virtual is None and self.request.params.prompt_logprobs is None

    @property
    def prefill_ids(self) -> list[int]:
        """The sequence a packed prefill runs for it: a placeholder per virtual embedding, then the
        prompt (the placeholders' embeddings are put in, :func:`moa.serve.virtual_rows.embed_segments`)."""
        embeddings = self.virtual.embedding_length if self.virtual is not None else 0
        return [0] * embeddings + list(self.request.prompt_ids)

    @property
    def prefill_total(self) -> int:
        """Tokens its prefill runs (virtual embeddings, then the prompt)."""
        return (self.virtual.embedding_length if self.virtual is not None else 0) + len(self.request.prompt_ids)

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

    def set_decided(self, mixture: dict[str, float], from_layer: int, per_token: bool = False) -> None:
        """Pin the router's decision for this row and its followers (made from their prompt);
        with ``per_token``, the router decides again at every step and ``mixture`` is reported only."""
        for row in self.group():
            row.mixture = dict(mixture)
            row.route = RowRoute(dict(mixture) or None, int(from_layer), per_token)

    def use_inputs(self, inputs: RowInputs) -> None:
        """Take the split of its mixture (:func:`moa.serve.virtual_rows.split_row`)."""
        self.route = RowRoute(inputs.linear, self.route.from_layer, self.route.per_token)
        self.virtual = inputs.virtual

    def forget_prefill(self) -> None:
        """Drop the keys/values prefilled so far (to prefill the prompt whole instead)."""
        self.prefilled, self.prompt_kv, self.cached_prefix = 0, None, 0

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
            row.output.prompt_logprobs = scored
            row.accept(logits[-1])  # a member that fails fails alone
        self.followers = followers  # they join the batch with the leader's cache (take_group)

    def accept(self, logits: torch.Tensor) -> None:
        """Pick the next token from this row's last logits, stream its text, maybe finish.

        Any error here (NaN or infinite logits, a structured-output grammar refusing a token, a
        tokenizer failing to decode...) fails this request alone; the engine's other rows go on.
        """
        try:
            ending = self.output.accept(logits, self.length + 1 + self.offset)
        except Exception as error:  # noqa: BLE001 - this row only; never the engine loop
            logger.warning("Request %s failed at token %d: %s", self.request_id, len(self.tokens), error)
            self.fail(error)
            return
        if ending is not None:
            self.finish(ending.reason, ending.text)

    def fail(self, error: Exception) -> None:
        """End the request with ``error`` (its client gets it; the other rows go on). Followers
        not yet prefilled fail with it."""
        self.prompt_kv = None
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
        self.prompt_kv = None
        output = self.output
        completion = Completion(
            text=output.text if text is None else text,
            token_ids=list(self.tokens),
            finish_reason=reason,
            routing=dict(self.mixture),
            prompt_tokens=len(self.request.prompt_ids),
            seconds_queued=self.seconds_queued,
            logprobs=list(output.logprobs) if output.logprobs is not None else None,
            prompt_logprobs=output.prompt_logprobs,
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

