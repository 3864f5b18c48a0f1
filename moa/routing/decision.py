"""RoutingDecision: which adapters each row (or token) uses, and with what weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from moa.errors import RoutingError, UnknownAdapterError, format_choices

#: One row's mixture: adapter name -> non-negative weight. ``None`` means "base only".
Mixture = Mapping[str, float] | None

Level = Literal["row", "token"]


@dataclass(frozen=True)
class RoutingDecision:
    """Adapter ids and weights per row or per token.

    ``ids[i, j]`` is the slot index (position in the model's adapter list) of the
    j-th adapter used by row/token ``i``, or ``-1`` for none; ``weights[i, j]`` is its
    weight. A row-level decision is expanded to tokens once per forward, so the same
    decision serves every generated token and the KV cache stays valid.

    Attributes:
        ids: ``[N, k]`` int32, ``-1`` = no adapter.
        weights: ``[N, k]`` float32, 0 where ``ids`` is -1.
        level: ``"row"`` (N = batch size) or ``"token"`` (N = batch * seq_len).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    level: Level = "row"

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.shape != self.weights.shape:
            raise RoutingError(
                f"RoutingDecision needs ids and weights of the same [N, k] shape; got ids "
                f"{tuple(self.ids.shape)} and weights {tuple(self.weights.shape)}."
            )
        if self.level not in ("row", "token"):
            raise RoutingError(f"Unknown routing level {self.level!r}. Choices: row, token.")

    @property
    def k(self) -> int:
        """Adapters per row/token (the top-k width)."""
        return int(self.ids.shape[1])

    @classmethod
    def from_mixtures(
        cls, mixtures: Sequence[Mixture], adapter_names: Sequence[str]
    ) -> RoutingDecision:
        """Build a row-level decision from one ``{name: weight}`` (or ``None``) per row.

        Zero weights are dropped. Raises :class:`RoutingError` for negative, NaN or
        infinite weights and :class:`UnknownAdapterError` for names not loaded.
        """
        slots = {name: i for i, name in enumerate(adapter_names)}
        rows: list[list[tuple[int, float]]] = []
        for row_index, mixture in enumerate(mixtures):
            entries: list[tuple[int, float]] = []
            if mixture is not None:
                if not isinstance(mixture, Mapping):
                    raise RoutingError(
                        f"Row {row_index}: a mixture must be a dict {{adapter name: weight}} "
                        f"or None; got {type(mixture).__name__} {mixture!r}."
                    )
                for name, weight in mixture.items():
                    if name not in slots:
                        raise UnknownAdapterError(
                            f"Row {row_index} names adapter {name!r}, which is not loaded. "
                            f"Loaded: {format_choices(adapter_names)}. Load it first with "
                            f"model.load_adapter(path, adapter_name={name!r})."
                        )
                    w = float(weight)
                    if not math.isfinite(w) or w < 0:
                        raise RoutingError(
                            f"Row {row_index}: weight {weight!r} for adapter {name!r} is not a "
                            f"finite non-negative number. Use weights >= 0 (they need not sum to 1)."
                        )
                    if w > 0:
                        entries.append((slots[name], w))
            rows.append(entries)
        k = max((len(r) for r in rows), default=0) or 1
        ids = torch.full((len(rows), k), -1, dtype=torch.int32)
        weights = torch.zeros((len(rows), k), dtype=torch.float32)
        for i, entries in enumerate(rows):
            for j, (slot, w) in enumerate(entries):
                ids[i, j] = slot
                weights[i, j] = w
        return cls(ids=ids, weights=weights, level="row")

    @classmethod
    def from_names(
        cls, names: Sequence[str | None], adapter_names: Sequence[str]
    ) -> RoutingDecision:
        """One adapter name (weight 1) or ``None`` (base only) per row, as PEFT's ``adapter_names``."""
        mixtures: list[Mixture] = []
        for i, name in enumerate(names):
            if name is not None and not isinstance(name, str):
                raise RoutingError(
                    f"adapter_names[{i}] must be an adapter name or None; got {name!r}. "
                    f"Use adapter_weights=[{{name: weight}}, ...] for mixtures."
                )
            mixtures.append(None if name is None else {name: 1.0})
        return cls.from_mixtures(mixtures, adapter_names)

    def to_mixtures(self, adapter_names: Sequence[str]) -> list[dict[str, float]]:
        """Row-wise ``{name: weight}`` dicts (for telemetry, ``model.route``)."""
        out: list[dict[str, float]] = []
        for ids_row, w_row in zip(self.ids.tolist(), self.weights.tolist(), strict=True):
            mix: dict[str, float] = {}
            for slot, w in zip(ids_row, w_row, strict=True):
                if slot >= 0:
                    mix[adapter_names[slot]] = mix.get(adapter_names[slot], 0.0) + float(w)
            out.append(mix)
        return out

    def for_tokens(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand to token level: ``(ids [B*S, k], weights [B*S, k])``.

        A row-level decision made for ``b`` rows serves a batch of ``B = b * m`` rows,
        each row repeated ``m`` times consecutively, which is how ``generate`` expands
        rows for beams and ``num_return_sequences``.
        """
        n = self.ids.shape[0]
        if self.level == "token":
            if n != batch_size * seq_len:
                raise RoutingError(
                    f"A token-level decision for {n} tokens cannot serve a batch of "
                    f"{batch_size} x {seq_len} tokens."
                )
            return self.ids, self.weights
        if n == 0 or batch_size % n != 0:
            raise RoutingError(
                f"The routing decision has {n} rows but the batch has {batch_size}. Give one "
                f"adapter name / mixture per row of input_ids."
            )
        repeats = (batch_size // n) * seq_len
        return (
            self.ids.repeat_interleave(repeats, dim=0),
            self.weights.repeat_interleave(repeats, dim=0),
        )

    def to(self, device: torch.device | str) -> RoutingDecision:
        """The same decision with its tensors on ``device``."""
        return RoutingDecision(self.ids.to(device), self.weights.to(device), self.level)
