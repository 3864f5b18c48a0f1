"""Input-level adapters (the ``moa_input_adapter_types`` hook) in a MixtureModel, against plain transformers.

Two third-party types are registered from this module (module-level hookimpls): ``toy_prompt``
(virtual embeddings) and ``toy_prefix`` (per-layer prefix key/values). Each row of a mixed batch
is checked against an independent reference: the plain transformers base run on that row alone
with the virtual embeddings concatenated by hand (``inputs_embeds``) or the prefix written into a
``DynamicCache`` by hand, in float32, to 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import ClassVar

import pytest
import torch
from torch import nn
from transformers import DynamicCache

import moa
from moa.adapters.input_level import InputAdapter, InputAdapterConfig, VirtualInput
from moa.errors import AdapterExistsError, RoutingError, UnknownPluginError
from moa.hookspecs import hookimpl
from moa.plugin.records import InputAdapterTypeSpec
from moa.testing import fresh_plugin_manager, load_tiny_base, make_tiny_model, random_input_ids

TOL = dict(rtol=1e-5, atol=1e-5)


@dataclasses.dataclass
class ToyPromptConfig(InputAdapterConfig):
    adapter_type: ClassVar[str] = "toy_prompt"
    peft_type: ClassVar[str] = "TOY_PROMPT"


class ToyPrompt(InputAdapter):
    peft_keys: ClassVar[tuple[str, ...]] = ("prompt_embeddings",)

    def __init__(self, config, base_model):
        super().__init__(config, base_model)
        width = base_model.get_input_embeddings().embedding_dim
        self.prompt_embeddings = nn.Parameter(torch.randn(config.num_virtual_tokens, width))

    def virtual_input(self) -> VirtualInput:
        return VirtualInput(embeddings=self.prompt_embeddings)

    @classmethod
    def mix(cls, adapters, weights):
        return VirtualInput(embeddings=sum(w * a.prompt_embeddings for a, w in zip(adapters, weights)))


@dataclasses.dataclass
class ToyPrefixConfig(InputAdapterConfig):
    adapter_type: ClassVar[str] = "toy_prefix"
    peft_type: ClassVar[str] = "TOY_PREFIX"


class ToyPrefix(InputAdapter):
    peft_keys: ClassVar[tuple[str, ...]] = ("prefix",)

    def __init__(self, config, base_model):
        super().__init__(config, base_model)
        c = base_model.config
        head_dim = c.hidden_size // c.num_attention_heads
        self.prefix = nn.Parameter(torch.randn(c.num_hidden_layers, 2, c.num_key_value_heads,
                                               config.num_virtual_tokens, head_dim))

    def virtual_input(self) -> VirtualInput:
        return VirtualInput(key_values=tuple((layer[0], layer[1]) for layer in self.prefix))


@hookimpl
def moa_input_adapter_types() -> list[InputAdapterTypeSpec]:
    return [
        InputAdapterTypeSpec(name="toy_prompt", config_class=ToyPromptConfig, adapter_class=ToyPrompt,
                             peft_type="TOY_PROMPT", description="test: virtual embeddings"),
        InputAdapterTypeSpec(name="toy_prefix", config_class=ToyPrefixConfig, adapter_class=ToyPrefix,
                             peft_type="TOY_PREFIX", description="test: prefix key/values"),
    ]


@pytest.fixture
def toy_plugins():
    with fresh_plugin_manager([sys.modules[__name__]]) as manager:
        yield manager


@pytest.fixture
def model(toy_plugins, tiny_base_dir):
    torch.manual_seed(0)
    model = make_tiny_model(tiny_base_dir)
    model.add_adapter("p2", ToyPromptConfig(num_virtual_tokens=2))
    model.add_adapter("p4", ToyPromptConfig(num_virtual_tokens=4))
    model.add_adapter("p2b", ToyPromptConfig(num_virtual_tokens=2))
    model.add_adapter("x3", ToyPrefixConfig(num_virtual_tokens=3))
    model.add_adapter("lora", moa.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def reference_logits(base, ids: torch.Tensor, adapter: InputAdapter | None) -> torch.Tensor:
    """One row (or several with the same adapter) on the plain transformers base, by hand."""
    with torch.no_grad():
        if isinstance(adapter, ToyPrompt):
            virtual = adapter.prompt_embeddings.expand(ids.shape[0], -1, -1)
            embeds = torch.cat([virtual, base.get_input_embeddings()(ids)], 1)
            return base(inputs_embeds=embeds).logits[:, virtual.shape[1]:]
        if isinstance(adapter, ToyPrefix):
            cache = DynamicCache(config=base.config)
            for layer, (k, v) in enumerate(adapter.virtual_input().key_values):
                cache.update(k.expand(ids.shape[0], -1, -1, -1), v.expand(ids.shape[0], -1, -1, -1), layer)
            n = adapter.config.num_virtual_tokens
            mask = torch.ones(ids.shape[0], n + ids.shape[1], dtype=torch.long)
            return base(input_ids=ids, attention_mask=mask, cache=cache).logits
        return base(input_ids=ids).logits


def test_hook_types_are_registered_and_listed(toy_plugins):
    assert toy_plugins.get_input_adapter_type("toy_prompt").adapter_class is ToyPrompt
    assert toy_plugins.input_adapter_type_for_peft_type("toy_prefix").name == "toy_prefix"
    assert toy_plugins.input_adapter_type_for_peft_type("LORA") is None
    info = next(i for i in toy_plugins.list_plugins() if i.name == __name__)
    assert info.provides == {"input_adapter_types": ("toy_prompt", "toy_prefix")}
    with pytest.raises(UnknownPluginError, match="toy_prompt"):
        toy_plugins.get_input_adapter_type("toy_promt")


def test_mixed_batch_equals_each_row_on_the_plain_base(model, tiny_base_dir):
    base = load_tiny_base(tiny_base_dir)
    ids = random_input_ids(6, 5, seed=4)
    names = ["p2", "p4", "x3", "lora", None, "p2b"]
    with torch.no_grad():
        got = model(ids, adapter_names=names).logits
        lora_alone = model(ids[3:4], adapter_names=["lora"]).logits
    assert got.shape == (6, 5, model.config.vocab_size)
    for i, name in enumerate(names):
        if name == "lora":
            torch.testing.assert_close(got[i:i + 1], lora_alone, **TOL)
            continue
        adapter = model.input_adapters.get(name) if name else None
        torch.testing.assert_close(got[i:i + 1], reference_logits(base, ids[i:i + 1], adapter), **TOL)
    # the adapters change the output (the check above is not vacuous)
    assert not torch.allclose(got[0], got[4], atol=1e-3) and not torch.allclose(got[2], got[4], atol=1e-3)


def test_user_left_padding_keeps_each_row_as_alone(model):
    ids = random_input_ids(3, 6, seed=5)
    padded = ids.clone()
    padded[0, :2] = 257
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    names = ["p4", "x3", None]
    with torch.no_grad():
        got = model(padded, attention_mask=mask, adapter_names=names).logits
        alone = model(ids[:1, 2:], adapter_names=["p4"]).logits
    torch.testing.assert_close(got[:1, 2:], alone, **TOL)


def test_generate_greedy_equals_each_row_alone_and_a_naive_loop(model, tiny_base_dir):
    base = load_tiny_base(tiny_base_dir)
    ids = random_input_ids(5, 4, seed=6)
    names = ["p2", "x3", "p4", "lora", None]
    with torch.no_grad():
        out = model.generate(ids, adapter_names=names, max_new_tokens=5, do_sample=False)
        assert out.shape == (5, 9)
        for i, name in enumerate(names):
            alone = model.generate(ids[i:i + 1], adapter_names=[name], max_new_tokens=5, do_sample=False)
            assert torch.equal(out[i:i + 1], alone), name
        for i in (0, 1):  # the reference: a greedy loop of full forwards on the plain base
            seq = ids[i:i + 1]
            for _ in range(5):
                nxt = reference_logits(base, seq, model.input_adapters.get(names[i]))[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
            assert torch.equal(out[i:i + 1], seq), names[i]


def test_generate_with_beams_and_max_length(model):
    ids = random_input_ids(3, 4, seed=7)
    names = ["p4", "x3", None]
    with torch.no_grad():
        out = model.generate(ids, adapter_names=names, max_length=8, num_beams=2, do_sample=False)
        assert out.shape[1] <= 8
        for i, name in enumerate(names):
            alone = model.generate(ids[i:i + 1], adapter_names=[name], max_length=8, num_beams=2, do_sample=False)
            assert torch.equal(out[i:i + 1, : alone.shape[1]], alone), name


def test_loss_counts_each_rows_real_tokens_as_alone(model, tiny_base_dir):
    base = load_tiny_base(tiny_base_dir)
    ids = random_input_ids(3, 5, seed=8)
    names = ["p2", "x3", None]
    loss = model(ids, adapter_names=names, labels=ids).loss
    terms = []
    for i, name in enumerate(names):
        adapter = model.input_adapters.get(name) if name else None
        if isinstance(adapter, ToyPrompt):  # the first token is predicted from the last virtual token
            virtual = adapter.prompt_embeddings[None]
            logits = base(inputs_embeds=torch.cat([virtual, base.get_input_embeddings()(ids[i:i + 1])], 1)).logits
            logits, targets = logits[0, 1:-1], ids[i]
        else:
            logits, targets = reference_logits(base, ids[i:i + 1], adapter)[0, :-1], ids[i, 1:]
        terms.append(torch.nn.functional.cross_entropy(logits.detach(), targets, reduction="none"))
    torch.testing.assert_close(loss.detach(), torch.cat(terms).mean(), **TOL)


def test_input_level_adapter_plus_lora_in_one_row(model, tiny_base_dir):
    ids = random_input_ids(2, 5, seed=9)
    with torch.no_grad():
        both = model(ids, adapter_weights=[{"p2": 3.0, "lora": 0.5}, None]).logits
        # reference: the prompt by hand as inputs_embeds, through moa with the LoRA row only
        embeds = torch.cat([model.input_adapters.get("p2").prompt_embeddings[None],
                            model.get_input_embeddings()(ids[:1])], 1)
        ref = model(inputs_embeds=embeds, adapter_weights=[{"lora": 0.5}]).logits[:, 2:]
        prompt_only = model(ids[:1], adapter_names=["p2"]).logits
    torch.testing.assert_close(both[:1], ref, **TOL)
    assert not torch.allclose(both[:1], prompt_only, atol=1e-3)


def test_mixture_of_same_length_prompts_is_their_type_mix(model, tiny_base_dir):
    base = load_tiny_base(tiny_base_dir)
    ids = random_input_ids(1, 5, seed=10)
    a, b = model.input_adapters.get("p2"), model.input_adapters.get("p2b")
    with torch.no_grad():
        got = model(ids, adapter_weights=[{"p2": 3.0, "p2b": 1.0}]).logits  # normalised: 0.75 / 0.25
        virtual = (0.75 * a.prompt_embeddings + 0.25 * b.prompt_embeddings)[None]
        ref = base(inputs_embeds=torch.cat([virtual, base.get_input_embeddings()(ids)], 1)).logits[:, 2:]
    torch.testing.assert_close(got, ref, **TOL)


def test_refused_mixtures_and_arguments(model):
    ids = random_input_ids(2, 4)
    with pytest.raises(RoutingError, match="different types"):
        model(ids, adapter_weights=[{"p2": 1.0, "x3": 1.0}, None])
    with pytest.raises(RoutingError, match="cannot be mixed"):  # ToyPrefix keeps the default mix()
        model.add_adapter("x3b", ToyPrefixConfig(num_virtual_tokens=3))
        model(ids, adapter_weights=[{"x3": 1.0, "x3b": 1.0}, None])
    with pytest.raises(RoutingError, match="finite non-negative"):
        model(ids, adapter_weights=[{"p2": -1.0}, None])
    model.set_router(moa.get_router("fixed")({"lora": 1.0}))
    with pytest.raises(RoutingError, match="router"):
        model(ids, adapter_names=["p2", "auto"])
    model.set_router(None)
    with pytest.raises(RoutingError, match="position_ids"):
        model(ids, adapter_names=["p2", None], position_ids=torch.arange(4)[None].expand(2, -1))


def test_names_set_adapter_disable_delete(model, tiny_base_dir):
    ids = random_input_ids(2, 4)
    assert model.adapter_names == ["lora", "p2", "p4", "p2b", "x3"]
    assert isinstance(model.peft_config["x3"], ToyPrefixConfig)
    with pytest.raises(AdapterExistsError):
        model.add_adapter("p2", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterExistsError):
        model.add_adapter("lora", ToyPromptConfig(num_virtual_tokens=2))
    with torch.no_grad():
        named = model(ids, adapter_names=["p4", "p4"]).logits
        model.set_adapter("p4")
        torch.testing.assert_close(model(ids).logits, named, **TOL)
        with model.disable_adapters():
            torch.testing.assert_close(model(ids).logits, load_tiny_base(tiny_base_dir)(ids).logits, **TOL)
        model.base_model(ids)  # a direct call: Linear-level adapters only, no error
        pinned = moa.RoutingDecision.from_mixtures([{"lora": 1.0}] * 2, model.bank.names)  # a trainer's decision
        torch.testing.assert_close(model(ids, routing_decision=pinned).logits,
                                   model(ids, adapter_names=["lora", "lora"]).logits, **TOL)
    model.delete_adapter("p4")
    assert "p4" not in model.adapter_names and model.active_adapters == []


def test_save_load_round_trip_and_training(model, tiny_base_dir, tmp_path):
    model.save_adapter("x3", tmp_path / "x3")
    saved = json.loads((tmp_path / "x3" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOY_PREFIX" and saved["num_virtual_tokens"] == 3
    other = make_tiny_model(tiny_base_dir)
    other.load_adapter(tmp_path / "x3", adapter_name="x3")
    ids = random_input_ids(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(other(ids, adapter_names=["x3", None]).logits,
                                   model(ids, adapter_names=["x3", None]).logits, rtol=0, atol=0)
    param = model.input_adapters.get("p2").prompt_embeddings
    optimizer = torch.optim.Adam([param], lr=0.05)
    losses = []
    for _ in range(6):
        loss = model(ids, adapter_names=["p2", "p2"], labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in model.base_model.parameters())


def test_non_finite_logits_of_an_input_level_row_raise(model):
    from moa.errors import NonFiniteOutputError

    ids = random_input_ids(2, 4)
    with torch.no_grad():
        model.input_adapters.get("p2").prompt_embeddings[0, 0] = float("nan")
        with pytest.raises(NonFiniteOutputError, match=r"row\(s\) \[0\]"):
            model(ids, adapter_names=["p2", None])
        out = model(ids, adapter_names=["p2", None], check_finite=False).logits
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
