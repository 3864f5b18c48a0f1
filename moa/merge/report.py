"""What merging into the base did to each layer: :class:`MergeReport`.

See :mod:`moa.merge.into_base` for how to read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerMergeError:
    """What merging did to one layer, measured on sample inputs ``X``.

    Attributes:
        module_name: The layer.
        merge_error: ``||X W_merged^T - X (W + delta)^T|| / ||X (W + delta)^T||``: merged
            layer vs the unmerged layer with the adapter (0 up to rounding on dense bases).
        requant_error: ``||X Q(W)^T - X W^T|| / ||X W^T||`` for re-quantizing the unchanged
            weight ``W`` the same way (0 on dense bases).
        adapter_effect: ``||X delta^T|| / ||X (W + delta)^T||``, the adapter's share of the output.
    """

    module_name: str
    merge_error: float
    requant_error: float
    adapter_effect: float


@dataclass
class MergeReport:
    """The error merging into the base introduced (see the module docstring).

    Attributes:
        mixture: ``{adapter: weight}`` that was merged.
        quantization: ``"nf4"`` when any merged layer was 4-bit, else ``None``.
        layers: One :class:`LayerMergeError` per merged layer.
        output_error: Relative norm of the logits difference, merged vs unmerged, on
            ``sample_input_ids`` (``None`` when none were given).
    """

    mixture: dict[str, float]
    quantization: str | None
    layers: list[LayerMergeError] = field(default_factory=list)
    output_error: float | None = None

    @property
    def max_merge_error(self) -> float:
        """Largest per-layer ``merge_error``."""
        return max((layer.merge_error for layer in self.layers), default=0.0)

    @property
    def mean_merge_error(self) -> float:
        """Mean per-layer ``merge_error``."""
        return sum(layer.merge_error for layer in self.layers) / max(len(self.layers), 1)

    @property
    def mean_requant_error(self) -> float:
        """Mean per-layer ``requant_error`` (re-quantization alone)."""
        return sum(layer.requant_error for layer in self.layers) / max(len(self.layers), 1)

    @property
    def mean_adapter_effect(self) -> float:
        """Mean per-layer ``adapter_effect``."""
        return sum(layer.adapter_effect for layer in self.layers) / max(len(self.layers), 1)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        text = (
            f"merged {self.mixture} into {len(self.layers)} {self.quantization or 'dense'} layers: "
            f"merge error mean {self.mean_merge_error:.3e} (max {self.max_merge_error:.3e}), "
            f"re-quantization alone {self.mean_requant_error:.3e}, adapter effect {self.mean_adapter_effect:.3e}"
        )
        if self.output_error is not None:
            text += f", logits error {self.output_error:.3e}"
        return text


__all__ = ["LayerMergeError", "MergeReport"]
