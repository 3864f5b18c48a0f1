"""Requests that use input-level adapters (prompt / prefix tuning) in the serving engine.

An input-level adapter changes what a request's tokens run *with*: prompt tuning puts ``n``
learned embeddings before the prompt, prefix tuning puts ``p`` learned keys/values in every
layer's attention cache before it (see :mod:`moa.adapters.input_level`). The engine passes
every forward a ready ``routing_decision``, which bypasses the model's own virtual-input path
(:mod:`moa.model.virtual_inputs`), so it builds the same inputs itself:

* on submission a request's mixture is split (:func:`split_row`, with the model's own rules,
  :func:`moa.model.input_rows.split_input_rows`) into its :class:`VirtualInput` and the
  Linear-level mixture its routing decision gets; the bank's slot order
  (``model.bank.names``) numbers the Linear-level adapters only. A mixture the model refuses
  (two input-level types in one row, a mixture the type does not define) is refused here,
  before the request is queued;
* prefill: the request's sequence is ``[p prefix entries][n virtual embeddings][prompt]``, as
  ``model.generate`` runs it alone: the prefix is written into the new cache first
  (:func:`prefill_alone_inputs`), the embeddings and the prompt go in as ``inputs_embeds``,
  the positions run from ``p``, and the kept logits are the prompt's (never a virtual
  position's), so ``echo`` prompt log-probabilities cover the real prompt tokens only.
  Prompt-tuning requests are packed with others (each packed segment is ``n + S`` positions,
  :func:`embed_segments`) and prefilled inside mixed steps; prefix-tuning requests are
  prefilled alone (their cache entries come before the prompt, which a packed sequence
  cannot give one segment);
* decode: the joined cache already holds a row's virtual columns (and its mask covers them),
  so a row only needs its offset: its next token's position is ``length - 1 + offset``.

The Linear-level adapters of such a row apply at its virtual positions too, as in ``model.forward``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moa.adapters.input_level import VirtualInput
from moa.model.input_rows import split_input_rows
from moa.model.virtual_inputs import VirtualBatch


@dataclass(frozen=True)
class RowInputs:
    """One request's routing, split into its Linear-level and input-level parts.

    Attributes:
        linear: The mixture the Linear-level routing decision gets (``None``: the base).
        virtual: What goes before the prompt, or ``None`` (no input-level adapter).
    """

    linear: dict[str, float] | None
    virtual: VirtualInput | None = None

    @property
    def offset(self) -> int:
        """Positions before the prompt: prefix entries plus virtual embeddings."""
        return offset_of(self.virtual)


def offset_of(virtual: VirtualInput | None) -> int:
    """Positions ``virtual`` puts before a prompt (0 for ``None``)."""
    return 0 if virtual is None else virtual.prefix_length + virtual.embedding_length


def packable(virtual: VirtualInput | None) -> bool:
    """Whether a request with ``virtual`` can share a packed prefill or a mixed step (no prefix)."""
    return virtual is None or virtual.prefix_length == 0


def split_row(model: Any, mixture: Mapping[str, float]) -> RowInputs:
    """Split one request's mixture (``{}``: the base) into its :class:`RowInputs`.

    Args:
        model: The served :class:`~moa.MixtureModel`.
        mixture: ``{adapter: weight}`` as the request names it.

    Raises:
        RoutingError: a mixture the model refuses (see :mod:`moa.model.input_rows`).
        AdapterShapeError: an input-level adapter that does not fit the base.
    """
    linear = dict(mixture) or None
    adapters = getattr(model, "input_adapters", None)
    if not adapters or not mixture:
        return RowInputs(linear)
    with torch.no_grad():
        rows = split_input_rows(adapters.snapshot(), 1, adapter_names=None, adapter_weights=[dict(mixture)],
                                active_adapters=(), router=None)
        if rows is None:
            return RowInputs(linear)
        virtual = rows.virtual[0]
        if virtual is not None:
            VirtualBatch.build([virtual], model.base_model)  # its shapes against the base
    rest = rows.linear[0]
    return RowInputs(dict(rest) if rest else None, virtual)


def prefill_alone_inputs(model: Any, prompt_ids: Sequence[int], virtual: VirtualInput | None,
                         cache: Any) -> dict[str, torch.Tensor]:
    """The inputs of one request's prefill alone, as ``model.generate`` builds them for it.

    Without a virtual input: ``input_ids``, an all-ones ``attention_mask`` and positions
    ``0..S-1``. With one: its prefix written into ``cache`` (empty, filled in place), its
    embeddings before the prompt's (``inputs_embeds``), a mask over the prefix too, and
    positions ``p..p+n+S-1``.
    """
    device = model.device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    p, e = (virtual.prefix_length, virtual.embedding_length) if virtual is not None else (0, 0)
    width = p + e + ids.shape[1]
    inputs: dict[str, torch.Tensor] = {
        "attention_mask": torch.ones(1, width, dtype=torch.long, device=device),
        "position_ids": torch.arange(p, width, device=device)[None],
    }
    embedding = model.get_input_embeddings()
    if p:
        for layer, (keys, values) in enumerate(virtual.key_values):
            cache.update(keys[None].to(device=device, dtype=embedding.weight.dtype),
                         values[None].to(device=device, dtype=embedding.weight.dtype), layer)
    if e:
        embeds = embedding(ids)
        inputs["inputs_embeds"] = torch.cat([virtual.embeddings[None].to(device=device, dtype=embeds.dtype), embeds], 1)
    else:
        inputs["input_ids"] = ids
    return inputs


def embed_segments(model: Any, inputs: dict[str, Any], virtual: Sequence[VirtualInput | None],
                   lengths: Sequence[int], first: int = 0) -> dict[str, Any]:
    """Turn a packed sequence's ``input_ids`` into ``inputs_embeds`` holding the virtual embeddings.

    Args:
        model: The served model.
        inputs: A packed forward's inputs; each request's segment starts with a placeholder per
            virtual embedding (``Row.prefill_ids``).
        virtual: Each packed request's virtual input (``None``, or no embeddings: nothing to put in).
        lengths: Each packed request's segment length (placeholders included).
        first: Where the first segment starts (after a mixed step's running rows).

    Returns:
        ``inputs`` itself when no request has virtual embeddings, else a copy with
        ``inputs_embeds`` in place of ``input_ids``.
    """
    starts = (first + torch.tensor([0, *lengths[:-1]]).cumsum(0)).tolist()
    placed = [(start, v.embeddings) for start, v in zip(starts, virtual, strict=True)
              if v is not None and v.embedding_length]
    if not placed:
        return inputs
    inputs = dict(inputs)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    for start, embeddings in placed:
        embeds[0, start: start + embeddings.shape[0]] = embeddings.to(device=embeds.device, dtype=embeds.dtype)
    inputs["inputs_embeds"] = embeds
    return inputs


__all__ = [
    "RowInputs",
    "embed_segments",
    "offset_of",
    "packable",
    "prefill_alone_inputs",
    "split_row",
]
