"""The engine's forwards over the model: prefills (alone, packed, chunked), decode steps, mixed steps.

The model runner owns the running rows' batch KV cache (:class:`~moa.serve.batch_cache.BatchCache`)
and turns rows into model arguments; it picks no tokens (each row's
:class:`~moa.serve.output.OutputProcessor` does) and keeps no queue (the
:class:`~moa.serve.scheduler.Scheduler` does). Every forward here takes the path ``model.generate``
takes for the same rows:

* a row pinned to a mixture (named, weighted, or a sequence-level router's decision made once
  from its prompt) gets it as a ready routing decision, from its first adapter layer on;
* a row routed by a token-level router is routed *inside* every forward, by the model's
  controller, exactly as inside ``generate`` (``adapter_weights="auto"`` for that row): the
  router sees each new token's hidden state and decides it. Such a row is prefilled alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moa.routing.decision import RoutingDecision
from moa.serve import mixed_step, packing, virtual_rows
from moa.serve.batch_cache import BatchCache, cache_argument, layer_tensors, new_cache, prefill_inputs
from moa.serve.packing import from_layer_argument
from moa.serve.rows import Row


def routing_kwargs(rows: Sequence[Row], model: Any) -> dict[str, Any]:
    """The model arguments giving each row of a batch its own routing.

    Rows pinned to a mixture get a ready decision (Linear-level adapters, numbered in the
    bank's slot order) from their first adapter layer on; when a row is routed per token, the
    call names each row instead (``"auto"`` for the routed ones), so the model's router decides
    those rows' new tokens inside the forward.
    """
    if any(row.route.per_token for row in rows):
        return {"adapter_weights": ["auto" if row.route.per_token else row.route.linear for row in rows]}
    decision = RoutingDecision.from_mixtures([row.route.linear for row in rows], model.bank.names)
    return {"routing_decision": decision,
            "adapters_from_layer": from_layer_argument([row.route.from_layer for row in rows])}


class ModelRunner:
    """Runs the engine's forwards.

    Args:
        model: The served :class:`~moa.MixtureModel`.
        deterministic: Every row has its own cache and runs alone.
    """

    def __init__(self, model: Any, *, deterministic: bool):
        self.model = model
        self.deterministic = deterministic
        self.cache_key = cache_argument(model)
        self.batch: BatchCache | None = None
        self.steps = 0
        self.prefill_forwards = 0  # prefill forwards run (a packed one counts once)
        self.prefilled_requests = 0
        self.mixed_steps_run = 0  # forwards that decoded and prefilled together
        self.prompt_chunks = 0  # chunks of prompts split over several steps

    # -- routing ---------------------------------------------------------------------------

    def decide(self, row: Row) -> None:
        """The router's decision for an ``auto`` row, from its prompt alone, exactly as inside
        ``generate``'s prefill: pinned for a sequence-level router; for a token-level one the
        prompt's average is reported and the router decides every token in the forwards."""
        if not row.request.routing.auto:
            return
        model = self.model
        inputs = prefill_inputs(row.request.prompt_ids, model.device)
        mixture = model.route(inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
        router = model.router
        row.set_decided(mixture, int(router.hidden_layer or 0), per_token=router.level == "token")

    # -- prefills --------------------------------------------------------------------------

    def prefill_alone(self, row: Row) -> tuple[torch.Tensor, Any]:
        """The ops of ``model.generate``'s prefill on this request alone.

        Returns:
            The kept logits (``[row.prompt_logits, vocab]``) and the row's cache (its own
            ``DynamicCache`` when deterministic, else its per-layer keys/values).
        """
        model = self.model
        cache = new_cache(model)
        inputs = virtual_rows.prefill_alone_inputs(model, row.request.prompt_ids, row.virtual, cache)
        out = model(**inputs, **{self.cache_key: cache}, use_cache=True, logits_to_keep=row.prompt_logits,
                    check_finite=False, **routing_kwargs([row], model))
        self.prefill_forwards += 1
        self.prefilled_requests += 1
        return out.logits[0], cache if self.deterministic else layer_tensors(cache)

    def prefill_packed(self, rows: Sequence[Row]) -> tuple[list[torch.Tensor], list[packing.RowKV]]:
        """One forward over the rows' whole prompts packed end to end (:mod:`moa.serve.packing`).

        Returns:
            Per row its kept logits and its per-layer keys/values.
        """
        model = self.model
        prompts = [row.prefill_ids for row in rows]  # virtual embeddings' slots, then the prompt
        lengths = [len(p) for p in prompts]
        inputs = packing.packed_inputs(prompts, model.device, model.base_model.dtype,
                                       [row.prompt_logits for row in rows])
        inputs = virtual_rows.embed_segments(model, inputs, [row.virtual for row in rows], lengths)
        routing = packing.packed_routing([row.route.linear for row in rows], [row.route.from_layer for row in rows],
                                         lengths, model.bank.names)
        cache = new_cache(model)
        # Checked: a NaN in one packed prompt reaches the others through attention's masked
        # products (0 * NaN), so non-finite logits fail the packing and each prompt runs alone.
        out = model(**inputs, **{self.cache_key: cache}, use_cache=True, **routing)
        self.prefill_forwards += 1
        self.prefilled_requests += len(rows)
        logits = list(out.logits[0].split([row.prompt_logits for row in rows]))
        return logits, packing.split(layer_tensors(cache), lengths)

    # -- steps -----------------------------------------------------------------------------

    def mixed(self, running: Sequence[Row], chunks: Sequence[Any]) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                          list[packing.RowKV]]:
        """Decode ``running`` and prefill prompt ``chunks`` in ONE forward (:mod:`moa.serve.mixed_step`).

        Returns:
            The running rows' logits ``[B, vocab]``, per chunk its kept logits, per chunk its
            prompt's keys/values so far. The batch cache grows by one column (unchanged if the
            forward fails).
        """
        logits, prompt_kv = mixed_step.run(self.model, self.batch if running else None, running, chunks,
                                           self.cache_key)
        if running:
            self.steps += 1
            self.mixed_steps_run += 1
        self.prefill_forwards += 1
        self.prefilled_requests += sum(chunk.last for chunk in chunks)
        self.prompt_chunks += sum(bool(chunk.start or not chunk.last) for chunk in chunks)
        kept = [chunk.row.prompt_logits if chunk.last else 1 for chunk in chunks]
        b = len(running)
        return logits[:b], list(logits[b:].split(kept)), prompt_kv

    def decode(self, rows: Sequence[Row]) -> torch.Tensor:
        """One decode step of the running ``rows``: their next-token logits ``[B, vocab]``."""
        model = self.model
        self.steps += 1
        if self.deterministic:
            logits = []
            for row in rows:
                inputs = {"input_ids": torch.tensor([[row.last_token]], device=model.device),
                          "position_ids": torch.tensor([[row.position]], device=model.device)}
                out = model(**inputs, attention_mask=torch.ones(1, row.length + row.offset, dtype=torch.long),
                            **{self.cache_key: row.cache}, use_cache=True, check_finite=False,
                            **routing_kwargs([row], model))
                logits.append(out.logits[0, -1])
            return torch.stack(logits)
        batch = self.batch
        assert batch is not None
        inputs = batch.step_inputs([row.last_token for row in rows], [row.position for row in rows],
                                   model.device, self.cache_key)
        before = batch.snapshot()
        try:
            out = model(**inputs, use_cache=True, check_finite=False, **routing_kwargs(rows, model))
        except BaseException:
            batch.restore(before)
            raise
        batch.advance()
        return out.logits[:, -1]

    # -- the batch cache -------------------------------------------------------------------

    def join(self, rows: Sequence[Row], caches: Sequence[Any]) -> None:
        """Add prefilled rows (each with its cache from a prefill) to the batch, in order."""
        if not rows:
            return
        if self.deterministic:
            for row, cache in zip(rows, caches, strict=True):
                row.cache = cache
        elif self.batch is None:
            self.batch = BatchCache.from_rows(list(caches))
        else:
            self.batch.join_rows(list(caches))

    def keep(self, size: int, gone: Sequence[int]) -> None:
        """Drop the batch rows at ``gone`` (of ``size``); the batch goes when none is left."""
        if not gone or self.batch is None:
            return
        left = [i for i in range(size) if i not in set(gone)]
        if left:
            self.batch.keep(left)
        else:
            self.batch = None

    def clear(self) -> None:
        """Forget the batch (every row left)."""
        self.batch = None
