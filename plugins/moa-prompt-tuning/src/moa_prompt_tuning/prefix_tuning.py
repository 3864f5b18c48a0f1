"""Prefix tuning (Li & Liang, 2021): learned keys and values before each row's tokens, in every layer.

PEFT's ``PREFIX_TUNING`` for causal LMs with ``prefix_projection=False``, in moa. The saved
tensor is PEFT's ``prompt_embeddings`` ``[num_virtual_tokens, num_layers * 2 * token_dim]``
(``token_dim = kv_heads * head_dim``, PEFT's rule for grouped-query attention); layer ``l``'s
keys are columns ``2l`` and its values ``2l + 1`` of its ``[n, 2 * num_layers, kv_heads,
head_dim]`` view. The prefix enters the attention cache as it is (no rotary embedding), and
the row's tokens take positions ``n, n+1, ...`` after it, as in PEFT's forward.

Not supported: ``prefix_projection=True`` (PEFT's two-layer MLP that produces the prefix while
training) is refused; train with ``prefix_projection=False``. A row cannot mix prefix-tuning
adapters (a weighted sum of keys and values is no mixture of their effects).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from moa.adapters.input_level import InputAdapter, InputAdapterConfig, VirtualInput
from moa.errors import AdapterConfigError, RoutingError
from moa_prompt_tuning.base_shapes import base_shapes, check_optional_positive, fill_config


@dataclasses.dataclass
class PrefixTuningConfig(InputAdapterConfig):
    """PEFT's ``PrefixTuningConfig`` fields (causal LMs).

    Attributes:
        prefix_projection: Must be ``False`` (the projection MLP is not supported).
        init_weights: ``None`` (random, N(0, 1)) or ``"zero"`` (an all-zero prefix).
        encoder_hidden_size: PEFT's MLP width; unused without the projection (filled as PEFT does).
        token_dim, num_layers, num_attention_heads: The base's key/value sizes (filled from the base).
        num_transformer_submodules: 1 (decoder-only models).
        inference_mode: Written ``true`` on save, as PEFT does.
    """

    adapter_type: ClassVar[str] = "prefix_tuning"
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    prefix_projection: bool = False
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = 1
    inference_mode: bool = False

    def validate(self) -> None:
        """Raise :class:`AdapterConfigError` for values moa's prefix tuning cannot honour."""
        super().validate()
        if self.prefix_projection is not False:
            raise AdapterConfigError(
                f"PrefixTuningConfig field prefix_projection = {self.prefix_projection!r}: moa's prefix tuning has no "
                f"projection MLP. Train (or re-train) the adapter with prefix_projection=False."
            )
        if self.init_weights not in (None, "zero"):
            raise AdapterConfigError(
                f"PrefixTuningConfig field init_weights = {self.init_weights!r} is not null (random) or 'zero'."
            )
        if self.num_transformer_submodules not in (None, 1):
            raise AdapterConfigError(
                f"PrefixTuningConfig field num_transformer_submodules = {self.num_transformer_submodules!r}: moa "
                f"runs decoder-only models, which have 1."
            )
        problem = check_optional_positive(
            self, ("token_dim", "num_layers", "num_attention_heads", "encoder_hidden_size"))
        if problem:
            raise AdapterConfigError(problem)

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT saves it (``inference_mode`` true)."""
        data = super().to_dict()
        data["inference_mode"] = True
        return data


class PrefixTuningAdapter(InputAdapter):
    """``num_virtual_tokens`` learned key/value positions for every decoder layer.

    Args:
        config: Its config; unset base sizes are filled from ``base_model``.
        base_model: The transformers model.
    """

    peft_keys: ClassVar[tuple[str, ...]] = ("prompt_embeddings",)

    def __init__(self, config: PrefixTuningConfig, base_model: nn.Module):
        super().__init__(config, base_model)
        shapes = base_shapes(base_model)
        self.kv_heads, self.head_dim, self.num_layers = shapes.kv_heads, shapes.head_dim, shapes.num_layers
        token_dim = shapes.kv_heads * shapes.head_dim
        fill_config(config, {"token_dim": token_dim, "num_layers": shapes.num_layers,
                             "num_attention_heads": shapes.kv_heads})
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = token_dim
        config.num_transformer_submodules = 1
        size = (config.num_virtual_tokens, shapes.num_layers * 2 * token_dim)
        weights = torch.zeros(size) if config.init_weights == "zero" else torch.randn(size)
        self.prompt_embeddings = nn.Parameter(weights)

    def virtual_input(self) -> VirtualInput:
        """Per layer ``(key, value)``, each ``[kv_heads, num_virtual_tokens, head_dim]``."""
        n = self.config.num_virtual_tokens
        view = self.prompt_embeddings.view(n, 2 * self.num_layers, self.kv_heads, self.head_dim).transpose(0, 2)
        # view is now [kv_heads, 2 * layers, n, head_dim]: keys of layer l at 2l, values at 2l + 1
        pairs = tuple((view[:, 2 * layer], view[:, 2 * layer + 1]) for layer in range(self.num_layers))
        return VirtualInput(key_values=pairs)

    @classmethod
    def mix(cls, adapters: Sequence[InputAdapter], weights: Sequence[float]) -> VirtualInput:
        """Refused: prefix tuning defines no mixture.

        Raises:
            RoutingError: always.
        """
        raise RoutingError(
            f"prefix-tuning adapters cannot be mixed in one row (asked for {len(adapters)}): a weighted sum of "
            f"attention keys and values is no mixture of their effects. Give each row one prefix-tuning adapter; "
            f"Linear-level adapters (LoRA...) may be mixed into it."
        )
