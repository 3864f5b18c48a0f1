"""The VeRA adapter type passes moa's adapter-type contract, plus VeRA-specific behaviour."""

from __future__ import annotations

import pytest
import torch

from moa.errors import AdapterConfigError, AdapterShapeError
from moa.testing import AdapterTypeContract, require_plugin

moa_vera = require_plugin("moa-vera", "moa_vera")
VERA_KWARGS = {"r": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}


class TestVeraContract(AdapterTypeContract):
    adapter_type = "vera"
    config_kwargs = VERA_KWARGS
    bad_config_kwargs = (
        {"target_modules": []},
        {"target_modules": ["no_such_module"]},
        {"r": 0},
        {"r": "16"},
        {"projection_prng_key": "seed"},
        {"projection_prng_key": 2**64},
        {"save_projection": "yes"},
        {"vera_dropout": 1.0},
        {"d_initial": float("nan")},
        {"fan_in_fan_out": True},
        {"bias": "all"},
        {"modules_to_save": ["lm_head"]},
        {"layers_to_transform": [0]},
        {"layers_pattern": "layers"},
    )


class TestVeraBatchedContract(TestVeraContract):
    """The same contract with VeRA rows on the batched low-rank kernels (``VeraLayer.batched = True``)."""

    @pytest.fixture(autouse=True)
    def batched(self, monkeypatch):
        monkeypatch.setattr(moa_vera.VeraLayer, "batched", True)


def test_layers_have_peft_shapes_start_as_identity_and_share_one_projection(moa_tiny_model):
    moa_tiny_model.add_adapter("a", moa_vera.VeraConfig(**VERA_KWARGS))
    layers = moa_tiny_model.adapter_layers("a")
    q_proj, v_proj = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.v_proj"]
    down = layers["model.layers.0.mlp.down_proj"]
    assert tuple(q_proj.vera_lambda_d.shape) == (16,) and tuple(v_proj.vera_lambda_b.shape) == (32,)
    assert tuple(down.vera_lambda_b.shape) == (64,)
    assert all(bool((layer.vera_lambda_b == 0).all()) for layer in layers.values())
    assert all(bool((layer.vera_lambda_d == 0.1).all()) for layer in layers.values())
    assert len({id(layer.projection) for layer in layers.values()}) == 1
    assert q_proj.projection.dims == (128, 64)  # PEFT's largest in (down_proj) and out widths
    # only the vectors are parameters: the projection is frozen and shared
    assert sorted(name for name, _ in down.named_parameters()) == ["vera_lambda_b", "vera_lambda_d"]


def test_low_rank_factors_are_the_scaled_projection_slices(moa_tiny_model, monkeypatch):
    monkeypatch.setattr(moa_vera.VeraLayer, "batched", True)
    moa_tiny_model.add_adapter("a", moa_vera.VeraConfig(**VERA_KWARGS, init_weights=False))
    layer = moa_tiny_model.adapter_layers("a")["model.layers.1.self_attn.v_proj"]
    pair = layer.projection.pair()
    with torch.no_grad():
        a, b, scale = layer.low_rank()
        torch.testing.assert_close(a, layer.vera_lambda_d[:, None] * pair.vera_a[:, :64], rtol=0, atol=0)
        torch.testing.assert_close(b, layer.vera_lambda_b[:, None] * pair.vera_b[:32, :], rtol=0, atol=0)
        assert scale == 1.0
        again = layer.low_rank()
        assert again[0] is a and again[1] is b  # kept while the vectors are unchanged
        layer.vera_lambda_d.mul_(2)
        changed = layer.low_rank()
        assert changed[0] is not a  # a changed vector makes new factors
        torch.testing.assert_close(changed[0], 2 * a)
    tracked = layer.low_rank()  # a trainable adapter under autograd: fresh factors in the graph
    assert tracked[0].requires_grad and tracked[0] is not changed[0]
    x = torch.randn(5, 64)
    with torch.no_grad():
        a, b, _ = layer.low_rank()
        torch.testing.assert_close(layer.delta(x, None), (x @ a.T) @ b.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.delta_weight(), b @ a, rtol=1e-5, atol=1e-6)


def test_identical_projections_are_held_once_across_adapters(moa_tiny_model):
    for name, key in (("a", 0), ("b", 0), ("c", 1)):
        moa_tiny_model.add_adapter(name, moa_vera.VeraConfig(**VERA_KWARGS, projection_prng_key=key))
    pairs = {name: next(iter(moa_tiny_model.adapter_layers(name).values())).projection.pair() for name in "abc"}
    assert pairs["a"] is pairs["b"]
    assert pairs["a"] is not pairs["c"] and not torch.equal(pairs["a"].vera_a, pairs["c"].vera_a)


def test_changing_a_vector_changes_the_next_forward(moa_tiny_model, moa_tiny_base_dir, vera_path):
    import moa
    from moa.testing import load_tiny_base, random_input_ids

    moa_tiny_model.add_adapter("a", moa_vera.VeraConfig(**VERA_KWARGS, init_weights=False))
    moa_tiny_model.eval()
    ids = random_input_ids(2, 5)
    with torch.no_grad():
        before = moa_tiny_model(ids, adapter_names=["a", "a"]).logits
        for layer in moa_tiny_model.adapter_layers("a").values():
            layer.vera_lambda_b.mul_(-1.5)
        after = moa_tiny_model(ids, adapter_names=["a", "a"]).logits
        fresh = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
        fresh.add_adapter("a", moa_vera.VeraConfig(**VERA_KWARGS))
        for name, layer in fresh.adapter_layers("a").items():
            layer.load_state_dict(moa_tiny_model.adapter_layers("a")[name].state_dict())
        expected = fresh(ids, adapter_names=["a", "a"]).logits
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)  # nothing stale


def test_generic_is_the_default_and_gives_the_batched_paths_logits(moa_tiny_model, monkeypatch):
    from moa.testing import random_input_ids

    moa_tiny_model.add_adapter("generic", moa_vera.VeraConfig(**VERA_KWARGS, init_weights=False))
    assert all(layer.low_rank() is None for layer in moa_tiny_model.adapter_layers("generic").values())
    monkeypatch.setattr(moa_vera.VeraLayer, "batched", True)
    moa_tiny_model.add_adapter("batched", moa_vera.VeraConfig(**VERA_KWARGS))
    with torch.no_grad():
        for name, layer in moa_tiny_model.adapter_layers("batched").items():
            layer.load_state_dict(moa_tiny_model.adapter_layers("generic")[name].state_dict())
            assert layer.low_rank() is not None
    ids = random_input_ids(3, 6)
    with torch.no_grad():
        got = moa_tiny_model(ids, adapter_names=["generic", "batched", "generic"]).logits
        want = moa_tiny_model(ids, adapter_names=["batched", "batched", "batched"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_configs_and_mismatched_layers_say_what_to_do():
    with pytest.raises(AdapterConfigError, match="fan_in_fan_out"):
        moa_vera.VeraConfig(fan_in_fan_out=True).validate()
    with pytest.raises(AdapterConfigError, match="bias"):
        moa_vera.VeraConfig(bias="vera_only").validate()
    config = moa_vera.VeraConfig(r=4, target_modules=["q_proj"])
    moa_vera.VeraLayer(config, "m.q_proj", 8, 8)
    moa_vera.VeraProjection.of(config).fix()
    with pytest.raises(AdapterShapeError, match="fixed at 8 and 8"):
        moa_vera.VeraLayer(config, "m.up_proj", 8, 16)
