"""VeRA's grouped form: adapters sharing a projection are computed with one shrink and one expand.

The model holds three VeRA adapters on one projection (``a1``-``a3``), one with the same seed
but other widths (``a4``: a projection of its own), two on a second projection (``b1``, ``b2``),
a LoRA adapter and base rows. References: the per-adapter path (``VeraLayer.grouped_delta``
removed, so moa calls ``delta`` per adapter), each row alone, a float64 formula from the raw
matrices, and PEFT.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import moa
from moa.adapters.base import GroupedRows
from moa.testing import load_tiny_base, random_input_ids, require_plugin

moa_vera = require_plugin("moa-vera", "moa_vera")
import moa_vera.grouped  # noqa: E402 - after the skip above

SHARED = dict(r=16, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
Q_PROJ = "model.layers.1.self_attn.q_proj"
ROWS = [{"a1": 1.0}, {"a2": 1.0}, {"a3": 1.0}, {"a4": 1.0}, {"b1": 1.0}, {"b2": 1.0}, {"lora": 1.0}, None,
        {"a1": 0.5, "a2": 0.5}, {"a1": 0.3, "b1": 0.7}, {"a2": 1.0, "a3": 0.2, "lora": 0.5},
        {"b1": 0.5, "b2": 0.5}, {"a4": 1.0, "a1": 1.0}]


@pytest.fixture
def model(moa_tiny_model):
    torch.manual_seed(0)
    model = moa_tiny_model
    for name in ("a1", "a2", "a3"):
        model.add_adapter(name, moa_vera.VeraConfig(**SHARED))
    model.add_adapter("a4", moa_vera.VeraConfig(r=16, target_modules=["q_proj", "v_proj"], init_weights=False))
    for name in ("b1", "b2"):
        model.add_adapter(name, moa_vera.VeraConfig(r=8, target_modules=["q_proj", "up_proj"], projection_prng_key=5,
                                                    init_weights=False))
    model.add_adapter("lora", moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                             init_lora_weights=False))
    model.eval()
    return model


@pytest.fixture
def shrinks(monkeypatch):
    """Sizes of the groups that took the shared shrink, one entry per call."""
    sizes: list[int] = []
    original = moa_vera.grouped.shared_shrink

    def counted(x, rows, group):
        sizes.append(len(group))
        return original(x, rows, group)

    monkeypatch.setattr(moa_vera.grouped, "shared_shrink", counted)
    return sizes


def per_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the grouped hook: moa calls ``delta`` once per adapter (the reference path)."""
    monkeypatch.delattr(moa_vera.VeraLayer, "grouped_delta")


def logits(model, input_ids, **routing) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **routing).logits


def test_adapters_group_by_shared_projection(model):
    layers = tuple(model.adapter_layers(name)[Q_PROJ] for name in ("a1", "a2", "a3", "a4", "b1", "b2"))
    assert moa_vera.grouped.group_by_projection(layers) == [[0, 1, 2], [3], [4, 5]]


def test_grouped_delta_equals_delta_per_adapter_and_a_float64_formula(model):
    names = ("a1", "b1", "a4", "a2", "b2", "a3")  # groups interleaved in pair order
    layers = tuple(model.adapter_layers(name)[Q_PROJ] for name in names)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    rows_of = [[0, 3, 3, 9], [1], [2, 5], [4, 0, 7], [8], [6, 6, 2]]  # repeats: a token mixing adapters
    offsets = [0]
    for rows in rows_of:
        offsets.append(offsets[-1] + len(rows))
    grouped_rows = GroupedRows(layers, torch.tensor([r for rows in rows_of for r in rows]), tuple(offsets))
    with torch.no_grad():
        got = moa_vera.VeraLayer.grouped_delta(x, grouped_rows, None)
        expected = torch.cat([layer.delta(x[rows], None) for layer, rows in zip(layers, rows_of, strict=True)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for layer, rows, (start, end) in zip(layers, rows_of, zip(offsets, offsets[1:]), strict=True):
        pair = layer.projection.pair()
        a, b = pair.vera_a[:, :64].double(), pair.vera_b[:64].double()
        lambda_d, lambda_b = layer.vera_lambda_d.detach().double(), layer.vera_lambda_b.detach().double()
        formula = lambda_b * ((lambda_d * (x[rows].double() @ a.T)) @ b.T)
        torch.testing.assert_close(got[start:end].double(), formula, rtol=0, atol=1e-5)


def test_mixed_batch_forward_equals_the_per_adapter_path_and_each_row_alone(model, shrinks, monkeypatch):
    input_ids = random_input_ids(len(ROWS), 6)
    grouped = logits(model, input_ids, adapter_weights=ROWS)
    assert shrinks and set(shrinks) == {2, 3}  # the a-group (3 on q_proj/v_proj/down_proj) and the b-group (2)
    base = logits(model, input_ids, adapter_weights=[None] * len(ROWS))
    for i, row in enumerate(ROWS):
        assert torch.allclose(grouped[i], base[i], atol=1e-6) == (row is None)
    per_adapter(monkeypatch)
    shrinks.clear()
    torch.testing.assert_close(grouped, logits(model, input_ids, adapter_weights=ROWS), rtol=0, atol=1e-5)
    for i, row in enumerate(ROWS):
        alone = logits(model, input_ids[i : i + 1], adapter_weights=[row])
        torch.testing.assert_close(grouped[i : i + 1], alone, rtol=0, atol=1e-5)
    assert shrinks == []


def test_mixed_batch_greedy_generate_equals_each_row_alone(model, shrinks, monkeypatch):
    names = ["a1", "b1", "a2", "lora", None, "b2", "a3", "a4"]
    input_ids = random_input_ids(len(names), 5, seed=3)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        grouped = model.generate(input_ids, adapter_names=names, **settings)
        assert shrinks
        per_adapter(monkeypatch)
        alone = [model.generate(input_ids[i : i + 1], adapter_names=[name], **settings)
                 for i, name in enumerate(names)]
    for i, row in enumerate(alone):  # a row alone stops at <eos>; in the batch it is padded after it
        length = row.shape[1]
        assert torch.equal(grouped[i : i + 1, :length], row), (names[i], grouped[i].tolist(), row[0].tolist())
        assert (grouped[i, length:] == 257).all()


def test_training_gradients_equal_the_per_adapter_path_and_dropout_declines(model, shrinks, monkeypatch):
    input_ids = random_input_ids(len(ROWS), 5, seed=4)
    vera = ("a1", "a2", "a3", "a4", "b1", "b2")
    model.train()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids, adapter_weights=ROWS, labels=input_ids).loss.backward()
        return {f"{name}:{module}:{param}": tensor.grad.clone() for name in vera
                for module, layer in model.adapter_layers(name).items()
                for param, tensor in layer.named_parameters()}

    grouped = grads()
    assert shrinks
    per_adapter(monkeypatch)
    reference = grads()
    assert grouped.keys() == reference.keys()
    for key, grad in reference.items():
        torch.testing.assert_close(grouped[key], grad, rtol=1e-4, atol=1e-6, msg=key)

    layer = model.adapter_layers("a1")[Q_PROJ]
    layers = (layer, model.adapter_layers("a2")[Q_PROJ])
    rows = GroupedRows(layers, torch.tensor([0, 1]), (0, 1, 2))
    monkeypatch.setattr(layer, "dropout", 0.1)
    assert moa_vera.grouped.grouped_vera_delta(torch.randn(2, 64), rows, None) is None  # a mask per adapter


def test_peft_adapters_sharing_a_projection_give_peft_s_logits_in_one_batch(moa_tiny_base_dir, tmp_path, shrinks):
    peft = pytest.importorskip("peft")
    settings = {"p1": dict(projection_prng_key=7), "p2": dict(projection_prng_key=7),
                "p3": dict(projection_prng_key=7), "q": dict(projection_prng_key=9)}
    input_ids = random_input_ids(4, 6, seed=5)
    expected = {}
    for seed, (name, extra) in enumerate(settings.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), peft.VeraConfig(
                r=16, target_modules=["q_proj", "v_proj", "down_proj"], **extra)).eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "vera_lambda" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator))
        peft_model.save_pretrained(tmp_path / name)
        expected[name] = logits(peft_model, input_ids)
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    for name in settings:
        model.load_adapter(tmp_path / name, adapter_name=name)
    names = ["p1", "q", "p2", "p3"]
    got = logits(model, input_ids, adapter_names=names)
    assert set(shrinks) == {3}  # p1-p3 share the projection read from their files; q is alone
    for i, name in enumerate(names):
        torch.testing.assert_close(got[i], expected[name][i], rtol=1e-5, atol=1e-5)
