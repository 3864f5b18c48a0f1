"""Limits checked before a call does any work: the base's context, and how many tokens a call asks for.

``MixtureModel.generate`` refuses a prompt longer than the base's context
(``max_position_embeddings``) and a ``max_new_tokens`` / ``max_length`` that would run past it,
with an :class:`~moa.errors.InputLimitError` saying by how much and what to do, before the
first forward pass. The server applies the same rule to ``max_tokens``
(:mod:`moa.serve.engine`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moa.errors import InputLimitError


def context_length(config: Any) -> int | None:
    """The base's context in tokens (``max_position_embeddings``), or ``None`` if it declares none."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_generation_lengths(config: Any, input_ids: torch.Tensor | None, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`InputLimitError` if a ``generate`` call would run past the base's context.

    Args:
        config: The base's transformers config.
        input_ids: The prompt ids ``[B, S]`` (or ``None`` with ``inputs_embeds`` in ``kwargs``).
        kwargs: The other ``generate`` arguments (``max_new_tokens``, ``max_length``, ``inputs_embeds``).
    """
    prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    prompt_len = int(prompt.shape[1]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else 0
    new_tokens = kwargs.get("max_new_tokens")
    if new_tokens is not None and (not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 0):
        raise InputLimitError(f"max_new_tokens must be an integer >= 0; got {str(new_tokens)[:40]!r}.")
    context = context_length(config)
    if context is None:
        return
    if prompt_len > context:
        raise InputLimitError(
            f"The prompt has {prompt_len} tokens, above this base's context of {context} tokens "
            f"(max_position_embeddings). Nothing was run. Shorten the prompt (keep its last "
            f"{context - (new_tokens or 0)} tokens, say)."
        )
    if new_tokens is not None and prompt_len + new_tokens > context:
        raise InputLimitError(
            f"max_new_tokens={new_tokens} with a {prompt_len}-token prompt would run past this base's context of "
            f"{context} tokens. Nothing was run. Ask for at most {context - prompt_len} new tokens."
        )
    max_length = kwargs.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length > context):
        raise InputLimitError(
            f"max_length={str(max_length)[:40]} is above this base's context of {context} tokens (or not an "
            f"integer). Nothing was run. Give max_length <= {context}, or max_new_tokens."
        )


__all__ = ["check_generation_lengths", "context_length"]
