"""The sizes of a base model that prompt-learning adapters depend on, read as PEFT reads them.

PEFT fills a prompt-learning config's ``token_dim``, ``num_layers`` and
``num_attention_heads`` from the base's config when they are unset; for prefix tuning on a
grouped-query-attention base it uses the key/value heads (``token_dim = kv_heads * head_dim``).
:func:`fill_config` does the same, and refuses a config whose set values disagree with the base.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from moa.errors import AdapterShapeError


@dataclasses.dataclass(frozen=True)
class BaseShapes:
    """Sizes of a decoder-only base.

    Attributes:
        hidden_size: Width of the token embeddings.
        num_layers: Decoder layers.
        num_heads: Attention (query) heads.
        kv_heads: Key/value heads (``num_heads`` without grouped-query attention).
        head_dim: Width of one head.
        vocab_size: Rows of the input embedding.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int


def base_shapes(base_model: nn.Module) -> BaseShapes:
    """Read :class:`BaseShapes` from a transformers causal LM."""
    config = base_model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    embedding = base_model.get_input_embeddings()
    heads = int(text.num_attention_heads)
    hidden = int(embedding.embedding_dim)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    return BaseShapes(
        hidden_size=hidden,
        num_layers=int(text.num_hidden_layers),
        num_heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vocab_size=int(embedding.num_embeddings),
    )


def fill_config(config: Any, values: dict[str, int]) -> None:
    """Set each unset (``None``) field of ``config`` to ``values[field]``; refuse a set one that differs.

    Raises:
        AdapterShapeError: a field set to another value than this base needs.
    """
    for name, value in values.items():
        current = getattr(config, name)
        if current is None:
            setattr(config, name, value)
        elif current != value:
            raise AdapterShapeError(
                f"{type(config).__name__} field {name} = {current!r}, but this base needs {value}. The adapter was "
                f"made for another base model; load it on that base (or leave {name} unset for a new adapter)."
            )


def check_optional_positive(config: Any, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that is set but not a positive integer, as an error text, else ``None``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"{type(config).__name__} field {name} = {value!r} must be a positive integer or null."
    return None
