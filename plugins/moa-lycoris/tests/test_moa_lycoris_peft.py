"""LoHa and LoKr folders move between real PEFT and moa with the same logits, unmerged and merged."""

from __future__ import annotations

import json

import pytest
import torch

import moa
from moa.testing import load_tiny_base, random_input_ids, require_plugin, save_tiny_base

moa_lycoris = require_plugin("moa-lycoris", "moa_lycoris")
peft = pytest.importorskip("peft")

ATOL = 1e-5
ALL_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: name -> (PEFT config class, its kwargs). init_weights=False: the adapters are not the identity.
PEFT_CASES = {
    "loha": ("LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "loha-patterns": ("LoHaConfig", dict(r=4, alpha=8, target_modules="all-linear",
                                         rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                         alpha_pattern={"up_proj": 3})),
    "lokr": ("LoKrConfig", dict(r=8, alpha=4, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])),
    "lokr-decompose-both": ("LoKrConfig", dict(r=2, alpha=4, decompose_both=True,
                                               target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])),
    "lokr-rank-pattern": ("LoKrConfig", dict(r=8, alpha=4, target_modules="all-linear", decompose_factor=4,
                                             rank_pattern={"k_proj": 1, "down_proj": 2},
                                             alpha_pattern={"q_proj": 16})),
}


@pytest.fixture(scope="module")
def wide_base_dir(tmp_path_factory):
    """A tiny base twice as wide: its 128x128 and 256x128 layers take the factored forms."""
    return save_tiny_base(tmp_path_factory.mktemp("wide-base"), hidden_size=128, intermediate_size=256)


def make_peft(base_dir, out_dir, case, seed=0, base=None):
    """A PEFT model of ``case`` with random (non-identity) weights, saved to ``out_dir``."""
    class_name, kwargs = PEFT_CASES[case]
    torch.manual_seed(seed)
    config = getattr(peft, class_name)(init_weights=False, **kwargs)
    base = load_tiny_base(base_dir) if base is None else base
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


def logits(model, input_ids, **routing):
    with torch.no_grad():
        return model(input_ids, **routing).logits


@pytest.mark.parametrize("base", ["tiny", "wide"])
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_made_adapter_loads_in_moa_with_peft_s_logits(case, base, moa_tiny_base_dir, wide_base_dir, tmp_path):
    base_dir = moa_tiny_base_dir if base == "tiny" else wide_base_dir
    peft_model = make_peft(base_dir, tmp_path / "peft", case)
    input_ids = random_input_ids(3, 8)
    expected = logits(peft_model, input_ids)
    model = moa.MixtureModel(load_tiny_base(base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="x")
    config_class = moa_lycoris.LoHaConfig if case.startswith("loha") else moa_lycoris.LoKrConfig
    assert type(model.peft_config["x"]) is config_class
    got = logits(model, input_ids, adapter_names=["x"] * 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert (got - logits(model, input_ids, adapter_names=[None] * 3)).abs().max() > 1e-3


def test_rank_pattern_and_decompose_both_shape_the_loaded_layers(moa_tiny_base_dir, tmp_path):
    make_peft(moa_tiny_base_dir, tmp_path / "peft", "lokr-rank-pattern")
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="x")
    layers = model.adapter_layers("x")
    k_proj, down = layers["model.layers.0.self_attn.k_proj"], layers["model.layers.0.mlp.down_proj"]
    q_proj = layers["model.layers.0.self_attn.q_proj"]
    assert (k_proj.rank, k_proj.tensor_names) == (1, ("lokr_w1", "lokr_w2_a", "lokr_w2_b"))
    assert (down.rank, down.scale, down.in_split) == (2, 2.0, (4, 32))
    assert (q_proj.rank, q_proj.scale) == (8, 2.0)


@pytest.mark.parametrize(
    "config",
    [
        lambda: moa_lycoris.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"],
                                       rank_pattern={"up_proj": 3}, init_weights=False),
        lambda: moa_lycoris.LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules="all-linear",
                                       rank_pattern={"down_proj": 16}, init_weights=False),
        lambda: moa_lycoris.LoKrConfig(r=8, alpha=4, decompose_factor=2, target_modules=["v_proj", "o_proj"],
                                       init_weights=False, module_dropout=0.1, rank_dropout=0.2),
    ],
    ids=["loha", "lokr-decompose-both", "lokr-factor-dropout"],
)
def test_moa_saved_adapter_loads_in_peft_with_the_same_logits(config, moa_tiny_model, moa_tiny_base_dir, tmp_path):
    torch.manual_seed(2)
    made = config()
    moa_tiny_model.add_adapter("m", made)
    moa_tiny_model.save_adapter("m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert saved["peft_type"] == made.peft_type and saved["r"] == made.r and saved["alpha"] == made.alpha
    assert saved["rank_pattern"] == made.rank_pattern
    peft_model = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "m").eval()
    peft_config = peft_model.peft_config["default"]
    assert type(peft_config).__name__ == type(made).__name__
    assert (peft_config.rank_dropout, peft_config.module_dropout) == (made.rank_dropout, made.module_dropout)
    input_ids = random_input_ids(4, 6)
    got = logits(moa_tiny_model, input_ids, adapter_names=["m"] * 4)
    torch.testing.assert_close(got, logits(peft_model, input_ids), rtol=0, atol=ATOL)
    assert (got - logits(moa_tiny_model, input_ids, adapter_names=[None] * 4)).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["loha-patterns", "lokr-decompose-both", "lokr-rank-pattern"])
def test_merge_and_unload_equals_peft_s(case, moa_tiny_base_dir, tmp_path):
    peft_model = make_peft(moa_tiny_base_dir, tmp_path / "peft", case)
    input_ids = random_input_ids(2, 7)
    expected_model = peft_model.merge_and_unload()
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="x")
    merged = model.merge_and_unload(progress=False)
    assert type(merged) is type(expected_model)
    expected_state, state = expected_model.state_dict(), merged.state_dict()
    assert sorted(state) == sorted(expected_state)
    for key, tensor in expected_state.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=ATOL, msg=key)
    torch.testing.assert_close(logits(merged, input_ids), logits(expected_model, input_ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["loha", "lokr-decompose-both"])
def test_training_with_dropout_matches_peft_draw_for_draw(case, moa_tiny_base_dir, tmp_path):
    """Same seed, same random draws in the same order: PEFT's training-mode logits, dropout included."""
    class_name, kwargs = PEFT_CASES[case]
    torch.manual_seed(0)
    config = getattr(peft, class_name)(init_weights=False, rank_dropout=0.3, module_dropout=0.2, **kwargs)
    peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), config)
    peft_model.save_pretrained(tmp_path / "peft")
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="x", is_trainable=True)
    peft_model.train()
    model.train()
    input_ids = random_input_ids(2, 6)
    outputs = []
    for seed in (11, 12, 13):
        torch.manual_seed(seed)
        expected = logits(peft_model, input_ids)
        torch.manual_seed(seed)
        got = logits(model, input_ids, adapter_names=["x", "x"])
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1])  # the draws really changed the output


@pytest.mark.parametrize("case", ["loha-patterns", "lokr-decompose-both"])
def test_on_an_nf4_base_equals_peft_on_the_dequantized_base(case, moa_tiny_base_dir, tmp_path):
    """The change never reads the base weight, so an NF4 base just works; the reference is PEFT on
    a dense copy holding the NF4 weights dequantized."""
    bnb = pytest.importorskip("bitsandbytes")
    from moa.model.base_loading import load_base

    nf4 = load_base(str(moa_tiny_base_dir), quantization="nf4", device="cpu")[0]
    dense = load_tiny_base(moa_tiny_base_dir)
    quantized = {name: m for name, m in nf4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 28
    with torch.no_grad():
        for name, module in quantized.items():
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense.get_submodule(name).weight.copy_(weight)
    peft_model = make_peft(moa_tiny_base_dir, tmp_path / "peft", case, base=dense)
    input_ids = random_input_ids(2, 6)
    model = moa.MixtureModel(nf4)
    model.load_adapter(tmp_path / "peft", adapter_name="x")
    got = logits(model, input_ids, adapter_names=["x", "x"])
    torch.testing.assert_close(got, logits(peft_model, input_ids), rtol=0, atol=1e-4)
