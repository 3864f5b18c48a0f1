"""LoHa, LoKr, LoRA and base rows share one batch; mixtures are weighted sums of weight changes."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.testing import load_tiny_base, random_input_ids, require_plugin

moa_lycoris = require_plugin("moa-lycoris", "moa_lycoris")

ATOL = 1e-5


@pytest.fixture
def four_kinds(moa_tiny_model):
    """The tiny model with a LoHa, a LoKr (decompose_both) and a LoRA adapter, all random."""
    model = moa_tiny_model
    torch.manual_seed(0)
    model.add_adapter("loha", moa_lycoris.LoHaConfig(r=4, alpha=8, target_modules="all-linear", init_weights=False))
    model.add_adapter("lokr", moa_lycoris.LoKrConfig(r=2, alpha=4, decompose_both=True, init_weights=False,
                                                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    model.add_adapter("lora", moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                             init_lora_weights=False))
    return model


def test_one_forward_with_loha_lokr_lora_and_base_rows_equals_each_row_alone(four_kinds):
    model = four_kinds
    input_ids = random_input_ids(5, 9)
    names = ["loha", "lokr", "lora", None, "lokr"]
    mixtures = [{"loha": 1.0}, {"lokr": 0.6, "loha": 0.4}, {"lora": 0.5, "lokr": 0.5}, None,
                {"loha": 0.2, "lokr": 0.3, "lora": 0.5}]
    with torch.no_grad():
        for key, rows in (("adapter_names", names), ("adapter_weights", mixtures)):
            batched = model(input_ids, **{key: rows}).logits
            for i, row in enumerate(rows):
                alone = model(input_ids[i : i + 1], **{key: [row]}).logits
                torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=ATOL)
        base = model(input_ids, adapter_names=[None] * 5).logits
        outputs = model(input_ids, adapter_names=names).logits
    for i, name in enumerate(names):  # each adapter really acts, the base row does not move
        assert torch.allclose(outputs[i], base[i], atol=1e-6) == (name is None)


def test_greedy_generate_of_a_mixed_batch_equals_each_row_alone(four_kinds):
    model = four_kinds
    prompt = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(7))
    rows = ["loha", "lokr", "lora", None]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(prompt, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        alone = model.generate(prompt[i : i + 1], adapter_names=[name], **kw)
        assert torch.equal(together[i : i + 1], alone), f"row {i} ({name})"
    with torch.no_grad():  # and the same first step as the logits of one forward (1e-5)
        first = model(prompt, adapter_names=rows).logits[:, -1]
    assert torch.equal(together[:, 5], first.argmax(-1))


def naive_loha_delta(tensors: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """``((w1a w1b) ⊙ (w2a w2b)) * scale`` from saved tensors, one output row at a time, in float64."""
    w1a, w1b, w2a, w2b = (tensors[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    rows = [(w1a[o] @ w1b) * (w2a[o] @ w2b) for o in range(w1a.shape[0])]
    return torch.stack(rows) * scale


def test_weighted_loha_mixture_is_the_weighted_sum_of_weight_changes(moa_tiny_model, moa_tiny_base_dir, tmp_path):
    """Reference: a plain transformers model whose weights get ``0.3 ΔW_a + 0.7 ΔW_b`` computed naively."""
    from safetensors.torch import load_file

    model = moa_tiny_model
    torch.manual_seed(1)
    configs = {"a": moa_lycoris.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False),
               "b": moa_lycoris.LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"], init_weights=False)}
    weights = {"a": 0.3, "b": 0.7}
    reference = load_tiny_base(moa_tiny_base_dir)
    params = dict(reference.named_parameters())
    for name, config in configs.items():
        model.add_adapter(name, config)
        model.save_adapter(name, tmp_path / name)
        saved = load_file(tmp_path / name / "adapter_model.safetensors")
        modules = sorted({key.rsplit(".", 1)[0] for key in saved})
        assert len(modules) == 8
        for module in modules:
            tensors = {key.rsplit(".", 1)[1]: t for key, t in saved.items() if key.startswith(module + ".")}
            weight = params[module.removeprefix("base_model.model.") + ".weight"]
            with torch.no_grad():
                weight += (weights[name] * naive_loha_delta(tensors, config.alpha / config.r)).float()
    input_ids = random_input_ids(3, 7)
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = model(input_ids, adapter_weights=[weights] * 3).logits
        one = model(input_ids, adapter_weights=[{"a": 1.0}] * 3).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert (got - one).abs().max() > 1e-3
    model.merge_into_base(weights, progress=False)  # a merge folds in the same sum
    with torch.no_grad():
        merged = model(input_ids, adapter_names=[None] * 3).logits
    torch.testing.assert_close(merged, expected, rtol=0, atol=ATOL)


def test_merging_into_a_new_lora_adapter_is_refused_with_the_way_out(four_kinds):
    """``merge_adapters`` builds LoRA factors, which LoHa/LoKr do not have; folding into the base works."""
    from moa.merge.strategies import MergeError

    with pytest.raises(MergeError, match="not low rank"):
        moa.merge_adapters(four_kinds, ["loha", "lora"], weights=[0.5, 0.5], strategy="linear", new_name="both")
    assert "both" not in four_kinds.adapter_names
