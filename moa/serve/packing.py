"""One prefill forward for several prompts, packed into one sequence without padding.

Prefilling each new request alone re-reads every weight of the base once per request,
and on a CPU a short prompt's forward is dominated by that: measured on the default base
(fp32, 2 threads), 16 chat prompts of 37-92 tokens cost 3.8 s prefilled one by one and
2.3 s packed. Packing (as vLLM's and transformers' continuous batching do) puts the prompts
end to end in a batch of one row:

* ``position_ids`` restart at 0 for each prompt, so every token has the position it has
  alone (rotary embeddings, and the KV cache keeps keys at those positions);
* a 4D block-diagonal causal mask lets a token see only the earlier tokens of its own
  prompt (transformers takes a 4D mask as given);
* the routing is per token: each prompt's tokens carry its request's mixture, and its
  own first adapter layer (a router-decided request keeps adapters off below the router's
  layer, as in a routed forward);
* ``logits_to_keep`` keeps only the logits of each prompt's last token;
* a prompt-tuning request's prompt starts with a placeholder per virtual token, whose
  embeddings are put in afterwards (:func:`moa.serve.virtual_rows.embed_segments`), so its
  virtual tokens and prompt take positions ``0..n+S-1``, as alone.

The cache that comes out holds every prompt's keys and values side by side; :func:`split`
cuts it into one cache per prompt, ready to join the decode batch. No padding, so no
padding-width effects; the float sums of a packed forward may still differ in the last bits
from the same prompt alone (larger matrix products, a masked attention kernel), which
``benchmarks/serve_load.py`` measures as greedy answers equal to the request alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moa.routing.decision import RoutingDecision

#: Per layer, one prompt's ``(keys, values)``, each ``[1, kv_heads, prompt_len, head_dim]``.
RowKV = list[tuple[torch.Tensor, torch.Tensor]]


def packed_inputs(prompts: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype,
                  kept: Sequence[int] | None = None) -> dict[str, Any]:
    """The inputs of one packed prefill of ``prompts`` (at least one, none empty).

    Args:
        prompts: Token ids of each prompt.
        device: Where the model runs.
        dtype: The model's compute dtype (the additive mask's).
        kept: Per prompt, how many of its last positions' logits to keep (default 1; a
            prompt's length keeps them all, for its prompt log-probabilities).

    Returns:
        ``input_ids`` and ``position_ids`` ``[1, N]``, a 4D additive ``attention_mask``
        ``[1, 1, N, N]`` (0 where a token may attend, the dtype's minimum elsewhere) and
        ``logits_to_keep``: the indices of each prompt's kept positions, prompt by prompt.
    """
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long, device=device)
    segment = torch.repeat_interleave(torch.arange(len(prompts), device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(ids.shape[1], device=device) - torch.repeat_interleave(starts, lengths)
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    allowed = causal & (segment[:, None] == segment[None, :])
    mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {
        "input_ids": ids,
        "position_ids": positions[None],
        "attention_mask": mask[None, None],
        "logits_to_keep": kept_positions(starts + lengths, kept, device),
    }


def kept_positions(ends: torch.Tensor, kept: Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """Indices of the last ``kept[i]`` positions before each ``ends[i]`` (default: the last one)."""
    if kept is None or all(k == 1 for k in kept):
        return ends - 1
    return torch.cat([torch.arange(int(end) - k, int(end), device=device) for end, k in zip(ends, kept, strict=True)])


def packed_routing(
    mixtures: Sequence[dict[str, float] | None],
    from_layers: Sequence[int],
    lengths: Sequence[int],
    adapter_names: Sequence[str],
) -> dict[str, Any]:
    """Model arguments giving each packed prompt's tokens its request's routing.

    Args:
        mixtures: One mixture per prompt (``None`` or ``{}`` = the base).
        from_layers: The first decoder layer each prompt's adapters apply at.
        lengths: Each prompt's token count.
        adapter_names: The Linear-level adapters in slot order (``model.bank.names``): the
            mixtures name only these (input-level ones are split off, :mod:`moa.serve.virtual_rows`).
    """
    rows = RoutingDecision.from_mixtures([m or None for m in mixtures], adapter_names)
    repeats = torch.tensor(list(lengths))
    decision = RoutingDecision(rows.ids.repeat_interleave(repeats, 0), rows.weights.repeat_interleave(repeats, 0),
                               level="token")
    layers = [int(layer) for layer, length in zip(from_layers, lengths, strict=True) for _ in range(length)]
    return {"routing_decision": decision, "adapters_from_layer": from_layer_argument(layers)}


def from_layer_argument(layers: Sequence[int]) -> int | list[int]:
    """``adapters_from_layer`` for these per-row (or per-token) layers: one int when they agree."""
    return layers[0] if len(set(layers)) == 1 else list(layers)


def split(layers: RowKV, lengths: Sequence[int]) -> list[RowKV]:
    """Cut a packed prefill's per-layer keys/values into one :data:`RowKV` per prompt."""
    rows: list[RowKV] = [[] for _ in lengths]
    for keys, values in layers:
        for row, k, v in zip(rows, keys.split(list(lengths), dim=-2), values.split(list(lengths), dim=-2),
                             strict=True):
            row.append((k, v))
    return rows
