"""docs/training.md's TRL recipe: one adapter of a MixtureModel trained by TRL's SFTTrainer, others frozen."""

from __future__ import annotations

import peft
import pytest
import torch

from moa.data.chat import encode_sft_example
from moa.testing.fixtures import load_tiny_base
from moa.train.sft import add_training_adapter
from moa.train.trainer import TRAINABLE_NAME
from moa.train.trl_compat import MixtureSFTTrainer, prepare_for_trl, route_fused_head_inside
from tests.train.helpers import add_random_adapters, load_tiny, toy_examples

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _dataset(tokenizer):
    """Pre-tokenized with moa's chat formatting (the tiny tokenizer has no chat template; see the doc for
    the prompt/completion form a real base takes): completion_mask = loss on the answer only."""
    rows = []
    for e in toy_examples(8):
        ids, labels = encode_sft_example(tokenizer, e.prompt, e.answer)
        rows.append({"input_ids": ids, "completion_mask": [int(label != -100) for label in labels]})
    return datasets.Dataset.from_list(rows)


def _config(out, **extra):
    # bf16=False: TRL defaults to bf16 autocast (on CPU too), and accelerate leaves the autocast wrapper on
    # the model's forward after training; these tests compare fp32 logits
    return trl.SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, bf16=False, **extra)


def _setup(tiny_base_dir):
    model = load_tiny(tiny_base_dir)
    add_random_adapters(model)  # "alpha" and "beta": loaded, must stay frozen
    add_training_adapter(model, "mine", rank=4, first_layer=0, dropout=0.0)
    trainable, total = prepare_for_trl(model, "mine")
    assert 0 < trainable < total and model.active_adapter == "mine"
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters.mine." not in k}
    mine = {k: v.clone() for k, v in model.state_dict().items() if ".adapters.mine." in k}
    return model, frozen, mine


def _check_only_mine_changed(model, frozen, mine):
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # base and the other adapters
    assert any(not torch.equal(state[k], v) for k, v in mine.items())


def test_trl_sft_trainer_trains_and_saves_one_adapter(tiny_base_dir, tmp_path):
    model, frozen, mine = _setup(tiny_base_dir)
    trainer = MixtureSFTTrainer(model=model, adapter_name="mine", args=_config(tmp_path / "run", save_steps=2),
                                train_dataset=_dataset(model.tokenizer), processing_class=model.tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    _check_only_mine_changed(model, frozen, mine)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert {"adapter_model.safetensors", "adapter_config.json", TRAINABLE_NAME, "optimizer.pt"} <= \
        {p.name for p in checkpoint.iterdir()}

    model.save_adapter("mine", tmp_path / "mine")
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids, adapter_names=["mine", "mine"]).logits
        theirs = peft.PeftModel.from_pretrained(load_tiny_base(tiny_base_dir), tmp_path / "mine").eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_plain_sft_trainer_with_the_fused_head_moved_inside(tiny_base_dir, tmp_path):
    """An unchanged TRL script: SFTTrainer itself, plus one line after building it."""
    model, frozen, mine = _setup(tiny_base_dir)
    trainer = trl.SFTTrainer(model=model, args=_config(tmp_path / "run", save_strategy="no"),
                             train_dataset=_dataset(model.tokenizer), processing_class=model.tokenizer)
    assert "forward" in vars(model)  # TRL patched the MixtureModel: its fused head would skip the routing
    route_fused_head_inside(trainer.model)
    assert "forward" not in vars(model) and "forward" in vars(model.get_base_model())
    trainer.train()
    _check_only_mine_changed(model, frozen, mine)
