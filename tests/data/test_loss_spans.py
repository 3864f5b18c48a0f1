"""The SFT loss mask over parts of the answer (``meta["loss_spans"]``): labels, errors, and the Trainer path."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import moa
from moa.data.chat import encode_sft_example
from moa.testing.fixtures import make_tiny_tokenizer
from moa.train.sft import SFTConfig, add_training_adapter, encode_training_example, loss_span_mask, train_adapter


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    answer: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()  # one token per byte: offsets are character positions here


def test_without_spans_the_whole_answer_is_trained(tok):
    plain = Pair("what", "ab\ncd")
    assert encode_training_example(tok, plain) == encode_sft_example(tok, "what", "ab\ncd")
    assert encode_training_example(tok, Pair("what", "ab", {"other": 1})) == encode_sft_example(tok, "what", "ab")


def test_a_masked_prefix_gets_label_minus_100_and_the_owned_segment_keeps_its_ids(tok):
    example = Pair("what", "12 = 12\ndouze", {"loss_spans": [[7, 13]]})  # "\ndouze" is owned, "12 = 12" is not
    ids, labels = encode_training_example(tok, example)
    full_ids, full_labels = encode_sft_example(tok, "what", "12 = 12\ndouze")
    assert ids == full_ids
    answer = len(ids) - 14  # 13 answer bytes + <eos>
    assert labels[:answer] == full_labels[:answer]  # the prompt: -100 as before
    assert labels[answer:answer + 7] == [-100] * 7  # the foreign prefix "12 = 12"
    assert labels[answer + 7:] == full_labels[answer + 7:]  # "\ndouze" and <eos>
    assert tok.decode(labels[answer + 7:-1]) == "\ndouze" and labels[-1] == tok.eos_token_id


def test_a_segment_in_the_middle_does_not_train_the_end_token(tok):
    example = Pair("q", 'f("ab")', {"loss_spans": [[3, 5]]})
    _, labels = encode_training_example(tok, example)
    kept = [label for label in labels if label != -100]
    assert tok.decode(kept) == "ab" and tok.eos_token_id not in kept
    assert loss_span_mask(tok, 'f("ab")', [[0, 3], [5, 7]]) == [True] * 3 + [False] * 2 + [True] * 3


def test_spans_are_checked(tok):
    with pytest.raises(ValueError, match="non-empty range"):
        loss_span_mask(tok, "abc", [[2, 9]])
    with pytest.raises(ValueError, match="non-empty range"):
        loss_span_mask(tok, "abc", [[2, 2]])


def test_a_span_inside_one_token_trains_nothing_and_is_refused():
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(moa.default_base_path())
    assert len(real("SELECT", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ValueError, match="cover no token"):
        loss_span_mask(real, "SELECT", [[2, 4]])


def test_train_adapter_optimises_only_the_owned_tokens(tiny_base_dir):
    """The first step's loss (adapter still the identity) is the base's loss over the owned tokens only."""
    model = moa.MixtureModel.from_pretrained(str(tiny_base_dir), quantization=None, device="cpu")
    examples = [Pair("abc what", "x = 12\ndouze", {"loss_spans": [[6, 12]]}),
                Pair("def what", "y = 3\ntrois", {"loss_spans": [[5, 11]]})]
    add_training_adapter(model, "fr", rank=2, dropout=0.0)
    tok = model.tokenizer
    encoded = [encode_training_example(tok, e) for e in examples]
    assert all(sum(label != -100 for label in labels) == 7 for _, labels in encoded)  # 6 characters + <eos>

    def base_loss(rows: list[tuple[list[int], list[int]]]) -> float:
        total = count = 0.0
        with torch.no_grad():
            for ids, labels in rows:
                logits = model(torch.tensor([ids]), adapter_names=["fr"]).logits[0, :-1]
                target = torch.tensor(labels[1:])
                total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
        return total / count

    masked = base_loss(encoded)
    unmasked = base_loss([encode_sft_example(tok, e.prompt, e.answer) for e in examples])
    assert abs(masked - unmasked) > 1e-3  # the prefix tokens would change the loss
    result = train_adapter(model, "fr", examples, SFTConfig(steps=1, batch_size=2, lr=1e-3, warmup_steps=1,
                                                           dev_limit=0, logging_steps=1), progress=False)
    assert result.metrics["first_loss"] == pytest.approx(masked, rel=1e-4)
