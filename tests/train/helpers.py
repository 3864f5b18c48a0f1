"""Tiny stand-ins for the training, routing and eval tests: a base with a tokenizer, examples."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import moa
from moa.train.recipes import DEFAULT_HIDDEN_LAYER

#: Two toy "domains" whose prompts differ in their characters, so a gate can tell them apart.
TOY_DOMAINS = ("alpha", "beta")


@dataclasses.dataclass(frozen=True)
class ToyExample:
    """The fields of ``moa.data.Example`` that training and eval read."""

    id: str
    domain: str
    prompt: str
    answer: str
    phrasing: int = 0
    split: str = "train"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def toy_examples(n_per_domain: int = 12, seed: int = 0) -> list[ToyExample]:
    """Alpha prompts are lowercase letters + 'x' answers; beta prompts are digits + 'y' answers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_per_domain):
        letters = "".join(chr(97 + int(c)) for c in torch.randint(0, 20, (5,), generator=g))
        digits = "".join(str(int(c)) for c in torch.randint(0, 10, (5,), generator=g))
        out.append(ToyExample(f"alpha-{i}", "alpha", f"{letters} what", f"x{letters[0]}"))
        out.append(ToyExample(f"beta-{i}", "beta", f"{digits} compute", f"y{digits[0]}"))
    return out


def load_tiny(base_dir) -> moa.MixtureModel:
    """The tiny random Llama (fp32) with its tokenizer, as a MixtureModel."""
    return moa.MixtureModel.from_pretrained(str(base_dir), quantization=None, device="cpu")


def add_random_adapters(model: moa.MixtureModel, names=TOY_DOMAINS, first_layer: int = DEFAULT_HIDDEN_LAYER,
                        seed: int = 0) -> None:
    """Non-zero LoRA adapters on layers >= ``first_layer`` (so in-pass routing loses nothing).

    The default is the learned gate's default ``hidden_layer`` (2 of the tiny base's 4 layers).
    """
    from moa.train.sft import layer_target_regex

    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        target = layer_target_regex(model.config.num_hidden_layers, first_layer)
        model.add_adapter(name, moa.LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False))


def one_thread():
    """Generator for an autouse fixture: torch on one thread (tiny models gain nothing from more,
    and on a shared CPU OpenMP barriers in index_add_ can stall ~100 ms per call), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
