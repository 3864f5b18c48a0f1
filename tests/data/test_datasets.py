"""The committed splits: sizes, no leakage between splits, held-out phrasings, the API."""

from __future__ import annotations

import json
import random

import pytest

from moa.data import (
    COMPOSITE,
    DOMAINS,
    HELD_OUT_PHRASINGS,
    PHRASINGS,
    SPLITS,
    Example,
    UnknownDatasetError,
    load_composite,
    load_split,
)
from moa.data import arithmetic
from moa.data import code as code_domain
from moa.errors import MoaError


@pytest.mark.parametrize("domain", DOMAINS)
def test_split_sizes(domain):
    sizes = {split: len(load_split(domain, split)) for split in SPLITS}
    assert sizes["test"] >= 200
    assert 90 <= sizes["dev"] <= 120
    assert 1500 <= sizes["train"] <= 3000


@pytest.mark.parametrize("domain", DOMAINS)
def test_examples_are_well_formed(domain):
    seen_ids = set()
    for split in SPLITS:
        for ex in load_split(domain, split):
            assert ex.domain == domain and ex.split == split
            assert ex.prompt and ex.answer and ex.id not in seen_ids
            assert 0 <= ex.phrasing < len(PHRASINGS[domain])
            seen_ids.add(ex.id)


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_prompt_in_two_splits(domain):
    prompts = {split: {ex.prompt for ex in load_split(domain, split)} for split in SPLITS}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["dev"]
    assert not prompts["dev"] & prompts["test"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_held_out_phrasings_only_in_test(domain):
    held = set(HELD_OUT_PHRASINGS[domain])
    assert 3 <= len(PHRASINGS[domain]) <= 5 and held
    for split in ("train", "dev"):
        assert not {ex.phrasing for ex in load_split(domain, split)} & held
    test = load_split(domain, "test")
    assert sum(ex.phrasing in held for ex in test) >= 40
    assert {ex.phrasing for ex in test} == set(range(len(PHRASINGS[domain])))


def test_sql_test_slot_values_never_in_train():
    def values(split):
        return {(ex.meta["slot"], tuple(ex.meta["slot_value"])) for ex in load_split("sql", split)}

    train = values("train")
    assert not train & values("test")
    assert not train & values("dev")
    assert len({slot for slot, _ in values("test")}) == 8


def test_code_held_out_combinations_never_in_train():
    def combos(split):
        return {ex.meta["combination"] for ex in load_split("code", split)}

    train, test = combos("train"), combos("test")
    assert not train & test and not train & combos("dev")
    assert len(test) == len(code_domain.condition_pairs())
    # every part of a held-out combination was seen in training
    train_ops = {c.split("|")[0] for c in train}
    train_pairs = {c.split("|")[1] for c in train}
    for combo in test:
        op, pair = combo.split("|")
        assert op in train_ops and pair in train_pairs


def test_code_tasks_have_two_conditions():
    for ex in load_split("code", "test"):
        assert len(ex.meta["conditions"]) == 2 and len(ex.meta["tests"]) >= 5


def test_icd_split_by_category_and_balanced():
    cats = {split: {ex.meta["category"] for ex in load_split("icd", split)} for split in SPLITS}
    assert not cats["train"] & cats["test"] and not cats["train"] & cats["dev"]
    per_chapter: dict[str, int] = {}
    for ex in load_split("icd", "test"):
        per_chapter[ex.answer] = per_chapter.get(ex.answer, 0) + 1
    assert len(per_chapter) == 21 and set(per_chapter.values()) == {10}


def test_french_and_arithmetic_values_split():
    for domain, key in (("french", lambda ex: (ex.meta["kind"], ex.meta["value"])),
                        ("arithmetic", lambda ex: ex.meta["expression"])):
        train = {key(ex) for ex in load_split(domain, "train")}
        assert not train & {key(ex) for ex in load_split(domain, "test")}


def test_composite_set():
    items = load_composite()
    assert 30 <= len(items) <= 60
    for ex in items:
        assert ex.domain == COMPOSITE and ex.split == "test"
        assert len(ex.meta["combines"]) == 2 and set(ex.meta["combines"]) <= set(DOMAINS)
        assert ex.meta["score_as"] in DOMAINS


def test_example_json_round_trip():
    ex = load_split("code", "dev")[0]
    assert Example.from_json(ex.to_json()) == ex
    assert Example.from_json(ex.to_json_line()) == ex
    assert json.loads(json.dumps(ex.to_json())) == ex.to_json()
    with pytest.raises(MoaError):
        Example.from_json({"id": "x"})


def test_load_returns_fresh_lists():
    first = load_split("arithmetic", "dev")
    first.clear()
    assert len(load_split("arithmetic", "dev")) == 100


@pytest.mark.parametrize(("domain", "split", "named"), [("medical", "test", "sql"), ("sql", "validation", "dev")])
def test_unknown_names_list_the_choices(domain, split, named):
    with pytest.raises(UnknownDatasetError) as info:
        load_split(domain, split)
    assert isinstance(info.value, MoaError) and isinstance(info.value, KeyError)
    assert named in str(info.value) and repr(domain if domain == "medical" else split) in str(info.value)


def test_expression_between_keeps_the_range_and_never_repeats():
    rng, seen = random.Random(3), set()
    drawn = [arithmetic.expression_between(rng, 10, 40, seen) for _ in range(60)]
    texts = [arithmetic.render(terms, ops) for terms, ops, _ in drawn]
    assert all(10 <= value <= 40 and value == arithmetic.evaluate(t, o) for t, o, value in drawn)
    assert len(set(texts)) == 60 and seen == set(texts)
