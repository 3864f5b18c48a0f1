"""Prompt tuning (Lester et al., 2021): learned virtual token embeddings before each row's tokens.

PEFT's ``PROMPT_TUNING`` for causal LMs, in moa: the config keys, the saved tensor
(``prompt_embeddings``, ``[num_virtual_tokens, hidden]``, float32), the initialisations
(``RANDOM``: N(0, 1); ``TEXT``: the embeddings of ``prompt_tuning_init_text``'s tokens,
repeated or cut to ``num_virtual_tokens``; ``SAMPLE_VOCAB``: embeddings of random
vocabulary tokens) and the positions of the virtual tokens (``0..n-1``, the row's tokens
after them) are PEFT's, so each side loads the other's folders with the same logits.

A row asking for a weighted mixture of prompt-tuning adapters gets the weighted sum of their
virtual embeddings, position by position (moa normalises the weights to sum to 1); that
needs the same ``num_virtual_tokens``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from moa.adapters.input_level import InputAdapter, InputAdapterConfig, VirtualInput
from moa.errors import AdapterConfigError, RoutingError
from moa_prompt_tuning.base_shapes import base_shapes, check_optional_positive, fill_config

_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass
class PromptTuningConfig(InputAdapterConfig):
    """PEFT's ``PromptTuningConfig`` fields (causal LMs).

    Attributes:
        prompt_tuning_init: ``"RANDOM"``, ``"TEXT"`` or ``"SAMPLE_VOCAB"``.
        prompt_tuning_init_text: The text whose token embeddings start a ``"TEXT"`` adapter.
        tokenizer_name_or_path: The tokenizer for ``"TEXT"`` when the model has none (a local
            folder); filled with the tokenizer used, so PEFT can load the saved config.
        tokenizer_kwargs: Keyword arguments for loading that tokenizer (``"TEXT"`` only).
        token_dim, num_layers, num_attention_heads: The base's sizes (filled from the base).
        num_transformer_submodules: 1 (decoder-only models).
        inference_mode: Written ``true`` on save, as PEFT does.
    """

    adapter_type: ClassVar[str] = "prompt_tuning"
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = 1
    inference_mode: bool = False

    def validate(self) -> None:
        """Raise :class:`AdapterConfigError` for values moa's prompt tuning cannot honour."""
        super().validate()
        init = self.prompt_tuning_init
        if init not in _INITS:
            raise AdapterConfigError(
                f"PromptTuningConfig field prompt_tuning_init = {init!r} is not one of {', '.join(_INITS)}."
            )
        if init == "TEXT" and (not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text):
            raise AdapterConfigError(
                f"prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text whose token embeddings start the "
                f"prompt; got {self.prompt_tuning_init_text!r}."
            )
        if self.tokenizer_kwargs and init != "TEXT":
            raise AdapterConfigError(
                f"tokenizer_kwargs = {self.tokenizer_kwargs!r} is only used with prompt_tuning_init='TEXT' (got "
                f"{init!r}). Drop it."
            )
        if self.num_transformer_submodules not in (None, 1):
            raise AdapterConfigError(
                f"PromptTuningConfig field num_transformer_submodules = {self.num_transformer_submodules!r}: moa "
                f"runs decoder-only models, which have 1."
            )
        problem = check_optional_positive(self, ("token_dim", "num_layers", "num_attention_heads"))
        if problem:
            raise AdapterConfigError(problem)

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT saves it (``inference_mode`` true)."""
        data = super().to_dict()
        data["inference_mode"] = True
        return data


class PromptTuningAdapter(InputAdapter):
    """``num_virtual_tokens`` learned embeddings of the base's width.

    Args:
        config: Its config; unset base sizes are filled from ``base_model``.
        base_model: The transformers model.
    """

    peft_keys: ClassVar[tuple[str, ...]] = ("prompt_embeddings",)

    def __init__(self, config: PromptTuningConfig, base_model: nn.Module):
        super().__init__(config, base_model)
        shapes = base_shapes(base_model)
        fill_config(config, {"token_dim": shapes.hidden_size, "num_layers": shapes.num_layers,
                             "num_attention_heads": shapes.num_heads})
        config.num_transformer_submodules = 1
        # RANDOM is PEFT's nn.Embedding init, N(0, 1), kept in float32 as PEFT keeps it
        self.prompt_embeddings = nn.Parameter(torch.randn(config.num_virtual_tokens, shapes.hidden_size))

    def initialize(self, base_model: nn.Module, tokenizer: Any) -> None:
        """Apply ``TEXT`` / ``SAMPLE_VOCAB`` initialisation (``RANDOM`` is done in ``__init__``)."""
        config = self.config
        embedding = base_model.get_input_embeddings()
        n = config.num_virtual_tokens
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, embedding.num_embeddings, (n,), device=embedding.weight.device)
        elif config.prompt_tuning_init == "TEXT":
            tokenizer = self._tokenizer(tokenizer, base_model)
            text_ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
            if not text_ids:
                raise AdapterConfigError(
                    f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} encodes to no tokens. Give a longer "
                    f"text."
                )
            text_ids = (text_ids * math.ceil(n / len(text_ids)))[:n]  # PEFT's repeat-then-cut
            ids = torch.tensor(text_ids, dtype=torch.long, device=embedding.weight.device)
        else:
            return
        with torch.no_grad():
            self.prompt_embeddings.copy_(embedding(ids).detach().float().to(self.prompt_embeddings.device))

    def _tokenizer(self, tokenizer: Any, base_model: nn.Module) -> Any:
        """The model's tokenizer, else the one at ``tokenizer_name_or_path``; records where it came from."""
        config = self.config
        if tokenizer is None and config.tokenizer_name_or_path:
            from transformers import AutoTokenizer

            kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        if tokenizer is None:
            raise AdapterConfigError(
                "prompt_tuning_init='TEXT' needs a tokenizer: this model has none. Load a base folder with tokenizer "
                "files, or set tokenizer_name_or_path to a local tokenizer folder."
            )
        if not config.tokenizer_name_or_path:
            # PEFT refuses a TEXT config without it when loading the saved folder
            config.tokenizer_name_or_path = (getattr(tokenizer, "name_or_path", None)
                                             or getattr(base_model.config, "_name_or_path", None) or None)
        return tokenizer

    def virtual_input(self) -> VirtualInput:
        """The virtual token embeddings, ``[num_virtual_tokens, hidden]``."""
        return VirtualInput(embeddings=self.prompt_embeddings)

    @classmethod
    def mix(cls, adapters: Sequence[InputAdapter], weights: Sequence[float]) -> VirtualInput:
        """The weighted sum of the adapters' virtual embeddings (same ``num_virtual_tokens`` needed).

        Raises:
            RoutingError: the adapters have different numbers of virtual tokens.
        """
        counts = sorted({a.config.num_virtual_tokens for a in adapters})
        if len(counts) > 1:
            raise RoutingError(
                f"prompt-tuning adapters with different num_virtual_tokens ({', '.join(map(str, counts))}) cannot be "
                f"mixed: a mixture sums their virtual embeddings position by position. Mix adapters with the same "
                f"num_virtual_tokens, or give each row one of them."
            )
        total = sum(w * a.prompt_embeddings for a, w in zip(adapters, weights, strict=True))
        return VirtualInput(embeddings=total)
