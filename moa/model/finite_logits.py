"""A call whose adapter rows produce NaN or infinite logits raises instead of returning them.

Load-time checks (:mod:`moa.adapters.magnitude`) refuse weights that cannot be used safely;
this is the net behind them, for weights changed after loading (training, in-place edits) or
inputs no bound foresees. :class:`LogitsCheck` sits on the base's LM head as a forward hook,
so it sees the logits of every forward of a call — ``model(...)`` and each step of
``model.generate(...)`` alike — and reads the call's routing from the call frame, which
belongs to the calling thread's context (concurrent calls never see each other's rows).

It costs one sum over the logits per forward (:func:`all_finite`); the rows are only looked
at when that is not finite (``benchmarks/finite_check.py`` measures it). Rows that run the base alone
are not the adapters' doing and never raise. A caller that handles non-finite rows itself
(``moa serve`` fails only the request concerned) passes ``check_finite=False``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moa.errors import NonFiniteOutputError
from moa.model.call_routing import CallPlan, current_frame, expand_rows


def adapter_rows(plan: CallPlan, batch: int) -> set[int] | None:
    """Rows of a ``batch``-row forward on which adapters may apply; ``None`` means every row.

    Beams and ``num_return_sequences`` repeat each decided row consecutively, as
    :func:`~moa.model.call_routing.expand_rows` maps them.
    """
    if not plan.enabled:
        return set()
    decisions = [d for d in (plan.explicit, plan.late) if d is not None]
    if any(d.level == "token" for d in decisions):
        return None  # token rows do not map to batch rows without the sequence length: be strict
    rows: set[int] = set()
    for decision in decisions:
        used = (decision.ids >= 0).any(dim=1).nonzero().flatten().tolist()
        rows.update(expand_rows(used, batch, int(decision.ids.shape[0])))
    if plan.routed_rows:
        decided = int(plan.explicit.ids.shape[0]) if plan.explicit is not None else batch
        rows.update(expand_rows(plan.routed_rows, batch, decided))
    return rows


def all_finite(logits: torch.Tensor) -> bool:
    """Whether ``logits`` hold no NaN or infinity (or sum past the dtype's range: then look closer).

    One pass with no ``[B, S, V]`` temporary, unlike ``isfinite(logits).all()`` (6 vs 137 ms on
    16 x 64 x 49152 logits here): a NaN or an infinity makes the sum non-finite. A sum that only
    overflows sends :func:`check_logits` to its exact per-row look, which then finds nothing.
    """
    return bool(torch.isfinite(logits.detach().sum()))


def check_logits(logits: torch.Tensor, plan: CallPlan, adapter_names: tuple[str, ...]) -> None:
    """Raise :class:`NonFiniteOutputError` if a row that adapters computed has a NaN or infinite logit.

    Args:
        logits: ``[B, S, V]`` (or ``[B, V]``) logits of one forward.
        plan: The call's routing plan.
        adapter_names: The model's adapter slots when the call began.
    """
    if all_finite(logits):
        return
    bad = (~torch.isfinite(logits.detach())).flatten(1).any(dim=1).nonzero().flatten().tolist()
    with_adapters = adapter_rows(plan, int(logits.shape[0]))
    culprits = bad if with_adapters is None else [row for row in bad if row in with_adapters]
    if not culprits:
        return  # the base alone produced them: not an adapter's doing
    raise NonFiniteOutputError(
        f"The logits of row(s) {culprits[:8]}{' ...' if len(culprits) > 8 else ''} hold NaN or infinite values "
        f"after adapters were applied (adapters loaded: {list(adapter_names)}). An adapter's weights overflow on "
        f"this input: check the adapters those rows use (reload them from their files; moa refuses files whose "
        f"weights cannot be used safely), or run those rows on the base. Nothing was returned for this call."
    )


class LogitsCheck:
    """Forward hook for the base's LM head that applies :func:`check_logits` to each forward of a call."""

    def __init__(self, owner: object) -> None:
        self.owner = weakref.ref(owner)  # an unloaded base keeps no model alive through its head

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Check ``output`` when the calling context is inside one of ``owner``'s checked calls."""
        owner = self.owner()
        frame = None if owner is None else current_frame(owner)
        if frame is None or not frame.check_finite or not isinstance(output, torch.Tensor):
            return
        check_logits(output, frame.plan, frame.adapter_names)


def install_logits_check(owner: object, base_model: nn.Module) -> RemovableHandle | None:
    """Hook :class:`LogitsCheck` for ``owner``'s calls onto ``base_model``'s LM head.

    Returns:
        The hook's handle (``.remove()`` takes it off), or ``None`` for a base without an LM head.
    """
    head = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        return None
    return head.register_forward_hook(LogitsCheck(owner))


__all__ = ["LogitsCheck", "adapter_rows", "all_finite", "check_logits", "install_logits_check"]
