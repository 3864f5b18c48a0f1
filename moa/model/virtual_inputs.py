"""One batch of rows with different virtual inputs (prompt / prefix tuning), in one forward.

Rows of a call may each put a different number of virtual positions before their tokens: ``n``
virtual token embeddings (prompt tuning), ``p`` prefix key/values in every layer's attention
cache (prefix tuning), or nothing (Linear-level adapters, the base). :class:`VirtualBatch`
lines them up the way transformers lines up a left-padded batch:

* the sequence the base runs is ``[P prefix slots][E embedding slots][the row's S tokens]``,
  ``P`` and ``E`` the largest counts of the batch; a row's own prefix / embeddings sit at the
  right end of their slots, the slots before them are masked (``attention_mask`` 0);
* position ids are ``cumsum(attention_mask) - 1``, so every row gets the positions it has
  alone: its virtual embeddings ``p..p+n-1`` after its ``p`` prefix entries, its tokens after
  them (PEFT's positions for one adapter, whose forward offsets the tokens by the prefix);
* the prefix slots are written into the attention cache before the first forward runs, and the
  base then runs the last ``E + S`` positions; ``forward`` returns the logits of the row's
  tokens only (``[B, S, V]``), ``generate`` returns the row's tokens plus the new ones.

The prefix and embeddings are put in place by a forward pre-hook on the base (installed once,
:func:`install_virtual_input_hook`), which reads the call's batch from the call frame of the
calling context: ``generate``'s first step goes through it exactly like ``forward``, and
concurrent calls never see each other's rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moa.adapters.input_level import VirtualInput
from moa.errors import AdapterShapeError, NonFiniteOutputError, RoutingError
from moa.model.call_routing import CallFrame, calling, current_frame

#: Key of the call's :class:`VirtualBatch` in :attr:`CallFrame.scratch`.
SCRATCH_KEY = "virtual_inputs"
#: ``generate`` / ``forward`` arguments that cannot be combined with virtual inputs.
_REFUSED = ("inputs_embeds", "position_ids", "cache", "past_key_values", "cache_position")


def _cache_key(base_model: nn.Module) -> str:
    """The name of the cache argument of this transformers version's forward."""
    params = inspect.signature(base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _text_config(base_model: nn.Module) -> Any:
    config = base_model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class VirtualBatch:
    """The virtual inputs of one call's rows, lined up.

    Attributes:
        rows: Per row of the call (before any beam expansion), its virtual input or ``None``.
        prefix_len: ``P``, the most prefix positions of any row.
        embed_len: ``E``, the most virtual embeddings of any row.
    """

    rows: list[VirtualInput | None]
    prefix_len: int
    embed_len: int

    @classmethod
    def build(cls, rows: Sequence[VirtualInput | None], base_model: nn.Module) -> VirtualBatch:
        """Check every row's virtual input against the base and line the batch up.

        Raises:
            AdapterShapeError: embeddings or key/values that do not fit this base.
        """
        config = _text_config(base_model)
        hidden = int(base_model.get_input_embeddings().embedding_dim)
        layers = int(config.num_hidden_layers)
        kv_shape = None
        for i, row in enumerate(rows):
            if row is None:
                continue
            if row.embeddings is not None and (row.embeddings.dim() != 2 or row.embeddings.shape[1] != hidden):
                raise AdapterShapeError(
                    f"Row {i}: virtual embeddings of shape {tuple(row.embeddings.shape)}; this base needs "
                    f"[num_virtual_tokens, {hidden}]. The adapter was made for another base."
                )
            if row.key_values:
                if len(row.key_values) != layers:
                    raise AdapterShapeError(
                        f"Row {i}: prefix key/values for {len(row.key_values)} layers; this base has {layers}. "
                        f"The adapter was made for another base."
                    )
                shapes = {(tuple(k.shape), tuple(v.shape)) for k, v in row.key_values}
                (k_shape, v_shape), *others = shapes
                mismatch = kv_shape is not None and kv_shape != (k_shape[0], k_shape[2])
                if others or k_shape != v_shape or len(k_shape) != 3 or mismatch:
                    raise AdapterShapeError(
                        f"Row {i}: prefix key/values of shapes {sorted(shapes)}; every layer needs the same "
                        f"[kv_heads, num_virtual_tokens, head_dim] for keys and values, as in the batch's other rows."
                    )
                kv_shape = (k_shape[0], k_shape[2])
        return cls(
            rows=list(rows),
            prefix_len=max((r.prefix_length for r in rows if r is not None), default=0),
            embed_len=max((r.embedding_length for r in rows if r is not None), default=0),
        )

    @property
    def extra(self) -> int:
        """Positions put before every row's tokens: ``P + E``."""
        return self.prefix_len + self.embed_len

    def _slot_mask(self, lengths: list[int], slots: int, device: torch.device) -> torch.Tensor:
        """``[B, slots]``: 1 on each row's last ``lengths[b]`` slots."""
        index = torch.arange(slots, device=device)
        return (index[None, :] >= slots - torch.tensor(lengths, device=device)[:, None]).long()

    def extend(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The ids, mask and labels of the lined-up sequence, ``[B, P + E + S]``.

        The ids of virtual positions are placeholders (the hook replaces them). A label whose
        previous position is masked is ignored (-100): no row predicts its first token from a
        padding slot, as none does alone.
        """
        batch, device = int(input_ids.shape[0]), input_ids.device
        if len(self.rows) != batch:
            raise RoutingError(f"The call has {batch} rows but {len(self.rows)} routing entries.")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prefix = self._slot_mask([r.prefix_length if r else 0 for r in self.rows], self.prefix_len, device)
        embeds = self._slot_mask([r.embedding_length if r else 0 for r in self.rows], self.embed_len, device)
        full_mask = torch.cat([prefix, embeds, mask.to(device=device, dtype=torch.long)], dim=1)
        placeholder = torch.zeros((batch, self.extra), dtype=input_ids.dtype, device=device)
        ids = torch.cat([placeholder, input_ids], dim=1)
        if labels is not None:
            ignored = torch.full((batch, self.extra), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([ignored, labels], dim=1)
            after_masked = torch.cat([torch.zeros_like(full_mask[:, :1]), full_mask[:, :-1]], 1) == 0
            labels = labels.masked_fill(after_masked.to(labels.device), -100)
        return ids, full_mask.to(mask.dtype), labels

    def inject(self, base_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Put the prefix into the cache and the embeddings into the input of the call's first forward.

        Called by the pre-hook with the base forward's keyword arguments; returns the new ones,
        or ``None`` for a later ``generate`` step (the cache already holds everything).
        """
        key = _cache_key(base_model)
        cache = kwargs.get(key)
        if cache is not None and cache.get_seq_length() > 0:
            return None
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        batch, seq = int(tokens.shape[0]), int(tokens.shape[1])
        if batch % len(self.rows) or seq < self.extra:
            raise RoutingError(
                f"A forward of {batch} rows x {seq} positions does not fit the call's {len(self.rows)} rows with "
                f"{self.extra} virtual positions; input-level adapters need the call's own inputs."
            )
        repeat = batch // len(self.rows)  # beams / num_return_sequences repeat rows consecutively
        rows = [self.rows[i // repeat] for i in range(batch)]
        kwargs = dict(kwargs)
        p, e = self.prefix_len, self.embed_len
        embedding = base_model.get_input_embeddings()
        dtype = embedding.weight.dtype
        if p:
            kwargs[key] = self._prefixed_cache(base_model, cache, rows, batch, dtype, tokens.device)
        if ids is not None:
            ids = ids[:, p:]
            embeds = embedding(ids) if e else None
            kwargs["input_ids"] = None if e else ids
        else:
            embeds = embeds[:, p:]
        if e:
            block = torch.stack([self._embedding_block(row, e, embeds) for row in rows])
            kwargs["inputs_embeds"] = torch.cat([block, embeds[:, e:]], dim=1)
        for name in ("position_ids", "cache_position", "labels"):
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.shape[-1] == seq:
                kwargs[name] = value[..., p:]
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            positions = mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = positions.masked_fill(mask == 0, 0)[:, -(seq - p):]
        return kwargs

    @staticmethod
    def _embedding_block(row: VirtualInput | None, slots: int, like: torch.Tensor) -> torch.Tensor:
        """``[slots, H]``: zeros, then the row's virtual embeddings at the right end."""
        n = row.embedding_length if row is not None else 0
        pad = like.new_zeros((slots - n, like.shape[-1]))
        if n == 0:
            return pad
        return torch.cat([pad, row.embeddings.to(device=like.device, dtype=like.dtype)], dim=0)

    def _prefixed_cache(
        self, base_model: nn.Module, cache: Any, rows: list[VirtualInput | None], batch: int,
        dtype: torch.dtype, device: torch.device,
    ) -> Any:
        """An empty cache (``cache`` or a new DynamicCache) holding every row's prefix, right-aligned."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=base_model.config)
        key_values = next(r for r in rows if r is not None and r.key_values).key_values
        heads, head_dim = int(key_values[0][0].shape[0]), int(key_values[0][0].shape[2])
        p = self.prefix_len
        for layer in range(len(key_values)):
            parts_k, parts_v = [], []
            for row in rows:
                n = row.prefix_length if row is not None else 0
                pad = torch.zeros((heads, p - n, head_dim), dtype=dtype, device=device)
                if n:
                    k, v = row.key_values[layer]
                    parts_k.append(torch.cat([pad, k.to(device=device, dtype=dtype)], dim=1))
                    parts_v.append(torch.cat([pad, v.to(device=device, dtype=dtype)], dim=1))
                else:
                    parts_k.append(pad)
                    parts_v.append(pad)
            keys, values = torch.stack(parts_k), torch.stack(parts_v)
            cache.update(keys, values, layer)
        return cache

    def trim(self, output: Any, check_finite: bool) -> Any:
        """The forward's output with the virtual positions dropped from ``logits`` and ``hidden_states``.

        Raises:
            NonFiniteOutputError: ``check_finite`` and a row with a virtual input got NaN or
                infinite logits (the Linear-level check does not see input-only rows).
        """
        e = self.embed_len
        logits = output.get("logits") if hasattr(output, "get") else None
        if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] > e:
            logits = logits[:, e:]
            output["logits"] = logits
        hidden = output.get("hidden_states") if hasattr(output, "get") else None
        if isinstance(hidden, tuple) and e:
            output["hidden_states"] = tuple(h[:, e:] if h.dim() == 3 else h for h in hidden)
        if check_finite and isinstance(logits, torch.Tensor):
            rows = [i for i, row in enumerate(self.rows) if row is not None]
            bad = [i for i in rows if not torch.isfinite(logits[i].detach()).all()]
            if bad:
                raise NonFiniteOutputError(
                    f"The logits of row(s) {bad[:8]} hold NaN or infinite values after their input-level adapters "
                    f"(prompt / prefix tuning) were applied. Check those adapters' weights (reload them from "
                    f"their files), or run those rows without them."
                )
        return output


def refuse_unsupported(kwargs: dict[str, Any]) -> None:
    """Raise :class:`RoutingError` for arguments that cannot be combined with virtual inputs."""
    given = [name for name in _REFUSED if kwargs.get(name) is not None]
    if given:
        raise RoutingError(
            f"Rows with input-level adapters (prompt / prefix tuning) cannot take {', '.join(given)}: moa builds the "
            f"virtual positions, their cache and position ids itself. Pass input_ids and attention_mask only, or run "
            f"those rows without input-level adapters."
        )


def run_forward(
    base_model: nn.Module, frame: CallFrame, rows: Sequence[VirtualInput | None], input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None, kwargs: dict[str, Any], check_finite: bool,
) -> Any:
    """``base_model(...)`` for a call whose rows carry virtual inputs; logits of the real tokens only.

    Args:
        base_model: The transformers model (moa's hooks installed).
        frame: The call's frame (its Linear-level routing); the batch is added to it.
        rows: Per row, its virtual input or ``None``.
        input_ids: ``[B, S]``.
        attention_mask: ``[B, S]`` or ``None``.
        kwargs: The other forward arguments (``labels``...).
        check_finite: See :meth:`VirtualBatch.trim`.
    """
    refuse_unsupported(kwargs)
    if input_ids is None:
        raise RoutingError("Rows with input-level adapters need input_ids.")
    batch = VirtualBatch.build(rows, base_model)
    ids, mask, labels = batch.extend(input_ids, attention_mask, kwargs.pop("labels", None))
    if labels is not None:
        kwargs["labels"] = labels
    frame.scratch[SCRATCH_KEY] = batch
    with calling(frame):
        output = base_model(input_ids=ids, attention_mask=mask, **kwargs)
    return batch.trim(output, check_finite)


def run_generate(
    base_model: nn.Module, frame: CallFrame, rows: Sequence[VirtualInput | None], input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
) -> Any:
    """``base_model.generate(...)`` for a call whose rows carry virtual inputs.

    Returns what ``generate`` returns, with the virtual positions removed: each row's tokens
    followed by the new ones. ``max_length`` / ``min_length`` count the row's tokens, not the
    virtual positions, as for a row alone.
    """
    from moa.model.limits import check_generation_lengths

    refuse_unsupported(kwargs)
    if input_ids is None:
        raise RoutingError("Rows with input-level adapters need input_ids.")
    batch = VirtualBatch.build(rows, base_model)
    ids, mask, _ = batch.extend(input_ids, attention_mask)
    kwargs = dict(kwargs)
    for name in ("max_length", "min_length"):
        if isinstance(kwargs.get(name), int):
            kwargs[name] += batch.extra
    config = getattr(base_model, "generation_config", None)
    if "max_length" not in kwargs and "max_new_tokens" not in kwargs and "generation_config" not in kwargs:
        if config is not None and config.max_new_tokens is None and isinstance(config.max_length, int):
            kwargs["max_length"] = config.max_length + batch.extra
    check_generation_lengths(base_model.config, ids, kwargs)
    frame.scratch[SCRATCH_KEY] = batch
    with calling(frame):
        output = base_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    if isinstance(output, torch.Tensor):
        return output[:, batch.extra:]
    output["sequences"] = output["sequences"][:, batch.extra:]
    return output


class VirtualInputHook:
    """Forward pre-hook on the base: hands the call's first forward its virtual inputs."""

    def __init__(self, owner: object) -> None:
        # held strongly, like the routing hooks: a deep-copied model's hook must follow its own copy
        self.owner = owner

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        frame = current_frame(self.owner)
        batch = frame.scratch.get(SCRATCH_KEY) if frame is not None else None
        if batch is None:
            return None
        if args:  # input_ids given positionally
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        changed = batch.inject(module, kwargs)
        return None if changed is None else (args, changed)


def install_virtual_input_hook(owner: object, base_model: nn.Module) -> RemovableHandle:
    """Hook :class:`VirtualInputHook` onto ``base_model``, ahead of moa's routing hooks (which
    then see the positions the base really runs)."""
    return base_model.register_forward_pre_hook(VirtualInputHook(owner), with_kwargs=True, prepend=True)


__all__ = [
    "SCRATCH_KEY",
    "VirtualBatch",
    "VirtualInputHook",
    "install_virtual_input_hook",
    "refuse_unsupported",
    "run_forward",
    "run_generate",
]
