"""Teacher-forced exact match against greedy generation, and the oracle switch's routing."""

from __future__ import annotations

import dataclasses

import torch

from moa.data.chat import chat_prompt
from moa.eval.teacher_forced import (
    correct_positions,
    explicit_rows,
    make_batch,
    oracle_switch,
    position_owners,
    teacher_forced_exact,
    token_owners,
)
from tests.train.helpers import TOY_DOMAINS, ToyExample, add_random_adapters


def greedy_answer(model, prompt: str, adapter: str, new_tokens: int = 4) -> list[int]:
    ids = model.tokenizer(chat_prompt(model.tokenizer, prompt), add_special_tokens=False, return_tensors="pt")
    out = model.generate(ids["input_ids"], attention_mask=ids["attention_mask"], adapter_names=[adapter],
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_argmax_check_agrees_with_greedy_generation(tiny_chat_model):
    """The reference is generate(): its own tokens pass the check, a changed token fails it there."""
    model = tiny_chat_model
    add_random_adapters(model)
    prompt = "abc what"
    gold = greedy_answer(model, prompt, "alpha")
    prompt_ids = model.tokenizer(chat_prompt(model.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    wrong = list(gold)
    wrong[2] = (wrong[2] + 1) % model.config.vocab_size
    rows = [prompt_ids + gold, prompt_ids + wrong]
    labels = torch.tensor([[-100] * len(prompt_ids) + r[len(prompt_ids):] for r in rows])
    with torch.no_grad():
        logits = model(torch.tensor(rows), adapter_names=["alpha", "alpha"]).logits
    exact, hit = correct_positions(logits, labels)
    assert exact.tolist() == [True, False]
    first_miss = int((~hit[1]).nonzero()[0])
    assert first_miss == len(prompt_ids) + 1  # the position that predicts the changed token


def test_token_owners_follow_the_segments(tiny_chat_model):
    tokenizer = tiny_chat_model.tokenizer
    owners = token_owners(tokenizer, "ab12", [["ab", "alpha"], ["12", "beta"]])
    pieces = tokenizer("ab12" + (tokenizer.eos_token or ""), add_special_tokens=False, return_offsets_mapping=True)
    for owner, (start, _end) in zip(owners, pieces["offset_mapping"]):
        assert owner == ("alpha" if start < 2 else "beta")
    assert owners[-1] == "beta"  # the end-of-turn token belongs to the last segment


def test_oracle_switch_with_one_owner_equals_that_adapter(tiny_chat_model):
    model = tiny_chat_model
    add_random_adapters(model)
    example = ToyExample("t-0", "slots", "abc what", "xyz1", meta={"segments": [["xyz1", "beta"]]})
    batch = make_batch(model.tokenizer, [example])
    with torch.no_grad():
        oracle = model(batch.input_ids, attention_mask=batch.attention_mask, **oracle_switch()(model, batch)).logits
        single = model(batch.input_ids, attention_mask=batch.attention_mask, adapter_names=["beta"]).logits
    assert torch.allclose(oracle, single, atol=1e-5)


def two_segment_batch(model, first_owner: str):
    """Random adapters on ``model``, and a batch of one answer: ``xy`` by ``first_owner``, ``12`` by beta."""
    add_random_adapters(model)
    example = ToyExample("t-1", "slots", "abc what", "xy12",
                         meta={"segments": [["xy", first_owner], ["12", "beta"]]})
    return example, make_batch(model.tokenizer, [example])


def assert_switches_at(model, batch, decision, switch: int, first_route: str | None) -> None:
    """Causality gives an independent reference: positions before ``switch`` saw only the first route."""
    with torch.no_grad():
        routed = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       routing_decision=decision).logits
        first = model(batch.input_ids, attention_mask=batch.attention_mask, adapter_names=[first_route]).logits
    assert torch.allclose(routed[0, :switch], first[0, :switch], atol=1e-5)
    assert not torch.allclose(routed[0, switch:], first[0, switch:], atol=1e-3)


def test_oracle_switch_runs_base_owned_segments_without_adapters(tiny_chat_model):
    """A segment owned by ``__base__`` runs the bare base there, and the owner's adapter after."""
    model = tiny_chat_model
    _, batch = two_segment_batch(model, first_owner="__base__")
    decision = oracle_switch()(model, batch)["routing_decision"]
    owners = position_owners(batch.items[0], batch.input_ids.shape[1])
    names = list(model.adapter_names)
    assert decision.ids[:, 0].tolist() == [names.index(o) if o == "beta" else -1 for o in owners]
    assert decision.weights[:, 0].tolist() == [1.0 if o == "beta" else 0.0 for o in owners]
    assert_switches_at(model, batch, decision, owners.index("beta"), first_route=None)


def test_oracle_switch_routes_each_position_by_the_token_it_predicts(tiny_chat_model):
    model = tiny_chat_model
    example, batch = two_segment_batch(model, first_owner="alpha")
    item = batch.items[0]
    width = batch.input_ids.shape[1]
    owners = position_owners(item, width)
    assert owners[: item.prompt_length] == [item.owners[0]] * item.prompt_length
    answer = slice(item.prompt_length - 1, item.prompt_length - 1 + len(item.owners))
    assert owners[answer] == item.owners  # position p predicts token p + 1
    decision = oracle_switch()(model, batch)["routing_decision"]
    names = list(model.adapter_names)
    assert [names[i] for i in decision.ids[:, 0].tolist()] == owners
    assert_switches_at(model, batch, decision, owners.index("beta"), first_route="alpha")
    assert teacher_forced_exact(model, [example], oracle_switch()) == teacher_forced_exact(
        model, [example], lambda m, b: {"routing_decision": decision})


def test_mixture_rows_go_through_adapter_weights(tiny_chat_model):
    model = tiny_chat_model
    add_random_adapters(model)
    example = ToyExample("t-2", "slots", "abc what", "xa")
    batch = make_batch(model.tokenizer, [example])
    mix = {TOY_DOMAINS[0]: 0.25, TOY_DOMAINS[1]: 0.75}
    with torch.no_grad():
        via_plan = model(batch.input_ids, attention_mask=batch.attention_mask, **explicit_rows(mix)(model, batch)).logits
        direct = model(batch.input_ids, attention_mask=batch.attention_mask, adapter_weights=[mix]).logits
    assert torch.equal(via_plan, direct)
    assert dataclasses.is_dataclass(batch.items[0])


def test_teacher_forced_loss_is_the_token_weighted_mean_of_each_items_lm_loss(tiny_chat_model):
    from moa.eval.teacher_forced import make_batch, teacher_forced_loss

    model = tiny_chat_model
    add_random_adapters(model)
    examples = [ToyExample(f"x{i}", "toy", f"abc{i} what", answer) for i, answer in enumerate(["xy12", "q", "hello"])]
    plan = explicit_rows(TOY_DOMAINS[0])
    total = count = 0.0
    for example in examples:  # the reference: transformers' own loss, one item at a time
        batch = make_batch(model.tokenizer, [example])
        with torch.no_grad():
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                         adapter_names=[TOY_DOMAINS[0]]).loss
        tokens = int((batch.labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * tokens, count + tokens
    assert abs(teacher_forced_loss(model, examples, plan, batch_size=2) - total / count) < 1e-4
