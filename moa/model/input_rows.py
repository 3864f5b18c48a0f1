"""The input-level part of a call's per-row requests: which rows get which virtual input.

A row asks for adapters by name or as a ``{name: weight}`` mixture (see
:mod:`moa.model.row_requests`). Here each row's request is split in two: its input-level
adapters (prompt / prefix tuning, held in :class:`~moa.model.input_adapter_set.InputAdapterSet`)
become the row's :class:`~moa.adapters.input_level.VirtualInput`; the rest (Linear-level
adapters, ``None``) is routed as before. The rules:

* A row carries at most one input-level adapter *type*; with it, any Linear-level adapters
  (they apply at every position of the row, the virtual ones included).
* An input-level adapter's weight only matters relative to the other input-level adapters
  of its row: the input-level weights are normalised to sum to 1, so ``{"pt": 0.5, "lora": 0.5}``
  is the whole ``pt`` prompt plus ``lora`` at weight 0.5. Two or more input-level adapters
  in a row are combined by their type's :meth:`~moa.adapters.input_level.InputAdapter.mix`
  (prompt tuning: the weighted sum of the virtual embeddings, same ``num_virtual_tokens``
  required); types that define no mixture refuse.
* Rows left to the router (``"auto"``) cannot share a call with input-level rows, and a
  router never picks an input-level adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moa.adapters.input_level import InputAdapter, VirtualInput
from moa.errors import RoutingError, format_choices
from moa.model.adapter_bank import AUTO_ROW
from moa.model.row_requests import RowRequest, row_requests
from moa.routing.router import Router


@dataclass
class InputRows:
    """One call's rows, split into their Linear-level requests and their virtual inputs.

    Attributes:
        linear: Per row, what the Linear-level routing gets: a mixture or ``None``.
        virtual: Per row, its virtual input, or ``None`` (no input-level adapter).
    """

    linear: list[RowRequest]
    virtual: list[VirtualInput | None]


def split_input_rows(
    adapters: Mapping[str, InputAdapter],
    batch: int,
    *,
    adapter_names: Sequence[str | None] | None,
    adapter_weights: Sequence[RowRequest] | Mapping[str, float] | None,
    active_adapters: Sequence[str],
    router: Router | None,
) -> InputRows | None:
    """Split a call's row requests; ``None`` when no row uses an input-level adapter.

    Args:
        adapters: The model's input-level adapters (a snapshot).
        batch: Rows in the call.
        adapter_names: The call's ``adapter_names``.
        adapter_weights: The call's ``adapter_weights``.
        active_adapters: ``set_adapter``'s adapters (used when nothing is named and no router is set).
        router: The call's router (its own, else the model's), if any.

    Raises:
        RoutingError: a row mixes input-level types, a mixture its type does not define, a bad
            weight, or an ``"auto"`` row next to input-level rows.
    """
    if not adapters:
        return None
    rows = row_requests(batch, adapter_names, adapter_weights)
    if rows is None:
        if router is not None or not any(name in adapters for name in active_adapters):
            return None
        rows = [dict.fromkeys(active_adapters, 1.0)] * batch
    parts = [_input_part(i, row, adapters) for i, row in enumerate(rows)]
    if not any(parts):
        return None
    auto = [i for i, row in enumerate(rows) if row == AUTO_ROW]
    if auto:
        raise RoutingError(
            f"Row {auto[0]} asks the router ('{AUTO_ROW}') while other rows use input-level adapters "
            f"(prompt / prefix tuning); a router chooses among Linear-level adapters and cannot share a call "
            f"with input-level rows. Run the routed rows in a separate call."
        )
    linear: list[RowRequest] = []
    for row in rows:
        rest = {n: w for n, w in row.items() if n not in adapters} if isinstance(row, Mapping) else row
        linear.append(rest or None)
    cache: dict[tuple, VirtualInput] = {}
    virtual = [_virtual_input(i, part, adapters, cache) if part else None for i, part in enumerate(parts)]
    return InputRows(linear=linear, virtual=virtual)


def _input_part(row_index: int, row: RowRequest, adapters: Mapping[str, InputAdapter]) -> dict[str, float]:
    """The row's input-level adapters with positive weights (checked), in request order."""
    if not isinstance(row, Mapping):
        return {}
    part: dict[str, float] = {}
    for name, weight in row.items():
        if name not in adapters:
            continue
        try:
            w = float(weight)
        except (TypeError, ValueError):
            w = math.nan
        if not math.isfinite(w) or w < 0:
            raise RoutingError(
                f"Row {row_index}: weight {weight!r} for adapter {name!r} is not a finite non-negative number. "
                f"Use weights >= 0."
            )
        if w > 0:
            part[name] = w
    return part


def _virtual_input(
    row_index: int, part: dict[str, float], adapters: Mapping[str, InputAdapter], cache: dict[tuple, VirtualInput]
) -> VirtualInput:
    """One row's virtual input (computed once per distinct request in a call)."""
    total = sum(part.values())
    key = tuple(sorted((name, w / total) for name, w in part.items()))
    if key in cache:
        return cache[key]
    chosen = [adapters[name] for name in part]
    types = {type(adapter) for adapter in chosen}
    if len(types) > 1:
        kinds = ", ".join(f"{name!r} ({type(adapters[name]).__name__})" for name in part)
        raise RoutingError(
            f"Row {row_index} mixes input-level adapters of different types: {kinds}. A row takes one "
            f"input-level adapter type; Linear-level adapters may be added to it."
        )
    if len(chosen) == 1:
        result = chosen[0].virtual_input()
    else:
        try:
            result = types.pop().mix(chosen, [w / total for w in part.values()])
        except RoutingError as error:
            raise RoutingError(f"Row {row_index} ({format_choices(part)}): {error}") from error
    if not isinstance(result, VirtualInput):
        raise RoutingError(
            f"Row {row_index}: {type(chosen[0]).__name__} returned {type(result).__name__}, not a "
            f"moa.adapters.input_level.VirtualInput."
        )
    cache[key] = result
    return result


__all__ = ["InputRows", "split_input_rows"]
