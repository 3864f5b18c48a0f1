"""One forward that decodes the running rows and prefills newly admitted prompts together.

On a CPU a forward's cost is nearly flat in its token count up to a few dozen tokens: the
weights are read once whatever the batch (default base, fp32, 2 threads: one sequence of
1 token ~100 ms, 16 tokens ~200 ms, 64 tokens ~330 ms). A request that arrives while 15
rows decode therefore cost a whole extra forward (its prefill) on top of the decode step.
Piggybacking the prompt on the decode step (as Sarathi-Serve and vLLM's chunked prefill
do) pays for the weights once: the step's tokens are packed into one sequence, the running
rows' one token each first, then each new prompt whole::

    [ row 0 | row 1 | ... | row B-1 | prompt 0 ... | prompt 1 ... ]

* positions: each running row's token at its own position, each prompt's from 0;
* routing: per token, each token carries its request's mixture and first adapter layer
  (as the packed prefill, :mod:`moa.serve.packing`);
* attention: only the attention differs from a plain forward, so the base runs with
  moa's attention function (:data:`ATTENTION`, registered with transformers'
  ``AttentionInterface``). Outside a mixed step it IS transformers' SDPA attention (the
  same function, same arguments, so ``generate`` on the model is bit for bit unchanged).
  Inside one (the ``moa_step`` keyword argument reaches it through the model's kwargs), the
  running rows' queries attend to their left-padded batch cache exactly as in a decode
  step, and each prompt's queries attend causally to that prompt alone, as in its own
  prefill: no token sees another request's keys, and no work is spent on masked pairs;
* KV cache: :class:`StepCache` appends the running rows' new keys/values to the batch
  cache and keeps each prompt's, which then join the batch as a packed prefill's do;
* chunked prefill: a "prompt" may be one chunk of a longer one (the scheduler spreads long
  prompts over steps, :mod:`moa.serve.scheduler`): its positions start where the previous chunk
  ended, and its queries attend to the keys/values of its earlier chunks, then causally to its
  own, so the prompt ends with what one whole prefill gives;
* input-level adapters: a prompt-tuning request's segment is its virtual embeddings, then its
  prompt (the whole step goes in as ``inputs_embeds``), and a running row's position counts its
  virtual positions (:mod:`moa.serve.virtual_rows`); prefix-tuning requests are not mixed in.

Only bases whose attention is transformers' SDPA are supported (:func:`supports`); the
engine prefills separately otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from moa import compat
from moa.errors import MoaError
from moa.serve import packing
from moa.serve.virtual_rows import embed_segments

logger = logging.getLogger(__name__)

#: The name moa's attention is registered under in transformers' ``AttentionInterface``.
ATTENTION = "moa_serve"
#: The attention implementation a mixed step builds on (and the one it stands in for).
_BASE_ATTENTION = "sdpa"


def supports(model: Any) -> bool:
    """Whether ``model``'s base can run mixed steps (its attention is SDPA or moa's)."""
    config = getattr(getattr(model, "base_model", None), "config", None)
    return compat.attn_implementation(config) in (_BASE_ATTENTION, ATTENTION)


def enable(model: Any) -> bool:
    """Switch ``model``'s base to moa's attention (SDPA outside mixed steps).

    Returns:
        Whether mixed steps can run (``False``, nothing changed, for a non-SDPA base).
    """
    if not supports(model):
        return False
    try:
        _register()
        if compat.attn_implementation(model.base_model.config) != ATTENTION:
            model.base_model.set_attn_implementation(ATTENTION)
    except Exception as error:  # noqa: BLE001 - a transformers without these hooks: serve without mixed steps
        logger.warning("Mixed steps are off: this transformers would not take moa's attention (%s).", error)
        disable(model)
        return False
    return True


def disable(model: Any) -> None:
    """Give ``model``'s base back plain SDPA attention."""
    if supports(model) and compat.attn_implementation(model.base_model.config) == ATTENTION:
        model.base_model.set_attn_implementation(_BASE_ATTENTION)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks built as for SDPA, outside mixed steps


class StepCache:
    """The KV cache of one mixed step, as the base's attention layers call it.

    Args:
        batch_layers: The running rows' batch cache (``BatchCache.cache``), grown by one
            column per layer, as a decode step grows it (``None``: no row runs).
        rows: Running rows (their tokens come first in the packed sequence).
        prompt_lengths: Each prompt chunk's token count, in packed order.
        priors: Per chunk, the keys/values of its prompt's earlier chunks (``None``: it starts
            the prompt); a chunk attends to them, then causally to itself.
    """

    def __init__(self, batch_layers: Any, rows: int, prompt_lengths: Sequence[int],
                 priors: Sequence[packing.RowKV | None] | None = None):
        self.batch = batch_layers
        self.rows = rows
        self.prompt_lengths = list(prompt_lengths)
        self.priors = list(priors) if priors is not None else [None] * len(self.prompt_lengths)
        self.decode_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the running rows' new keys/values (``[1, kv_heads, T, head_dim]``, packed)
        to the batch cache, keep the prompts'; hand the packed ones on to the attention."""
        b = self.rows
        if b:
            per_row = (keys[0, :, :b].transpose(0, 1).unsqueeze(2), values[0, :, :b].transpose(0, 1).unsqueeze(2))
            self.decode_kv[layer_idx] = self.batch.update(*per_row, layer_idx)
        self.prompt_kv[layer_idx] = (keys[:, :, b:], values[:, :, b:])
        return keys, values

    def prompt_rows(self) -> list[packing.RowKV]:
        """Each prompt's per-layer keys/values so far (batch 1): its earlier chunks', then this
        step's, ready to join the batch (or to be continued at a later step)."""
        layers = [self.prompt_kv[i] for i in sorted(self.prompt_kv)]
        rows = packing.split(layers, self.prompt_lengths)
        return [row if prior is None else [(torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2))
                                           for (pk, pv), (k, v) in zip(prior, row, strict=True)]
                for row, prior in zip(rows, self.priors, strict=True)]


class StepLayout:
    """What moa's attention needs to split a mixed step (passed as ``moa_step=``).

    Attributes:
        cache: The step's :class:`StepCache`.
        decode_mask: ``[B, 1, 1, L + 1]`` bool, True where a running row may attend
            (``None`` when no row has padding), as transformers builds it for SDPA.
    """

    def __init__(self, cache: StepCache, padding_mask: torch.Tensor | None):
        self.cache = cache
        self.decode_mask = None if padding_mask is None or bool(padding_mask.all()) \
            else padding_mask.bool()[:, None, None, :]


def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """moa's attention: transformers' SDPA, split per request inside a mixed step.

    Returns ``([1, T, heads, head_dim], None)`` in a mixed step, else SDPA's own result.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout: StepLayout | None = kwargs.pop("moa_step", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    cache = layout.cache
    b = cache.rows
    outputs = []
    if b:
        keys, values = cache.decode_kv[module.layer_idx]
        row_queries = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
        decoded, _ = sdpa_attention_forward(module, row_queries, keys, values, layout.decode_mask, **kwargs)
        outputs.append(decoded.transpose(0, 1))  # [1, B, heads, head_dim]
    start = b
    for length, prior in zip(cache.prompt_lengths, cache.priors, strict=True):
        piece = slice(start, start + length)
        if prior is None:  # causal within the prompt, as its own prefill
            prefilled, _ = sdpa_attention_forward(module, query[:, :, piece], key[:, :, piece], value[:, :, piece],
                                                  None, **kwargs)
        else:  # a later chunk: its earlier chunks, then causally itself
            done = prior[module.layer_idx][0].shape[-2]
            keys = torch.cat([prior[module.layer_idx][0], key[:, :, piece]], dim=-2)
            values = torch.cat([prior[module.layer_idx][1], value[:, :, piece]], dim=-2)
            mask = torch.ones(length, done + length, dtype=torch.bool, device=query.device).tril(done)
            prefilled, _ = sdpa_attention_forward(module, query[:, :, piece], keys, values, mask[None, None],
                                                  **kwargs)
        outputs.append(prefilled)
        start += length
    return torch.cat(outputs, dim=1), None


def step_inputs(
    tokens: Sequence[int],
    positions: Sequence[int],
    prompts: Sequence[Sequence[int]],
    device: torch.device,
    kept: Sequence[int] | None = None,
    starts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``input_ids``, ``position_ids`` and ``logits_to_keep`` of one mixed step.

    The kept logits are each running row's (its next token), then each prompt's last
    token's (its first token; ``kept[i]`` last positions of prompt ``i`` when given, all of
    them for prompt log-probabilities), in that order. A prompt chunk's positions start at
    ``starts[i]`` (default 0: a whole prompt). ``attention_mask`` is an empty 4D tensor:
    transformers then builds no mask (moa's attention makes its own per request).
    """
    lengths = [len(p) for p in prompts]
    starts = list(starts) if starts is not None else [0] * len(prompts)
    ids = [*tokens, *(t for p in prompts for t in p)]
    pos = [*positions, *(s + i for s, n in zip(starts, lengths, strict=True) for i in range(n))]
    rows = len(tokens)
    ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) + rows
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long, device=device),
        "position_ids": torch.tensor([pos], dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, 1, 0, 0, dtype=torch.bool, device=device),
        "logits_to_keep": torch.cat([torch.arange(rows), packing.kept_positions(ends, kept, torch.device("cpu"))])
        .to(device),
    }


def run(model: Any, batch: Any, running: Sequence[Any], chunks: Sequence[Any], cache_key: str
        ) -> tuple[torch.Tensor, list[packing.RowKV]]:
    """One mixed step's forward over the engine's rows.

    Args:
        model: The served model (moa's attention switched on, :func:`enable`).
        batch: The running rows' :class:`~moa.serve.batch_cache.BatchCache`; it grows by one
            column (and is put back as it was if the forward fails). ``None`` when no row runs.
        running: The running rows (:class:`~moa.serve.rows.Row`), in the batch's order.
        chunks: The prompt chunks to prefill (:class:`~moa.serve.scheduler.Chunk`; their rows
            have no prefix; a chunk after the first attends to its row's ``prompt_kv``).
        cache_key: The name the base's forward takes its cache by.

    Returns:
        Per kept position its logits (the running rows', then per chunk its prompt's kept
        positions when it ends the prompt, else its last position), and each chunk's prompt's
        keys/values so far, ready to join the batch or to be continued.

    Raises:
        MoaError: the base's attention is no longer moa's (someone switched it).
    """
    if not supports(model):
        raise MoaError("The base's attention is no longer moa's; mixed steps are off for this step.")
    before = batch.snapshot() if batch is not None else None
    prompts = [chunk.row.prefill_ids[chunk.start: chunk.stop] for chunk in chunks]
    lengths = [len(p) for p in prompts]
    priors = [chunk.row.prompt_kv if chunk.start else None for chunk in chunks]
    cache = StepCache(batch.cache if batch is not None else None, len(running), lengths, priors)
    kept = [chunk.row.prompt_logits if chunk.last else 1 for chunk in chunks]
    inputs = step_inputs([row.last_token for row in running], [row.position for row in running], prompts,
                         model.device, kept, [chunk.start for chunk in chunks])
    inputs = embed_segments(model, inputs, [None if chunk.start else chunk.row.virtual for chunk in chunks],
                            lengths, len(running))
    routes = [row.route for row in running] + [chunk.row.route for chunk in chunks]
    routing = packing.packed_routing([r.linear for r in routes], [r.from_layer for r in routes],
                                     [1] * len(running) + lengths, model.bank.names)
    layout = StepLayout(cache, batch.attention_mask() if batch is not None else None)
    try:
        out = model(**inputs, **{cache_key: cache}, use_cache=True, moa_step=layout,  # checked, as a packed prefill
                    **routing)
    except BaseException:
        if batch is not None:
            batch.restore(before)
        raise
    if batch is not None:
        batch.advance()
    return out.logits[0], cache.prompt_rows()
