"""The context-robust mixes: kinds and ratio, templates, masked prefixes, hand-over ownership, no leakage.

The leakage checks rebuild the forbidden items here, from the slot and domain files, rather
than reusing ``moa.data.robust.excluded_items``, and read the texts, not only the metadata.
"""

from __future__ import annotations

import re

import pytest

from moa.data import HELD_OUT_PHRASINGS, PHRASINGS, load_slots, load_split
from moa.data import generate as gen
from moa.data import robust, slots
from moa.data.common import DOMAINS, UnknownDatasetError
from moa.data.french import number_words
from moa.data.robust import KINDS, Mix, load_robust
from moa.data.robust_templates import HANDOVER_PHRASINGS, NEW_PHRASINGS

#: What a joiner may put before a domain's answer inside its segment.
_HEAD = re.compile(r"^\s*(?:\d\. |[AB]: )?")


def _train() -> dict[str, list]:
    return {d: load_robust(d, "train") for d in DOMAINS}


@pytest.fixture(scope="module")
def train():
    return _train()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    import moa

    return AutoTokenizer.from_pretrained(moa.default_base_path())


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[a-z]+\})", template)
    return re.compile("".join(".+?" if p.startswith("{") else re.escape(p) for p in parts if p), re.DOTALL)


# --- files, kinds, ratio ---------------------------------------------------------------------------


def test_files_are_committed_and_regenerate_identically(tmp_path):
    assert robust.ROBUST in gen.GENERATED
    hashes = gen.regenerate(robust.ROBUST, tmp_path)
    assert set(hashes) == {f"{d}/{s}" for d in DOMAINS for s in robust.SPLITS}
    assert hashes == gen.committed_hashes(robust.ROBUST)
    assert (tmp_path / "robust" / "french" / "train.jsonl").is_file()


def test_every_domain_has_the_default_mix(train):
    for domain in DOMAINS:
        for split, examples in (("train", train[domain]), ("dev", load_robust(domain, "dev"))):
            assert len(examples) == robust.SIZES[split]
            counts = {k: sum(e.meta["kind"] == k for e in examples) for k in KINDS}
            assert counts == robust.DEFAULT_MIX.counts(robust.SIZES[split]) == {
                "plain": robust.SIZES[split] // 2, "prefix": robust.SIZES[split] * 3 // 10,
                "handover": robust.SIZES[split] // 5}
            assert all(e.domain == domain and e.split == split for e in examples)
            assert len({e.id for e in examples}) == len(examples)


def test_mix_is_a_parameter():
    with pytest.raises(ValueError, match="sum to 1"):
        Mix(plain=0.5, prefix=0.5, handover=0.5)
    out = robust.generate(Mix(plain=0.2, prefix=0.2, handover=0.6), sizes={"train": 30, "dev": 10})
    kinds = [e.meta["kind"] for e in out["icd/train"]]
    assert (kinds.count("plain"), kinds.count("prefix"), kinds.count("handover")) == (6, 6, 18)
    assert len(out["sql/dev"]) == 10


def test_load_robust_filters_kinds_and_names_its_choices():
    assert {e.meta["kind"] for e in load_robust("code", "dev", kinds=["prefix"])} == {"prefix"}
    with pytest.raises(UnknownDatasetError, match="arithmetic"):
        load_robust("weather")
    with pytest.raises(UnknownDatasetError, match="train"):
        load_robust("sql", "test")


# --- templates ----------------------------------------------------------------------------------


def test_at_least_eight_train_templates_per_domain_and_the_existing_ones_stay(train):
    for domain in DOMAINS:
        templates = robust.train_templates(domain)
        assert len(templates) >= 8 and len(set(templates)) == len(templates)
        plain = [e for e in train[domain] if e.meta["kind"] == "plain"]
        used = {e.meta["template"] for e in plain}
        assert len(used) >= 8, (domain, used)
        own = {e.meta["template"] for e in plain if e.meta["template"].startswith("own")}
        assert own == {f"own{k}" for k in range(len(PHRASINGS[domain])) if k not in HELD_OUT_PHRASINGS[domain]}
        # a rewritten request in one of the domain's own phrasings reproduces the original prompt
        source = load_split(domain, "train")[0]
        assert robust.rewrite(source, PHRASINGS[domain][source.phrasing], _FirstForm()) == source.prompt


class _FirstForm:
    """An rng stand-in whose draws pick the first item form (the original wording)."""

    def randrange(self, n: int) -> int:
        return 0


def test_held_out_phrasings_never_reach_train_and_dev_has_its_own(train):
    held = [t for d in DOMAINS for k, t in enumerate(PHRASINGS[d]) if k in HELD_OUT_PHRASINGS[d]]
    held += [slots.PHRASINGS[task][slots.HELD_OUT] for task in slots.SWITCH_TASKS]
    dev_only = [NEW_PHRASINGS[d][-1] for d in DOMAINS] + [HANDOVER_PHRASINGS[t][-1] for t in HANDOVER_PHRASINGS]
    patterns = [_template_regex(t) for t in held + dev_only]
    for examples in train.values():
        for e in examples:
            hit = next((p.pattern for p in patterns if p.search(e.prompt)), None)
            assert hit is None, (e.id, hit, e.prompt)
    for domain in DOMAINS:
        dev = load_robust(domain, "dev")
        assert any(_template_regex(NEW_PHRASINGS[domain][-1]).search(e.prompt) for e in dev)
        assert any(e.meta["kind"] == "handover" and e.meta["template"] == "dev" for e in dev)


def test_french_items_are_named_in_several_forms(train):
    prompts = [e.prompt for e in train["french"] if e.meta["kind"] == "plain"]
    assert any(re.fullmatch(r"Write the number \d+ in French\.", p) for p in prompts)  # the original form
    assert any(re.fullmatch(r"Write \d+ in French\.", p) for p in prompts)  # "Write 47 in French words." (issue)
    assert any(re.fullmatch(r"Translate to French: [A-Z][a-z]+", p) for p in prompts)  # a bare country name


# --- segments, ownership, the loss mask ---------------------------------------------------------


def test_segments_spell_the_answer_and_loss_spans_are_the_owned_segments(train):
    for domain in DOMAINS:
        for e in train[domain] + load_robust(domain, "dev"):
            segments = e.meta["segments"]
            assert "".join(t for t, _ in segments) == e.answer
            spans, start = [], 0
            for text, owner in segments:
                if owner == domain:
                    spans.append([start, start + len(text)])
                start += len(text)
            assert e.meta["loss_spans"] == spans and spans, e.id


def test_foreign_prefix_examples_put_another_domain_first_and_train_only_this_one(train, tokenizer):
    from moa.train.sft import encode_training_example

    for domain in DOMAINS:
        prefix = [e for e in train[domain] if e.meta["kind"] == "prefix"]
        assert {e.meta["foreign"] for e in prefix} == set(DOMAINS) - {domain}
        for e in prefix:
            (before, other), (mine, owner) = e.meta["segments"]
            assert other == e.meta["foreign"] != domain and owner == domain
            assert e.meta["loss_spans"] == [[len(before), len(e.answer)]]
            assert mine[0].isspace()  # the delimiter opens this domain's segment
        for e in prefix[:20]:
            ids, labels = encode_training_example(tokenizer, e)
            trained = [i for i, label in enumerate(labels) if label != -100]
            first = tokenizer.decode(ids[trained[0]:trained[-1] + 1], clean_up_tokenization_spaces=False)
            before = e.meta["segments"][0][0]
            assert first == e.answer[len(before):] + tokenizer.eos_token, e.id
            answer_start = len(ids) - len(tokenizer(e.answer + tokenizer.eos_token,
                                                    add_special_tokens=False)["input_ids"])
            assert all(label == -100 for label in labels[answer_start:trained[0]])  # the prefix: no loss


def test_trained_tokens_are_exactly_those_the_oracle_switch_routes_to_the_domain(train, tokenizer):
    from moa.eval.teacher_forced import token_owners
    from moa.train.sft import loss_span_mask

    for domain in DOMAINS:
        for kind in KINDS:
            for e in [x for x in train[domain] if x.meta["kind"] == kind][:25]:
                mask = loss_span_mask(tokenizer, e.answer, e.meta["loss_spans"])
                owners = token_owners(tokenizer, e.answer, e.meta["segments"])
                assert mask == [owner == domain for owner in owners], e.id


def test_handover_examples_own_what_the_slot_tasks_give_them(train, tokenizer):
    from moa.train.sft import encode_training_example

    slot_owners = {t: [o for _, o in load_slots("train", t)[0].meta["segments"]] for t in slots.SWITCH_TASKS}
    frame = slots.function_segments(("x", "french"))
    for domain in DOMAINS:
        handover = [e for e in train[domain] if e.meta["kind"] == "handover"]
        assert {e.meta["task"] for e in handover} == set(robust.HANDOVER_TASKS[domain])
        for e in handover:
            task, segments = e.meta["task"], e.meta["segments"]
            assert [o for _, o in segments] == slot_owners[task] and domain in slot_owners[task]
            if task.startswith("arithmetic_"):
                assert segments[0][0].split(" = ")[-1] == str(e.meta["value"])
                assert segments[1][0].startswith("\n") and "\n" not in segments[0][0]
            else:
                assert (segments[0][0], segments[2][0]) == (frame[0][0], frame[2][0])
        for e in handover[:20]:
            ids, labels = encode_training_example(tokenizer, e)
            answer_ids = tokenizer(e.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            labels = labels[len(ids) - len(answer_ids):]
            trained = [tokenizer.decode([t], clean_up_tokenization_spaces=False)
                       for t, label in zip(answer_ids, labels) if label != -100]
            task = e.meta["task"]
            if domain in ("french", "sql") and task.startswith("arithmetic_"):
                assert trained[0] == "\n" and trained[-1] == tokenizer.eos_token  # French: \n + words + end
            elif domain == "code":
                assert "".join(trained).startswith("def solve():") and trained[-2:] == ['"', tokenizer.eos_token]
            elif task.startswith("code_"):  # French or ICD inside the frame: the string only
                assert "".join(trained) == segments_text(e, domain).strip()
            else:  # arithmetic: its reduction, not the hand-over after it
                assert "".join(trained) == e.meta["segments"][0][0] and "\n" not in trained


def segments_text(example, owner: str) -> str:
    return "".join(t for t, o in example.meta["segments"] if o == owner)


# --- no leakage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out():
    """Items of the slot tasks' test/dev sets and of the domains' test/dev splits."""
    slot = [e for s in ("dev", "test") for e in load_slots(s)]
    domain = {d: [e for s in ("dev", "test") for e in load_split(d, s)] for d in DOMAINS}
    numbers = {e.meta["value"] for e in slot if e.meta["task"] in ("code_french", "french_sql")}
    numbers |= {e.meta["value"] for e in domain["french"] if e.meta["kind"] == "number"}
    return {
        "expressions": {e.meta["expression"] for e in slot if "expression" in e.meta}
        | {e.meta["expression"] for e in domain["arithmetic"]},
        "words": {number_words(n) for n in numbers},
        "codes": {e.meta["code"] for e in slot if "code" in e.meta} | {e.meta["code"] for e in domain["icd"]},
        "diagnoses": [slots.diagnosis_of(e) for e in domain["icd"]],
        # ICD answers are 21 shared titles; a few code test answers equal train ones in the code
        # domain itself ("less than 0" is "negative"): only answers the domain's train lacks count
        "answers": {d: {e.answer for e in domain[d]} - {e.answer for e in load_split(d, "train")}
                    for d in DOMAINS if d != "icd"},
        "slot_answers": {e.answer for e in slot if e.meta["task"] in ("code_french", "french_sql")},
    }


def test_no_slot_or_domain_test_dev_item_is_in_robust_train(train, held_out):
    expression = re.compile(r"\d+(?: [-+×] \d+)+")
    icd_train = {e.id: e for e in load_split("icd", "train")}
    for domain in DOMAINS:
        for e in train[domain]:
            assert all(s.split("-")[1] == "train" for s in e.meta["sources"]), e.id
            for found in expression.findall(e.prompt):  # (answers also hold intermediate steps)
                assert found not in held_out["expressions"], (e.id, found)
            for text, owner in e.meta["segments"]:
                segment = _HEAD.sub("", text)
                if owner == "french":
                    assert segment not in held_out["words"], (e.id, segment)
                if owner != "icd":
                    assert segment not in held_out["answers"][owner], (e.id, segment)
            assert e.answer not in held_out["slot_answers"], e.id
            assert e.meta.get("value") is None or number_words(e.meta["value"]) not in held_out["words"]
            codes = [e.meta["code"]] if "code" in e.meta else []
            codes += [icd_train[s].meta["code"] for s in e.meta["sources"] if s in icd_train]
            assert not set(codes) & held_out["codes"], e.id


def test_no_test_or_dev_diagnosis_is_in_a_robust_train_prompt(train, held_out):
    prompts = "\n".join(e.prompt for examples in train.values() for e in examples)
    leaked = [d for d in held_out["diagnoses"] if re.search(rf'(?:^|[\s":]){re.escape(d)}(?:$|[\s"?.])', prompts,
                                                             flags=re.MULTILINE)]
    assert not leaked, leaked[:5]


def test_hand_over_items_are_fresh_and_never_repeat_across_splits():
    values = {}
    for split in robust.SPLITS:
        examples = [e for d in DOMAINS for e in load_robust(d, split) if e.meta["kind"] == "handover"]
        values[split] = ({e.meta["expression"] for e in examples if "expression" in e.meta},
                         {e.meta["value"] for e in examples if e.meta["task"] == "code_french"})
    assert not values["train"][0] & values["dev"][0]
    assert not values["train"][1] & values["dev"][1]
    slot_train = {e.meta["expression"] for e in load_slots("train") if "expression" in e.meta}
    assert len(values["train"][0] & slot_train) < 0.05 * len(values["train"][0])  # drawn fresh, not copied
