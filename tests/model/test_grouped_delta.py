"""``AdapterLayer.grouped_delta``: one call per module for all the generic adapters of a class.

A test-sized type, ``gated_shift``: each module adds ``tanh(sum(x)) * shift`` to a row, with a
per-module ``shift [H_out]``. Its ``delta`` does one adapter; its ``grouped_delta`` does every
pair of every adapter at once (stacked shifts gathered per pair), and records each call.
``plain_shift`` is the same math with ``delta`` only. The reference for every check is the
per-adapter path: the same model with the hook removed (``delta`` per adapter), and each
row run alone.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import pytest
import torch
from torch import nn

import moa
from moa.adapters.base import GroupedRows
from moa.errors import AdapterShapeError
from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec
from moa.testing import fresh_plugin_manager, random_input_ids

#: (module name, number of adapters, number of pairs) of every grouped_delta call.
CALLS: list[tuple[str, int, int]] = []


@dataclasses.dataclass
class GatedShiftConfig(moa.AdapterConfig):
    adapter_type: ClassVar[str] = "gated_shift"
    peft_type: ClassVar[str] = "GATED_SHIFT"


@dataclasses.dataclass
class PlainShiftConfig(moa.AdapterConfig):
    adapter_type: ClassVar[str] = "plain_shift"
    peft_type: ClassVar[str] = "PLAIN_SHIFT"


class PlainShiftLayer(moa.AdapterLayer):
    peft_suffixes: ClassVar[tuple[str, ...]] = ("shift",)

    def __init__(self, config, module_name, in_features, out_features):
        super().__init__(config, module_name, in_features, out_features)
        self.shift = nn.Parameter(torch.zeros(out_features))

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return torch.tanh(x.sum(-1, keepdim=True)) * self.shift


class GatedShiftLayer(PlainShiftLayer):
    @classmethod
    def grouped_delta(cls, x: torch.Tensor, rows: GroupedRows, base_layer: nn.Module) -> torch.Tensor | None:
        assert all(type(layer) is cls for layer in rows.layers)
        assert len(rows.offsets) == len(rows.layers) + 1 and rows.token_index.shape == (rows.num_pairs,)
        CALLS.append((rows.layers[0].module_name, len(rows.layers), rows.num_pairs))
        owner = torch.cat([torch.full((end - start,), i) for i, (start, end) in
                           enumerate(rows.span(i) for i in range(len(rows.layers)))])
        shifts = torch.stack([layer.shift for layer in rows.layers])[owner]
        return torch.tanh(x[rows.token_index].sum(-1, keepdim=True)) * shifts


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    return [AdapterTypeSpec(name="gated_shift", config_class=GatedShiftConfig, layer_class=GatedShiftLayer,
                            peft_type="GATED_SHIFT"),
            AdapterTypeSpec(name="plain_shift", config_class=PlainShiftConfig, layer_class=PlainShiftLayer,
                            peft_type="PLAIN_SHIFT")]


@pytest.fixture
def model(tiny_model):
    """g1, g2 (q_proj, o_proj) and g3 (o_proj) grouped; p (o_proj) per adapter; a LoRA on q_proj."""
    with fresh_plugin_manager([sys.modules[__name__]]):
        torch.manual_seed(0)
        for name, targets in (("g1", ["q_proj", "o_proj"]), ("g2", ["q_proj", "o_proj"]), ("g3", ["o_proj"])):
            tiny_model.add_adapter(name, GatedShiftConfig(target_modules=targets))
        tiny_model.add_adapter("p", PlainShiftConfig(target_modules=["o_proj"]))
        tiny_model.add_adapter("lora", moa.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        with torch.no_grad():
            for name in ("g1", "g2", "g3", "p"):
                for layer in tiny_model.adapter_layers(name).values():
                    layer.shift.normal_()
        tiny_model.eval()
        CALLS.clear()
        yield tiny_model


def per_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the hook: moa then calls ``delta`` per adapter (the reference path)."""
    monkeypatch.delattr(GatedShiftLayer, "grouped_delta")


def run(model: moa.MixtureModel, ids: torch.Tensor, **routing) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **routing).logits


ROWS = [{"g1": 1.0}, {"g1": 0.5, "g2": 0.5}, None, {"lora": 0.7, "g2": 0.3}, {"g3": 1.0, "p": 0.4},
        {"g1": 0.25, "g3": 0.75, "g2": 1.0}, {"p": 1.0}, {"g2": 1.0}]


def test_hook_is_called_once_per_module_and_forward_and_equals_the_per_adapter_path(model, monkeypatch):
    ids = random_input_ids(len(ROWS), 5)
    grouped = run(model, ids, adapter_weights=ROWS)
    modules = {name for name, _, _ in CALLS}
    assert len(CALLS) == len(modules) == 8  # q_proj and o_proj of the 4 layers, once each
    seq = ids.shape[1]
    for name, adapters, pairs in CALLS:  # g1, g2 (+ g3 on o_proj); a pair per routed row's token
        if name.endswith("q_proj"):
            assert (adapters, pairs) == (2, 7 * seq)  # g1 in 3 rows, g2 in 4 (see ROWS)
        else:
            assert (adapters, pairs) == (3, 9 * seq)  # and g3 in 2
    base = run(model, ids, adapter_weights=[None] * len(ROWS))
    for i, row in enumerate(ROWS):  # every adapter acts; the row without adapters is the base's
        assert torch.allclose(grouped[i], base[i], atol=1e-6) == (row is None)

    per_adapter(monkeypatch)
    CALLS.clear()
    reference = run(model, ids, adapter_weights=ROWS)
    assert CALLS == []
    torch.testing.assert_close(grouped, reference, rtol=0, atol=1e-5)
    for i, row in enumerate(ROWS):
        alone = run(model, ids[i : i + 1], adapter_weights=[row])
        torch.testing.assert_close(grouped[i : i + 1], alone, rtol=0, atol=1e-5)


def test_named_rows_and_decode_steps_use_the_hook(model, monkeypatch):
    ids = random_input_ids(4, 5, seed=2)
    names = ["g1", None, "g2", "g1"]
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        grouped = model.generate(ids, adapter_names=names, **settings)
    assert CALLS and all(adapters == 2 for _, adapters, _ in CALLS)
    assert any(pairs == 3 for _, _, pairs in CALLS)  # a decode step: one token for each of the 3 rows
    per_adapter(monkeypatch)
    with torch.no_grad():
        reference = model.generate(ids, adapter_names=names, **settings)
    assert torch.equal(grouped, reference)


def test_gradients_equal_the_per_adapter_path(model, monkeypatch):
    ids = random_input_ids(len(ROWS), 5, seed=3)
    model.train()

    def grads() -> dict[str, torch.Tensor]:
        for name in ("g1", "g2", "g3", "p"):
            for layer in model.adapter_layers(name).values():
                layer.shift.grad = None
        model(ids, adapter_weights=ROWS, labels=ids).loss.backward()
        return {f"{name}:{module}": layer.shift.grad.clone() for name in ("g1", "g2", "g3", "p")
                for module, layer in model.adapter_layers(name).items()}

    grouped = grads()
    assert CALLS
    per_adapter(monkeypatch)
    reference = grads()
    assert grouped.keys() == reference.keys()
    for key, grad in reference.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(grouped[key], grad, rtol=1e-5, atol=1e-6, msg=key)


def test_a_hook_may_decline_and_moa_calls_delta_per_adapter(model, monkeypatch):
    ids = random_input_ids(len(ROWS), 5)
    per_adapter(monkeypatch)
    reference = run(model, ids, adapter_weights=ROWS)
    declined: list[int] = []

    def decline(cls, x, rows, base_layer):
        declined.append(len(rows.layers))
        return None

    monkeypatch.setattr(GatedShiftLayer, "grouped_delta", classmethod(decline), raising=False)
    torch.testing.assert_close(run(model, ids, adapter_weights=ROWS), reference, rtol=0, atol=0)
    assert len(declined) == 8


def test_a_result_of_the_wrong_shape_is_refused(model, monkeypatch):
    def one_row_short(cls, x, rows, base_layer):
        return torch.zeros(rows.num_pairs - 1, rows.layers[0].out_features)

    monkeypatch.setattr(GatedShiftLayer, "grouped_delta", classmethod(one_row_short))
    with pytest.raises(AdapterShapeError, match=r"GatedShiftLayer\.grouped_delta returned shape"):
        run(model, random_input_ids(2, 3), adapter_names=["g1", "g2"])
