"""What every input-level adapter type provides: a config and the adapter itself.

Input-level adapters change what a row's tokens are run *with*, not the weights of a
Linear layer: prompt tuning puts learned virtual token embeddings before the row's tokens,
prefix tuning puts learned keys and values before them in every decoder layer's attention.
A type is registered through the ``moa_input_adapter_types`` hook as an
:class:`~moa.plugin.records.InputAdapterTypeSpec` naming an :class:`InputAdapterConfig`
subclass and an :class:`InputAdapter` subclass; moa builds one adapter per name.

The adapter answers one question, :meth:`InputAdapter.virtual_input`: what goes before a
row's tokens, as a :class:`VirtualInput`. moa does the rest for any type: it lines the rows
of a batch up (rows with fewer virtual tokens, or none, are left-padded with masked
positions), gives every row the position ids it would have alone, and strips the virtual
positions from the logits, so rows with different input-level adapters, Linear-level
adapters and base rows share one forward and one ``generate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from moa.errors import AdapterConfigError, AdapterShapeError, RoutingError, format_choices


@dataclasses.dataclass
class InputAdapterConfig:
    """Base of input-level adapter configs; fields mirror PEFT's prompt-learning configs.

    Attributes:
        num_virtual_tokens: How many virtual positions the adapter puts before a row's tokens.
        base_model_name_or_path: The base this adapter was made for (informational; the
            fingerprint in the weights file is what is checked).
        task_type: PEFT task type; only ``"CAUSAL_LM"`` (or ``None``) is served.
    """

    adapter_type: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""

    num_virtual_tokens: int = 20
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def validate(self) -> None:
        """Raise :class:`AdapterConfigError` for values this type cannot honour."""
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise AdapterConfigError(
                f"{type(self).__name__} field num_virtual_tokens = {n!r} must be a positive integer, "
                f"e.g. 20."
            )
        if self.task_type not in (None, "CAUSAL_LM"):
            raise AdapterConfigError(
                f"{type(self).__name__} field task_type = {self.task_type!r}: moa runs causal language "
                f"models only. Use task_type='CAUSAL_LM'."
            )
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise AdapterConfigError(
                f"{type(self).__name__} field base_model_name_or_path = {self.base_model_name_or_path!r} "
                f"must be a string or null."
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as written to ``adapter_config.json`` (PEFT keys)."""
        data = dataclasses.asdict(self)
        data["peft_type"] = self.peft_type
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputAdapterConfig:
        """Build from an ``adapter_config.json`` dict; unknown keys are ignored, values validated."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in names})
        config.validate()
        return config


@dataclasses.dataclass(frozen=True)
class VirtualInput:
    """What an input-level adapter puts before one row's tokens.

    Attributes:
        embeddings: ``[n, hidden]`` virtual token embeddings, run through every layer before
            the row's tokens (prompt tuning), or ``None``.
        key_values: One ``(key, value)`` pair per decoder layer, each ``[kv_heads, n, head_dim]``,
            placed in the attention cache before the row's tokens (prefix tuning), or ``None``.
            Keys are used as they are (no rotary embedding is applied to them), as in PEFT.
    """

    embeddings: torch.Tensor | None = None
    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    @property
    def embedding_length(self) -> int:
        """Virtual positions this input adds to the sequence (0 without embeddings)."""
        return 0 if self.embeddings is None else int(self.embeddings.shape[0])

    @property
    def prefix_length(self) -> int:
        """Positions this input adds to the attention cache (0 without key/values)."""
        return 0 if not self.key_values else int(self.key_values[0][0].shape[1])


class InputAdapter(nn.Module):
    """One input-level adapter (its parameters), built from its config and the base model.

    Subclasses create their parameters in ``__init__`` (with the shapes the base needs),
    implement :meth:`virtual_input`, and may override :meth:`initialize` (for new adapters)
    and :meth:`mix` (to define weighted mixtures of adapters of their type).

    Args:
        config: The adapter's config.
        base_model: The transformers model it will run with (read its config; do not keep a
            reference that ``nn.Module`` would register as a submodule).
    """

    #: Names of the tensors in PEFT's ``adapter_model.safetensors``, each a parameter (or
    #: buffer) path of this module; override :meth:`peft_state_dict` when they differ.
    peft_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: InputAdapterConfig, base_model: nn.Module):
        super().__init__()
        self.config = config

    def initialize(self, base_model: nn.Module, tokenizer: Any) -> None:
        """Initialise a new adapter (``add_adapter``; not called when loading weights).

        Args:
            base_model: The transformers model (e.g. to embed an init text).
            tokenizer: The model's tokenizer, or ``None`` when it has none.
        """

    def virtual_input(self) -> VirtualInput:
        """What this adapter puts before a row's tokens (tensors on the autograd graph)."""
        raise NotImplementedError(f"{type(self).__name__} must implement virtual_input().")

    @classmethod
    def mix(cls, adapters: Sequence[InputAdapter], weights: Sequence[float]) -> VirtualInput:
        """The virtual input of a row asking for a weighted mixture of ``adapters`` (all of this type).

        moa calls it only for two or more adapters, with weights normalised to sum to 1. The
        default refuses: a type defines a mixture only where its math is meaningful.

        Raises:
            RoutingError: always, unless a subclass defines the mixture.
        """
        raise RoutingError(
            f"Adapters of type {cls.__name__} cannot be mixed in one row (asked for "
            f"{len(adapters)} of them). Give each row one of them, or mix Linear-level adapters instead."
        )

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed as PEFT saves them (``"prompt_embeddings"``), for saving."""
        return {key: self.get_parameter(key).detach() for key in self.peft_keys}

    def load_peft_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy PEFT-named tensors into this adapter, checking names and shapes first.

        Raises:
            AdapterShapeError: other tensor names, or a shape this base does not fit.
        """
        if set(tensors) != set(self.peft_keys):
            raise AdapterShapeError(
                f"The adapter file has tensors {format_choices(tensors)} but a {type(self).__name__} needs "
                f"{format_choices(self.peft_keys)}. Was it saved for another adapter type?"
            )
        for key, tensor in tensors.items():
            want = tuple(self.get_parameter(key).shape)
            if tuple(tensor.shape) != want:
                raise AdapterShapeError(
                    f"Tensor {key!r} has shape {tuple(tensor.shape)} but this config and base need {want}. "
                    f"Check num_virtual_tokens in adapter_config.json, or whether the adapter was made for "
                    f"another base model."
                )
        with torch.no_grad():
            for key, tensor in tensors.items():
                param = self.get_parameter(key)
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))


__all__ = ["InputAdapter", "InputAdapterConfig", "VirtualInput"]
