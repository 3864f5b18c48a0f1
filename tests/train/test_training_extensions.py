"""An adapter type's training extension (callbacks, a loss term) reaches train_adapter's Trainer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import TrainerCallback

import moa
from moa.errors import AdapterConfigError
from moa.train.extensions import TrainingExtension, adapter_training_extension
from moa.train.sft import SFTConfig, train_adapter
from tests.train.helpers import toy_examples

PENALTY = 0.25


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@dataclasses.dataclass
class ExtendedLoraConfig(moa.LoraConfig):
    """LoRA whose training adds a constant to the loss and counts optimizer steps."""

    def training_extension(self, *, model, adapter_name, args):
        self.counter = CountSteps()
        return TrainingExtension(callbacks=[self.counter], loss_term=lambda: torch.tensor(PENALTY))


def run(model, name, config, accumulation):
    torch.manual_seed(0)
    model.add_adapter(name, config)
    sft = SFTConfig(steps=3, batch_size=2, gradient_accumulation_steps=accumulation, lr=1e-2, warmup_steps=1,
                    dev_limit=0)
    return train_adapter(model, name, toy_examples(2), sft, progress=False).metrics["loss_curve"]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_loss_term_counts_once_per_step_and_callbacks_run(tiny_chat_model, accumulation):
    plain = run(tiny_chat_model, "plain", moa.LoraConfig(r=2, target_modules=["q_proj"]), accumulation)
    config = ExtendedLoraConfig(r=2, target_modules=["q_proj"])
    extended = run(tiny_chat_model, "extended", config, accumulation)
    # a constant term has no gradient: the same run, each step's loss higher by exactly the term
    assert extended == pytest.approx([loss + PENALTY for loss in plain], abs=1e-5)
    assert config.counter.steps == [0, 1, 2]


def test_types_without_the_method_get_nothing_and_a_wrong_return_is_refused(tiny_chat_model):
    tiny_chat_model.add_adapter("plain", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    assert adapter_training_extension(tiny_chat_model, "plain", None) == TrainingExtension()

    @dataclasses.dataclass
    class Broken(moa.LoraConfig):
        def training_extension(self, *, model, adapter_name, args):
            return [CountSteps()]

    tiny_chat_model.add_adapter("broken", Broken(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterConfigError, match="must return"):
        adapter_training_extension(tiny_chat_model, "broken", None)
