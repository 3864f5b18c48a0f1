"""Adapter SFT: answer-only labels, the loss goes down, checkpointing, saving (DDP: test_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moa
from moa.data.chat import chat_prompt, encode_sft_example, pad_batch
from moa.train.sft import (
    METRICS_NAME,
    SFTConfig,
    add_training_adapter,
    layer_target_regex,
    set_gradient_checkpointing,
    train_adapter,
)
from tests.train.helpers import load_tiny, toy_examples


def test_labels_mask_the_prompt_and_keep_the_answer_and_end_of_turn(tiny_chat_model):
    tok = tiny_chat_model.tokenizer
    ids, labels = encode_sft_example(tok, "abc what", "xyz")
    prompt_ids = tok(chat_prompt(tok, "abc what"), add_special_tokens=False)["input_ids"]
    answer_ids = tok("xyz" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + answer_ids
    assert labels == [-100] * len(prompt_ids) + answer_ids
    assert labels[-1] == tok.eos_token_id
    short_ids, short_labels = encode_sft_example(tok, "abc what", "xyz", max_length=len(answer_ids) + 2)
    assert short_labels[-len(answer_ids):] == answer_ids and len(short_ids) == len(answer_ids) + 2


def test_pad_batch_pads_labels_with_ignore_index():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0, labels=[[-100, 6, 7], [8]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_layer_regex_targets_only_layers_from_first_layer(tiny_chat_model):
    add_training_adapter(tiny_chat_model, "late", rank=2, first_layer=2)  # of the tiny base's layers 0..3
    names = set(tiny_chat_model.adapter_layers("late"))
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in names} == {2, 3} and len(names) == 2 * 7
    assert layer_target_regex(12, 10) == r"model\.layers\.(10|11)\.(self_attn|mlp)\." \
        r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def test_a_few_steps_reduce_the_loss_and_only_the_adapter_changes(tiny_chat_model, tmp_path):
    model = tiny_chat_model
    add_training_adapter(model, "other", rank=2, seed=5)
    add_training_adapter(model, "toy", rank=4, dropout=0.0)
    frozen_before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "adapters.toy" not in k}
    examples = [e for e in toy_examples(6) if e.domain == "alpha"]
    result = train_adapter(model, "toy", examples, SFTConfig(steps=25, batch_size=4, lr=1e-2, warmup_steps=2,
                                                            dev_limit=4), dev_examples=examples,
                           output_dir=tmp_path / "toy", progress=False)
    m = result.metrics
    # the frozen random lm_head caps how confident the tiny model can get (loss floor ~4.4)
    assert sum(m["loss_curve"][-5:]) / 5 < m["first_loss"] - 0.5
    assert 0.0 <= m["dev_accuracy"] <= 1.0 and m["dev_examples"] == 4
    for k, v in model.base_model.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), k
    saved = json.loads((tmp_path / "toy" / METRICS_NAME).read_text())
    assert saved["steps"] == 25 and saved["final_loss"] == pytest.approx(m["final_loss"])
    tensors = load_file(tmp_path / "toy" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert all(p.dtype == torch.float32 for p in model.adapter_layers("toy")["model.layers.0.mlp.up_proj"].parameters())
    fresh = load_tiny(Path(model.config._name_or_path))
    fresh.load_adapter(tmp_path / "toy", adapter_name="toy")
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(ids, adapter_names=["toy", "toy"]).logits
        b = fresh(ids, adapter_names=["toy", "toy"]).logits
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)  # fp16 on disk


def _adapter_grads(model, batch, checkpointing: bool) -> list[torch.Tensor]:
    if checkpointing:
        set_gradient_checkpointing(model, True)
    model.train()
    for p in model.parameters():
        p.grad = None
    out = model(**batch, adapter_weights=[{"a": 0.6, "b": 0.4}, {"b": 1.0}, {"a": 1.0}], use_cache=False)
    out.loss.backward()
    grads = [p.grad.clone() for name in ("a", "b") for layer in model.adapter_layers(name).values()
             for p in layer.parameters()]
    if checkpointing:
        set_gradient_checkpointing(model, False)
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(tiny_chat_model):
    model = tiny_chat_model
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        model.add_adapter(name, moa.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False))
    for name in ("a", "b"):
        for layer in model.adapter_layers(name).values():
            layer.requires_grad_(True)
    examples = toy_examples(2)[:3]
    enc = [encode_sft_example(model.tokenizer, e.prompt, e.answer) for e in examples]
    batch = pad_batch([x[0] for x in enc], model.tokenizer.pad_token_id, labels=[x[1] for x in enc])
    plain = _adapter_grads(model, batch, checkpointing=False)
    recomputed = _adapter_grads(model, batch, checkpointing=True)
    assert any(g.abs().sum() > 0 for g in plain)
    for g1, g2 in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
