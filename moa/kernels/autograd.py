"""Autograd for the weighted multi-adapter LoRA mixture (shrink + expand).

Forward, for every (token ``t``, adapter ``a``) pair ``p`` of the routing metadata, with
routing weight ``w_p`` and adapter scale ``s_a``::

    y[t] = out[t] + sum_p  w_p * s_a * B_a @ (A_a @ x[t])

Backward, with ``G = dL/dy`` and per pair ``g_p = B_a^T @ G[t]`` (rank ``r_a``)::

    dL/dx[t]   = sum_p w_p * s_a * A_a^T @ g_p         (a shrink with B^T, then an expand with A^T)
    dL/dw_p    = s_a * (A_a @ x[t]) . g_p               (so a gate trains through the mixture)
    dL/dA_a    = sum_{p in a} (w_p * s_a * g_p) x[t]^T  (grouped per adapter)
    dL/dB_a    = sum_{p in a} G[t] h_p^T                (h_p = w_p * s_a * A_a @ x[t], saved)
    dL/dout    = G

The shrink/expand parts run on the selected backend's kernels (Triton on CUDA): the
"transposed" stack they need (``A' = B^T``, ``B' = A^T``) is exactly the forward's packed
buffers swapped, so it costs no copy. The per-adapter weight gradients are small grouped
matmuls done in torch.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import torch

from moa import kernels
from moa.kernels.dense import lora_dense, prefer_dense
from moa.kernels.metadata import LoraStack, PackedLora, RoutingMetadata

__all__ = ["LoraMixtureFunction", "lora_mixture"]


def _present(stack: LoraStack) -> tuple[list[int], list[torch.Tensor]]:
    """Slots that have weights in this layer, and their ``A`` tensors then ``B`` tensors."""
    slots = [s for s, a in enumerate(stack.lora_a) if a is not None]
    return slots, [stack.lora_a[s] for s in slots] + [stack.lora_b[s] for s in slots]


def transposed_unit_stack(stack: LoraStack, packed: PackedLora | None = None) -> LoraStack:
    """The stack with ``A' = B^T``, ``B' = A^T`` and every scale 1 (for the backward pass).

    Args:
        stack: a layer's adapters.
        packed: ``stack.packed()`` when the backend uses packed buffers; the transposed
            stack then reuses them (swapped) instead of building its own copy.

    Returns:
        A :class:`LoraStack` mapping ``H_out -> H_in``.
    """
    lora_a = [None if b is None else b.t() for b in stack.lora_b]
    lora_b = [None if a is None else a.t() for a in stack.lora_a]
    scales = [1.0] * len(stack.scales)
    transposed = LoraStack(lora_a, lora_b, scales, stack.out_features, stack.in_features)
    if packed is not None:
        transposed.seed_packed(transposed.weights_key(), PackedLora(
            lora_a=packed.lora_b,
            lora_b=packed.lora_a,
            rank_offsets=packed.rank_offsets,
            scales=torch.ones_like(packed.scales),
        ))
    return transposed


class LoraMixtureFunction(torch.autograd.Function):
    """``out + sum_p w_p s_a B_a A_a x[t_p]`` with an explicit backward (see module doc).

    ``apply(x, pair_weight, out, stack, meta, backend, *weights)`` where ``weights`` are the
    present ``A`` tensors then ``B`` tensors of ``stack`` (in slot order), listed so that
    autograd tracks them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        pair_weight: torch.Tensor,
        out: torch.Tensor,
        stack: LoraStack,
        meta: RoutingMetadata,
        backend: ModuleType,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        if pair_weight is not meta.pair_weight:
            meta = dataclasses.replace(meta, pair_weight=pair_weight)
        h = backend.lora_shrink(x, stack, meta)
        result = backend.lora_expand(h, stack, meta, out.clone())
        ctx.save_for_backward(x, pair_weight, h, *weights)
        ctx.stack, ctx.meta, ctx.backend = stack, meta, backend
        return result

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, pair_weight, h, *weights = ctx.saved_tensors
        stack: LoraStack = ctx.stack
        meta: RoutingMetadata = ctx.meta
        backend: ModuleType = ctx.backend
        need_x, need_w, need_out = ctx.needs_input_grad[:3]
        need_weights = ctx.needs_input_grad[6:]
        slots, _ = _present(stack)
        dtype = stack.dtype()
        acc_dtype = torch.promote_types(dtype, torch.float32)
        grad_x = grad_w = None
        grad_weights: list[torch.Tensor | None] = [None] * len(weights)

        if need_x or need_w or any(need_weights):
            g = grad_out.to(dtype)
            uses_packed = backend.__name__ != "moa.kernels.reference"
            transposed = transposed_unit_stack(stack, stack.packed() if uses_packed else None)
            unit_meta = dataclasses.replace(meta, pair_weight=torch.ones_like(pair_weight))
            g_low = backend.lora_shrink(g, transposed, unit_meta)  # [P, R_max]: B_a^T G[t]
            scales = torch.tensor(stack.scales, dtype=acc_dtype, device=x.device)
            coeff = pair_weight.to(acc_dtype) * scales[meta.pair_adapter.long()]
            g_scaled = (g_low.to(acc_dtype) * coeff[:, None]).to(dtype)  # w s B^T G
            if need_x:
                zeros = torch.zeros(meta.num_tokens, stack.in_features, dtype=dtype, device=x.device)
                grad_x = backend.lora_expand(g_scaled, transposed, meta, zeros).to(x.dtype)
            if need_w:
                u = backend.lora_shrink(x, stack, unit_meta)  # s A x
                grad_w = (u.to(acc_dtype) * g_low.to(acc_dtype)).sum(-1).to(pair_weight.dtype)
            for i, slot in enumerate(slots):
                need_a, need_b = need_weights[i], need_weights[len(slots) + i]
                start, end = meta.pairs_of(slot)
                if end == start or not (need_a or need_b):
                    continue
                rank = stack.lora_a[slot].shape[0]
                if meta.identity_adapter == slot:
                    rows_x, rows_g = x, g
                else:
                    index = meta.token_index[start:end]
                    rows_x, rows_g = x.index_select(0, index), g.index_select(0, index)
                if need_a:
                    grad_weights[i] = g_scaled[start:end, :rank].t() @ rows_x.to(dtype)
                if need_b:
                    grad_weights[len(slots) + i] = rows_g.t() @ h[start:end, :rank].to(dtype)
            for i, tensor in enumerate(weights):
                if ctx.needs_input_grad[6 + i] and grad_weights[i] is None:
                    grad_weights[i] = torch.zeros_like(tensor)
        grad_out_in = grad_out if need_out else None
        return (grad_x, grad_w, grad_out_in, None, None, None, *grad_weights)


def lora_mixture(
    x: torch.Tensor,
    stack: LoraStack,
    meta: RoutingMetadata,
    out: torch.Tensor,
    backend: ModuleType | None = None,
) -> torch.Tensor:
    """``out + shrink/expand`` of every routed pair, differentiable for x, weights, A and B.

    Args:
        x: ``[T, H_in]`` activations in the adapters' dtype.
        stack: this layer's adapters by slot.
        meta: the forward's pairs grouped by adapter; gradients reach the router through
            ``meta.pair_weight`` (built differentiably from the decision's weights).
        out: ``[T, H_out]`` base output.
        backend: The kernel module to run (``kernels.backend_for(device)``); callers pick
            it once per forward and pass it to every layer. ``None``: look it up here.

    Returns:
        ``[T, H_out]``: ``out`` updated in place when no gradient is needed, else a new
        tensor (``out`` unchanged). Always use the return value.

    Semantics::

        h = lora_shrink(x, stack, meta)
        return lora_expand(h, stack, meta, out)
    """
    if backend is None:
        backend = kernels.backend_for(out.device)
    if backend.__name__ == "moa.kernels.reference" and prefer_dense(stack, meta):
        return lora_dense(x, stack, meta, out)  # few tokens: a few GEMMs beat many small ops
    _, weights = _present(stack)
    tracked = (x, meta.pair_weight, out, *weights)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tracked):
        return backend.lora_expand(backend.lora_shrink(x, stack, meta), stack, meta, out)
    return LoraMixtureFunction.apply(x, meta.pair_weight, out, stack, meta, backend, *weights)
