"""The slot tasks: segments in each domain's own format, disjoint values, nested training sets."""

from __future__ import annotations

import pytest

from moa.data import UnknownDatasetError, load_slots, load_split
from moa.data.slots import HELD_OUT, SIZES, SWITCH_TASKS, TASKS, TRAIN_SIZES, diagnosis_of, training_set


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_sizes_and_segments(split):
    examples = load_slots(split)
    assert len(examples) == SIZES[split] * len(TASKS)
    for e in examples:
        segments = e.meta["segments"]
        assert "".join(text for text, _ in segments) == e.answer
        owners = [owner for _, owner in segments]
        if e.meta["task"] in SWITCH_TASKS:
            assert len(set(owners)) == 2, e.id  # a real hand-over between two domains
        else:
            assert owners == ["sql"]  # the fused control has a single segment


def test_segments_are_in_each_domains_own_format():
    arithmetic = {e.answer.split(" = ")[0]: e.answer for e in load_split("arithmetic", "train")}
    for e in load_slots("train", "arithmetic_french"):
        worked = e.meta["segments"][0][0]
        assert worked.split(" = ")[-1] == str(e.meta["value"])
        if e.meta["expression"] in arithmetic:  # same expression -> the arithmetic adapter's exact answer
            assert arithmetic[e.meta["expression"]] == worked
    for e in load_slots("test", "code_icd"):
        chapter = e.meta["segments"][1][0]
        assert chapter in {x.answer for x in load_split("icd", "test")}


def test_values_never_cross_splits_and_test_has_the_held_out_phrasing():
    for task in TASKS:
        seen: dict[str, set] = {}
        for split in ("train", "dev", "test"):
            key = "expression" if task.startswith("arithmetic") else "code" if task == "code_icd" else "value"
            seen[split] = {e.meta[key] for e in load_slots(split, task)}
        assert not seen["train"] & seen["test"] and not seen["dev"] & seen["test"], task
        assert any(e.phrasing == HELD_OUT for e in load_slots("test", task))
        assert not any(e.phrasing == HELD_OUT for e in load_slots("train", task))


def test_training_sets_are_nested_and_cover_the_switching_tasks():
    train = load_slots("train")
    sets = {n: training_set(train, n) for n in TRAIN_SIZES}
    for small, large in zip(TRAIN_SIZES, TRAIN_SIZES[1:]):
        assert {e.id for e in sets[small]} <= {e.id for e in sets[large]}
    assert len(sets[16]) == 16 * len(SWITCH_TASKS)
    assert {e.meta["task"] for e in sets[16]} == set(SWITCH_TASKS)


def test_diagnosis_text_is_recovered_from_every_icd_phrasing():
    for e in load_split("icd", "dev")[:20]:
        assert diagnosis_of(e) and diagnosis_of(e) in e.prompt and "ICD" not in diagnosis_of(e)


def test_unknown_task_lists_the_choices():
    with pytest.raises(UnknownDatasetError, match="arithmetic_french"):
        load_slots("dev", "nope")
