"""Helpers shared by the serving tests."""

from __future__ import annotations

from typing import Any

import torch


def routed_tiny_model(ranks: dict[str, int], seed: int = 0) -> Any:
    """The tiny model with random LoRA adapters of these ranks on attention and MLP, scaled up
    so every adapter visibly changes the answers."""
    import moa
    from moa.testing.fixtures import make_tiny_model

    torch.manual_seed(seed)
    tiny = make_tiny_model()
    for name, rank in ranks.items():
        tiny.add_adapter(name, moa.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
        with torch.no_grad():
            for layer in tiny.adapter_layers(name).values():
                for pname, param in layer.named_parameters():
                    if pname.startswith("lora_B"):
                        param.mul_(4.0)
    return tiny


def greedy_alone(model: Any, prompt: list[int], weights: Any, max_tokens: int) -> list[int]:
    """``model.generate`` of one request alone, greedy, exactly ``max_tokens`` new tokens (EOS
    masked until then): the reference a served answer must equal. ``weights``: a mixture,
    ``None`` (the base) or ``"auto"``."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, adapter_weights=[weights],
                             pad_token_id=257, eos_token_id=256)
    return out[0, ids.shape[1]:].tolist()
