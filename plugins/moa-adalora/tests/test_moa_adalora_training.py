"""An AdaLoRA adapter trained by moa (Trainer + the type's training extension) prunes to PEFT's ranks.

The reference is PEFT's own AdaLoRA model trained on the same data, in the same order, with
the same optimizer and learning-rate schedule, from the same initial weights, calling
``AdaLoraModel.update_and_allocate`` after each optimizer step (PEFT's documented use) and
adding its orthogonality regulariser in its forward.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import TrainerCallback

import moa
from moa.data.chat import encode_sft_example, pad_batch
from moa.errors import AdapterConfigError
from moa.testing import load_tiny_base, make_tiny_model, random_input_ids, require_plugin
from moa.train.sft import SFTConfig, lr_lambda, train_adapter
from moa.train.trainer import MixtureTrainer, OrderedDataset, training_arguments, unrolled_order

moa_adalora = require_plugin("moa-adalora", "moa_adalora")
peft = pytest.importorskip("peft")

STEPS = 30
#: prune from 4 to 2 ranks per module on average: warm-up 4 steps, allocation every 2 steps, last 6 fixed
SCHEDULE = dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_r=4, target_r=2, tinit=4,
                tfinal=6, deltaT=2, total_step=STEPS, lora_alpha=8, orth_reg_weight=0.5)
SFT = SFTConfig(steps=STEPS, batch_size=4, lr=5e-3, warmup_steps=2, dev_limit=0, save_dtype="float32",
                logging_steps=100)


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def toy_examples(n: int = 8, seed: int = 0) -> list[Example]:
    """Letter prompts answered with 'x' + their first letter, digit prompts with 'y' + their first digit."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        letters = "".join(chr(97 + int(c)) for c in torch.randint(0, 20, (5,), generator=g))
        digits = "".join(str(int(c)) for c in torch.randint(0, 10, (5,), generator=g))
        out += [Example(f"{letters} what", f"x{letters[0]}"), Example(f"{digits} compute", f"y{digits[0]}")]
    return out


class PeftAllocation(TrainerCallback):
    """PEFT's documented loop: ``update_and_allocate(global_step)`` after each optimizer step."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.peft_model.base_model.update_and_allocate(state.global_step)


def train_peft(peft_model, tokenizer, examples, folder):
    """``train_adapter``'s run, by hand, on PEFT's model: same tokens, order, arguments and schedule."""
    encoded = [encode_sft_example(tokenizer, e.prompt, e.answer, SFT.max_length) for e in examples]
    items = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
    order = unrolled_order(len(items), SFT.steps * SFT.batch_size, SFT.seed)
    args = training_arguments(folder, steps=SFT.steps, batch_size=SFT.batch_size, lr=SFT.lr, seed=SFT.seed,
                              max_grad_norm=SFT.max_grad_norm, logging_steps=SFT.logging_steps, progress=False)

    def collate(rows):
        return pad_batch([r["input_ids"] for r in rows], tokenizer.pad_token_id, labels=[r["labels"] for r in rows])

    trainer = MixtureTrainer(model=peft_model, args=args, train_dataset=OrderedDataset(items, order),
                             data_collator=collate, lr_lambda=lr_lambda(SFT), callbacks=[PeftAllocation(peft_model)])
    trainer.train()
    return trainer.step_losses


def test_trained_ranks_equal_peft_allocator_and_saved_folder_loads_in_peft(moa_tiny_model, moa_tiny_base_dir,
                                                                          tmp_path):
    examples = toy_examples()
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir),
                                     peft.AdaLoraConfig(task_type="CAUSAL_LM", **SCHEDULE))
    model = moa_tiny_model
    model.add_adapter("ada", moa_adalora.AdaLoraConfig(**SCHEDULE))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():  # the same initial weights
        for name, layer in model.adapter_layers("ada").items():
            for suffix in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, suffix).copy_(params[f"base_model.model.{name}.{suffix}.default"])

    result = train_adapter(model, "ada", examples, SFT, output_dir=tmp_path / "moa", progress=False)
    peft_losses = train_peft(peft_model, model.tokenizer, examples, tmp_path / "peft-run")

    expected = {k.removesuffix(".default"): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    got = model.peft_config["ada"].rank_pattern
    assert got == expected
    ranks = {key: sum(mask) for key, mask in got.items()}
    assert sum(ranks.values()) == SCHEDULE["target_r"] * len(ranks)  # the final budget
    assert min(ranks.values()) == 0 and max(ranks.values()) == SCHEDULE["init_r"], ranks  # really reallocated
    # the same run, not just the same ranks: losses (moa rounds them to 5 digits) and weights
    assert result.metrics["loss_curve"] == pytest.approx(peft_losses, abs=2e-5)
    for name, layer in model.adapter_layers("ada").items():
        for suffix in ("lora_A", "lora_B", "lora_E"):
            reference = params[f"base_model.model.{name}.{suffix}.default"].detach()
            torch.testing.assert_close(getattr(layer, suffix).detach(), reference, rtol=1e-4, atol=1e-5)

    saved = json.loads((tmp_path / "moa" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == expected
    reloaded = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "moa").eval()
    peft_model.eval()
    input_ids = random_input_ids(3, 9)
    with torch.no_grad():
        moa_logits = model(input_ids, adapter_names=["ada"] * 3).logits
        torch.testing.assert_close(reloaded(input_ids).logits, moa_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_model(input_ids).logits, moa_logits, rtol=1e-5, atol=1e-5)
        base = model(input_ids, adapter_names=[None] * 3).logits
    assert (moa_logits - base).abs().max() > 1e-3
    again = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    again.load_adapter(tmp_path / "moa", adapter_name="ada")
    assert {n: layer.rank for n, layer in again.adapter_layers("ada").items()} == {
        key.removesuffix(".lora_E"): rank for key, rank in ranks.items()}


def test_allocator_settings_it_cannot_run_are_refused_before_training(moa_tiny_model):
    model = moa_tiny_model
    model.add_adapter("flat", moa_adalora.AdaLoraConfig(**{**SCHEDULE, "target_r": 4}))
    with pytest.raises(AdapterConfigError, match="target_r must be below init_r"):
        train_adapter(model, "flat", toy_examples(2), dataclasses.replace(SFT, steps=2), progress=False)
    model.add_adapter("beta", moa_adalora.AdaLoraConfig(**{**SCHEDULE, "beta1": 1.0}))
    with pytest.raises(AdapterConfigError, match="0 < beta1 < 1"):
        train_adapter(model, "beta", toy_examples(2), dataclasses.replace(SFT, steps=2), progress=False)


def test_a_pruned_adapter_keeps_its_ranks_when_trained_further(moa_tiny_model, tmp_path):
    pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, False]}
    model = moa_tiny_model
    model.add_adapter("pruned", moa_adalora.AdaLoraConfig(**SCHEDULE, rank_pattern=pattern))
    before = {n: layer.rank for n, layer in model.adapter_layers("pruned").items()}
    result = train_adapter(model, "pruned", toy_examples(2), dataclasses.replace(SFT, steps=3),
                           output_dir=tmp_path / "p", progress=False)
    assert result.metrics["steps"] == 3
    assert model.peft_config["pruned"].rank_pattern == pattern
    assert {n: layer.rank for n, layer in model.adapter_layers("pruned").items()} == before
    assert before["model.layers.0.self_attn.q_proj"] == 1


def test_train_adapter_finds_the_allocator_through_moas_extension_point(moa_tiny_model):
    from moa.train.extensions import adapter_training_extension
    from moa_adalora.training import RankAllocationCallback

    model = moa_tiny_model
    model.add_adapter("ada", moa_adalora.AdaLoraConfig(**SCHEDULE))
    model.add_adapter("lora", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    args = training_arguments(".", steps=STEPS, batch_size=1, lr=1e-3, seed=0, progress=False)
    extension = adapter_training_extension(model, "ada", args)
    assert [type(c) for c in extension.callbacks] == [RankAllocationCallback]
    penalty = extension.loss_term()
    assert penalty.requires_grad and float(penalty.detach()) > 0
    assert adapter_training_extension(model, "lora", args).callbacks == ()
    assert adapter_training_extension(model, "lora", args).loss_term is None


def test_resuming_after_the_final_allocation_ends_on_the_same_ranks(moa_tiny_base_dir, tmp_path):
    schedule = {**SCHEDULE, "tinit": 1, "tfinal": 3, "total_step": 8}
    sft = dataclasses.replace(SFT, steps=8, save_steps=6)
    runs = {}
    for name, resume in (("straight", False), ("resumed", True)):
        model = make_tiny_model(moa_tiny_base_dir)
        torch.manual_seed(0)
        model.add_adapter("ada", moa_adalora.AdaLoraConfig(**schedule))
        folder = tmp_path / "ckpt"
        if resume:  # a fresh process picking the run up at step 6, past the final allocation at step 5
            for extra in sorted(folder.glob("checkpoint-*")):
                if extra.name != "checkpoint-6":
                    shutil.rmtree(extra)
        result = train_adapter(model, "ada", toy_examples(4), sft, checkpoint_dir=folder, resume=resume,
                               progress=False)
        assert result.metrics["resumed_from"] == (str(folder / "checkpoint-6") if resume else None)
        runs[name] = model
    straight, resumed = (runs[k] for k in ("straight", "resumed"))
    assert resumed.peft_config["ada"].rank_pattern == straight.peft_config["ada"].rank_pattern
    for name, layer in straight.adapter_layers("ada").items():
        other = resumed.adapter_layers("ada")[name]
        assert other.rank_mask == layer.rank_mask
        torch.testing.assert_close(other.lora_E.detach(), layer.lora_E.detach(), rtol=1e-5, atol=1e-6)


def test_training_again_keeps_the_chosen_ranks_and_saves_consistently(moa_tiny_model, moa_tiny_base_dir, tmp_path):
    model = moa_tiny_model
    torch.manual_seed(0)
    model.add_adapter("ada", moa_adalora.AdaLoraConfig(**{**SCHEDULE, "tinit": 1, "tfinal": 3, "total_step": 8}))
    train_adapter(model, "ada", toy_examples(4), dataclasses.replace(SFT, steps=8), progress=False)
    pattern = json.loads(json.dumps(model.peft_config["ada"].rank_pattern))
    train_adapter(model, "ada", toy_examples(4, seed=1), dataclasses.replace(SFT, steps=3), output_dir=tmp_path / "a",
                  progress=False)
    assert model.peft_config["ada"].rank_pattern == pattern
    for name, layer in model.adapter_layers("ada").items():
        pruned = ~torch.tensor(pattern[f"{name}.lora_E"])
        assert bool((layer.lora_E.detach()[pruned] == 0).all()), name  # not revived by the optimizer
    reloaded = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "a").eval()
    input_ids = random_input_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids, adapter_names=["ada"] * 2).logits,
                                   rtol=1e-5, atol=1e-5)
