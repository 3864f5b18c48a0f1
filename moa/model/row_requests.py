"""A call's per-row routing arguments, checked and turned into its :class:`CallPlan`.

Each row of a call asks for one of: an adapter by name, a weighted mixture ``{name:
weight}`` (any ranks, any number of adapters), the base (``None`` / ``"__base__"``) or
the router (``"auto"``). Only the rows asking for the router go to it; the others keep
their explicit decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moa.errors import RoutingError
from moa.model.adapter_bank import AUTO_ROW, BASE_ROW
from moa.model.call_routing import CallPlan
from moa.routing.decision import Mixture, RoutingDecision
from moa.routing.router import Router

#: One row's routing request: a mixture, ``None`` (base) or :data:`AUTO_ROW` (the router).
RowRequest = Mixture | str


def plan_call(
    adapter_names_in_bank: Sequence[str],
    batch: int,
    *,
    adapter_names: Sequence[str | None] | None = None,
    adapter_weights: Sequence[RowRequest] | Mapping[str, float] | None = None,
    router: Router | None = None,
    active_adapters: Sequence[str] = (),
    enabled: bool = True,
    routing_decision: RoutingDecision | None = None,
    adapters_from_layer: int | Sequence[int] = 0,
) -> CallPlan:
    """The :class:`CallPlan` of one call.

    Args:
        adapter_names_in_bank: The model's adapters in slot order.
        batch: Rows in the call.
        adapter_names: One name / ``None`` / ``"__base__"`` / ``"auto"`` per row.
        adapter_weights: One mixture / ``None`` / ``"auto"`` per row, or one dict for all.
        router: The router of this call (the per-call one, else the model's).
        active_adapters: ``set_adapter``'s adapters (used when nothing is named and no
            router is set).
        enabled: ``False`` inside ``disable_adapters()``.
        routing_decision: A ready row-level decision for every row, applied from
            ``adapters_from_layer`` on.
        adapters_from_layer: One layer for all rows, or one per row (at most two distinct
            values, the smaller 0): a router-decided row served later with its decision
            pinned keeps adapters off below the router's layer, as when it was routed.
    """
    if routing_decision is not None:
        if adapter_names is not None or adapter_weights is not None:
            raise RoutingError("Pass routing_decision alone, without adapter_names/adapter_weights.")
        return _pinned_plan(routing_decision, adapters_from_layer, batch, enabled)
    rows = row_requests(batch, adapter_names, adapter_weights)
    if rows is None:  # nothing named: the router decides every row, else set_adapter's
        if router is not None:
            rows = [AUTO_ROW] * batch
        else:
            rows = [dict.fromkeys(active_adapters, 1.0) if active_adapters else None] * batch
    routed = tuple(i for i, row in enumerate(rows) if row == AUTO_ROW)
    if routed and router is None:
        raise RoutingError(
            f"Row {routed[0]} asks the router ('{AUTO_ROW}'), but no router is set. Call "
            f"model.set_router(router) or pass router= to this call."
        )
    mixtures = [None if row == AUTO_ROW else row for row in rows]
    explicit = None
    if any(m for m in mixtures):
        explicit = RoutingDecision.from_mixtures(mixtures, adapter_names_in_bank)
    split = router.hidden_layer if routed and router.hidden_layer is not None else 0
    return CallPlan(explicit=explicit, routed_rows=routed, router=router if routed else None,
                    split_layer=split, enabled=enabled)


def _pinned_plan(
    decision: RoutingDecision, from_layer: int | Sequence[int], batch: int, enabled: bool
) -> CallPlan:
    """The plan of a ready decision applied from one layer, or from a layer per row."""
    if isinstance(from_layer, int):
        return CallPlan(explicit=None, late=decision, split_layer=int(from_layer), enabled=enabled)
    layers = [int(layer) for layer in from_layer]
    # one layer per row, or one per token of a token-level decision (rows packed in one sequence)
    per_token = decision.level == "token" and len(layers) == decision.ids.shape[0]
    if not per_token:
        check_rows("adapters_from_layer", len(layers), batch)
    distinct = sorted(set(layers))
    if len(distinct) == 1:
        return CallPlan(explicit=None, late=decision, split_layer=distinct[0], enabled=enabled)
    if len(distinct) > 2 or distinct[0] != 0 or (decision.level != "row" and not per_token):
        raise RoutingError(
            f"adapters_from_layer takes at most two distinct layers, the smaller 0, one per row of a "
            f"row-level decision or one per token of a token-level one; got layers {distinct} and a "
            f"{decision.level}-level decision for {decision.ids.shape[0]} rows/tokens."
        )
    late_entries = torch.tensor([layer > 0 for layer in layers], device=decision.ids.device)
    early = RoutingDecision(
        decision.ids.masked_fill(late_entries[:, None], -1),
        decision.weights.masked_fill(late_entries[:, None], 0.0),
        level=decision.level,
    )
    return CallPlan(explicit=early, late=decision, split_layer=distinct[1], enabled=enabled)


def row_requests(
    batch: int,
    adapter_names: Sequence[str | None] | None,
    adapter_weights: Sequence[RowRequest] | Mapping[str, float] | None,
) -> list[RowRequest] | None:
    """One request per row from ``adapter_names`` or ``adapter_weights`` (``None``: neither)."""
    if adapter_names is not None and adapter_weights is not None:
        raise RoutingError("Pass adapter_names or adapter_weights, not both.")
    if adapter_names is not None:
        if isinstance(adapter_names, str):
            raise RoutingError(
                f"adapter_names must be a list with one entry per row, got the string "
                f"{adapter_names!r}. Use [{adapter_names!r}] * batch_size or set_adapter()."
            )
        check_rows("adapter_names", len(adapter_names), batch)
        rows: list[RowRequest] = []
        for i, name in enumerate(adapter_names):
            if name is not None and not isinstance(name, str):
                raise RoutingError(
                    f"adapter_names[{i}] must be an adapter name, None, '{BASE_ROW}' or '{AUTO_ROW}'; "
                    f"got {name!r}. Use adapter_weights=[{{name: weight}}, ...] for mixtures."
                )
            rows.append(AUTO_ROW if name == AUTO_ROW else None if name in (None, BASE_ROW) else {name: 1.0})
        return rows
    if adapter_weights is not None:
        if isinstance(adapter_weights, Mapping):
            return [adapter_weights] * batch
        if isinstance(adapter_weights, str):
            raise RoutingError(
                f"adapter_weights must be a list with one entry per row (or one dict for all rows); "
                f"got the string {adapter_weights!r}. Use [{adapter_weights!r}] * batch_size."
            )
        rows = list(adapter_weights)
        check_rows("adapter_weights", len(rows), batch)
        for i, row in enumerate(rows):
            if isinstance(row, str) and row != AUTO_ROW:
                raise RoutingError(
                    f"adapter_weights[{i}] is the string {row!r}; an entry is a {{name: weight}} dict, "
                    f"None (base) or '{AUTO_ROW}' (the router decides)."
                )
        return rows
    return None


def batch_size(input_ids: torch.Tensor | None, model_kwargs: Mapping[str, Any]) -> int:
    if input_ids is not None:
        return int(input_ids.shape[0])
    embeds = model_kwargs.get("inputs_embeds")
    if embeds is not None:
        return int(embeds.shape[0])
    raise RoutingError("Give input_ids (or inputs_embeds) so rows can be routed.")


def check_rows(what: str, rows: int, batch: int) -> None:
    if rows != batch:
        raise RoutingError(
            f"{what} has {rows} entries but the batch has {batch} rows. Give exactly one entry "
            f"per row of input_ids (None = base model for that row)."
        )


def token_decision_per_row(token_mixtures: list[dict[str, float]], batch: int, seq_len: int) -> list[dict[str, float]]:
    """Average a token-level decision's mixtures over each row's tokens."""
    rows = []
    for b in range(batch):
        total: dict[str, float] = {}
        for mix in token_mixtures[b * seq_len : (b + 1) * seq_len]:
            for name, weight in mix.items():
                total[name] = total.get(name, 0.0) + weight / seq_len
        rows.append(total)
    return rows
