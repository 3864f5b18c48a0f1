"""Context-robust training mixes: each domain's task in many wordings, after a foreign prefix, at hand-overs.

The shipped adapters were trained on prompts shaped like their own data only; handed over
mid-answer (the oracle switch on the slot tasks, :mod:`moa.data.slots`) none continues: the
French adapter writes ``<|im_end|>`` after ``= 111``, none writes a hand-over token. This mix
trains each domain's adapter on three kinds of example (``meta["kind"]``), in a ratio set by
:class:`Mix` (default 50 / 30 / 20 %):

* ``plain``: the domain's own train items; half verbatim (the existing phrasings), half
  rewritten in the domain's train templates plus :data:`~moa.data.robust_templates.NEW_PHRASINGS`
  (>= 8 in all; French items also named other ways, ``Write 47 in French.``);
* ``prefix``: the domain's answer after a *foreign prefix*: another domain's request and
  answer come first (:data:`~moa.data.robust_templates.JOINERS`), and the loss is only on
  this domain's segment, which opens with the delimiter between the two answers;
* ``handover``: the slot tasks' formats built from train items (``Compute 23 + 45, then
  write it in French`` -> ``23 + 45 = 68\\nsoixante-huit``), the loss on the segments
  this domain owns in the slot task: the French adapter learns ``\\nsoixante-huit`` after
  ``= 68`` and the end-of-turn token; the code adapter ``def solve():\\n    return "`` and,
  after a string it did not write, the closing ``"`` and the end-of-turn token.

Each example's ``meta["segments"]`` is ``[[text, domain], ...]`` (as in the slot tasks) and
``meta["loss_spans"]`` the character ranges of the segments this domain owns, which
:func:`moa.train.sft.encode_training_example` turns into labels: a token carries loss when
its first character lies in a span, the end-of-turn token when the last segment is this
domain's, which is the ownership rule of the oracle switch
(:func:`moa.eval.teacher_forced.token_owners`). ``meta["sources"]`` names the domain
examples used.

No slot test or dev item is ever used: not their expressions (``arithmetic_*``), not the
numbers of ``code_french`` and ``french_sql``, not the diagnoses of ``code_icd`` (nor any
pairing of them); nor any domain test or dev item in train (plain and foreign items come
from the domain train splits; hand-over expressions and numbers are drawn fresh, away from
those). Files: ``files/robust/<domain>/{train,dev}.jsonl``, regenerated and hash-checked by
``python -m moa.data.generate --domain robust`` (reads the committed domain and slot files).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Any

from moa.data import arithmetic, code, french, icd, slots, sql
from moa.data.common import DOMAINS, DatasetFormatError, Example, UnknownDatasetError, rng_for
from moa.data.loading import files_root, load_slots, load_split
from moa.data.robust_templates import (
    HANDOVER_PHRASINGS,
    ITEM_FORMS,
    ITEM_PREFIXES,
    JOINERS,
    NEW_PHRASINGS,
)
from moa.errors import format_choices

ROBUST = "robust"
"""Pseudo-domain of the robust mixes (its files live in ``files/robust/<domain>/``)."""

SPLITS: tuple[str, ...] = ("train", "dev")
SIZES = {"train": 2000, "dev": 200}
KINDS: tuple[str, ...] = ("plain", "prefix", "handover")
#: In dev, every this-many-th rewritten request uses the dev-only template (held out of train).
DEV_TEMPLATE_EVERY = 3

_MODULES = {"sql": sql, "arithmetic": arithmetic, "icd": icd, "french": french, "code": code}

#: The slot tasks whose answers each domain owns a segment of (see :mod:`moa.data.slots`).
HANDOVER_TASKS: dict[str, tuple[str, ...]] = {
    "sql": ("arithmetic_sql",),
    "arithmetic": ("arithmetic_french", "arithmetic_sql"),
    "icd": ("code_icd",),
    "french": ("arithmetic_french", "code_french"),
    "code": ("code_french", "code_icd"),
}


@dataclasses.dataclass(frozen=True)
class Mix:
    """Shares of each kind of example in a domain's robust split (they must sum to 1).

    Attributes:
        plain: The domain's own task, existing and new templates.
        prefix: The domain's answer after another domain's request and answer (prefix masked).
        handover: The slot tasks' formats, loss on the segments this domain owns.
    """

    plain: float = 0.5
    prefix: float = 0.3
    handover: float = 0.2

    def __post_init__(self) -> None:
        shares = (self.plain, self.prefix, self.handover)
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-9:
            raise ValueError(f"Mix shares must be >= 0 and sum to 1, got {shares}.")

    def counts(self, total: int) -> dict[str, int]:
        """Examples of each kind in a split of ``total`` (the hand-over kind takes the rounding)."""
        plain, prefix = round(total * self.plain), round(total * self.prefix)
        return {"plain": plain, "prefix": prefix, "handover": total - plain - prefix}


DEFAULT_MIX = Mix()


@dataclasses.dataclass(frozen=True)
class Excluded:
    """Items no robust training example may use.

    Attributes:
        expressions: Slot test/dev expressions and the arithmetic domain's test/dev ones.
        numbers: Numbers never spelled or used as a value: the slot test/dev numbers of
            ``code_french`` and ``french_sql`` and the French domain's test/dev numbers.
        codes: ICD-10-CM codes of the slot test/dev ``code_icd`` items and of the ICD test/dev splits.
    """

    expressions: frozenset[str]
    numbers: frozenset[int]
    codes: frozenset[str]

    def allows(self, example: Example) -> bool:
        """Whether a domain example uses none of these items."""
        meta = example.meta
        if example.domain == "arithmetic":
            return meta["expression"] not in self.expressions
        if example.domain == "french" and meta["kind"] == "number":
            return meta["value"] not in self.numbers
        if example.domain == "icd":
            return meta["code"] not in self.codes
        return True


def excluded_items(split: str = "train") -> Excluded:
    """What a robust ``split`` may not use: slot test/dev items, domain test items (and, for train, dev ones).

    The robust dev split draws its plain and foreign items from the domains' dev splits, so
    only the robust train split leaves the domains' dev items out too.
    """
    expressions: set[str] = set()
    numbers: set[int] = set()
    codes: set[str] = set()
    for held in ("dev", "test"):
        for e in load_slots(held):
            task = e.meta["task"]
            if task.startswith("arithmetic_"):
                expressions.add(e.meta["expression"])
            elif task == "code_icd":
                codes.add(e.meta["code"])
            else:
                numbers.add(e.meta["value"])
        if held == "dev" and split != "train":
            continue
        expressions |= {e.meta["expression"] for e in load_split("arithmetic", held)}
        numbers |= {e.meta["value"] for e in load_split("french", held) if e.meta["kind"] == "number"}
        codes |= {e.meta["code"] for e in load_split("icd", held)}
    return Excluded(frozenset(expressions), frozenset(numbers), frozenset(codes))


# --- requests in other words -------------------------------------------------------------------


def request_fields(example: Example) -> dict[str, str]:
    """The values a domain example's prompt filled into its phrasing (``{"expr": "12 + 7"}``...)."""
    template = _MODULES[example.domain].PHRASINGS[example.phrasing]
    pattern = "".join(f"(?P<{part[1:-1]}>.*?)" if part.startswith("{") else re.escape(part)
                      for part in re.split(r"(\{[a-z]+\})", template) if part)
    match = re.fullmatch(pattern, example.prompt, flags=re.DOTALL)
    if match is None:
        raise DatasetFormatError(f"{example.id}: prompt does not match its phrasing {template!r}.")
    return match.groupdict()


def french_item(example: Example, form: int) -> str:
    """A French example's item (``the number 47``) named in item form ``form`` (``47``, ...)."""
    kind = example.meta["kind"]
    original = request_fields(example)["item"]
    value = original[len(ITEM_PREFIXES[kind]):]
    return ITEM_FORMS[kind][form % len(ITEM_FORMS[kind])].format(v=value)


def train_templates(domain: str) -> list[str]:
    """A domain's templates for train requests: its train phrasings, then the new ones (dev-only left out)."""
    module = _MODULES[domain]
    own = [p for k, p in enumerate(module.PHRASINGS) if k not in module.HELD_OUT]
    return own + list(NEW_PHRASINGS[domain][:-1])


def dev_template(domain: str) -> str:
    """The template only the robust dev split uses."""
    return NEW_PHRASINGS[domain][-1]


def rewrite(example: Example, template: str, rng: random.Random) -> str:
    """``example``'s request written with ``template`` (French items in a random item form)."""
    fields = request_fields(example)
    if example.domain == "french":
        fields["item"] = french_item(example, rng.randrange(len(ITEM_FORMS[example.meta["kind"]])))
    return template.format(**fields)


# --- the three kinds ---------------------------------------------------------------------------


def _owned(domain: str, segments: list[list[str]]) -> list[list[int]]:
    """Character ranges of the segments ``domain`` owns."""
    spans, start = [], 0
    for text, owner in segments:
        if owner == domain:
            spans.append([start, start + len(text)])
        start += len(text)
    return spans


_Record = tuple[str, str, dict[str, Any]]  # prompt, answer, meta


def _record(domain: str, prompt: str, segments: list[list[str]], kind: str, meta: dict[str, Any]) -> _Record:
    answer = "".join(text for text, _ in segments)
    return prompt, answer, {"kind": kind, "segments": segments, "loss_spans": _owned(domain, segments), **meta}


class _Builder:
    """Draws one split's examples of one domain; hand-over items are fresh and never repeat."""

    def __init__(self, split: str, pools: dict[str, list[Example]], excluded: Excluded, seen: set[str],
                 dev_numbers: set[int]) -> None:
        self.split = split
        self.pools = pools
        self.excluded = excluded
        self.seen = seen  # expressions already drawn (any split) or excluded
        self.dev_numbers = dev_numbers  # code_french numbers of the robust dev split (train avoids them)
        self.used: dict[str, set[int]] = {}  # per domain, code_french numbers drawn in this split

    def template(self, domain: str, i: int) -> tuple[str, str]:
        """``(template id, template)`` of the ``i``-th rewritten request of ``domain``."""
        if self.split == "dev" and i % DEV_TEMPLATE_EVERY == 0:
            return "dev", dev_template(domain)
        templates = train_templates(domain)
        return f"t{i % len(templates)}", templates[i % len(templates)]

    def plain(self, domain: str, i: int, rng: random.Random) -> _Record:
        source = self.pools[domain][i % len(self.pools[domain])]
        if i % 2 == 0:  # verbatim: the existing phrasings stay in the mix as they are
            prompt, template_id = source.prompt, f"own{source.phrasing}"
        else:
            template_id, template = self.template(domain, i // 2)
            prompt = rewrite(source, template, rng)
        return _record(domain, prompt, [[source.answer, domain]], "plain",
                       {"template": template_id, "sources": [source.id]})

    def prefix(self, domain: str, i: int, rng: random.Random) -> _Record:
        pool = self.pools[domain]
        source = pool[(i * 7 + 3) % len(pool)]  # another walk through the pool than plain's
        foreigners = [d for d in DOMAINS if d != domain]
        other = foreigners[i % len(foreigners)]
        foreign = rng.choice(self.pools[other])
        template_id, template = self.template(domain, i)
        request = rewrite(source, template, rng)
        ask, reply = JOINERS[i % len(JOINERS)]
        head, middle = reply.split("{a}")[0], reply.split("{a}")[1].split("{b}")[0]
        segments = [[head + foreign.answer, other], [middle + source.answer, domain]]
        return _record(domain, ask.format(a=foreign.prompt, b=request), segments, "prefix",
                       {"template": template_id, "joiner": i % len(JOINERS), "foreign": other,
                        "sources": [foreign.id, source.id]})

    def expression(self, rng: random.Random) -> tuple[str, str, int]:
        """A fresh expression with a value in 0-999 that is not an excluded number."""
        while True:
            terms, ops, value = arithmetic.expression_between(rng, 0, 999, self.seen)
            if value not in self.excluded.numbers:
                return arithmetic.render(terms, ops), arithmetic.worked_answer(terms, ops), value

    def number(self, domain: str, rng: random.Random) -> int:
        """A number in 0-999 for ``code_french``: not excluded, never one of robust dev's in train.

        Only about 450 numbers are allowed, so a domain reuses them once it has drawn them all.
        """
        reserved = self.dev_numbers if self.split == "train" else set()
        allowed = [n for n in range(1000) if n not in self.excluded.numbers and n not in reserved]
        used = self.used.setdefault(domain, set())
        n = rng.choice([n for n in allowed if n not in used] or allowed)
        used.add(n)
        if self.split == "dev":
            self.dev_numbers.add(n)
        return n

    def handover(self, domain: str, i: int, rng: random.Random) -> _Record:
        tasks = HANDOVER_TASKS[domain]
        task = tasks[i % len(tasks)]
        k = i // len(tasks)
        own = list(slots.PHRASINGS[task][:slots.HELD_OUT])
        new = list(HANDOVER_PHRASINGS[task])
        if self.split == "dev" and k % DEV_TEMPLATE_EVERY == 0:
            template_id, template = "dev", new[-1]
        else:
            choices = own + new[:-1]
            template_id, template = f"t{k % len(choices)}", choices[k % len(choices)]
        meta: dict[str, Any] = {"task": task, "template": template_id}
        if task in ("arithmetic_french", "arithmetic_sql"):
            expr, worked, value = self.expression(rng)
            tail = french.number_words(value) if task == "arithmetic_french" else slots.invoice_query(value)
            owner = "french" if task == "arithmetic_french" else "sql"
            segments = [[worked, "arithmetic"], ["\n" + tail, owner]]
            prompt = template.format(expr=expr)
            meta.update(expression=expr, value=value, sources=[])
        elif task == "code_french":
            n = self.number(domain, rng)
            segments = slots.function_segments((french.number_words(n), "french"))
            prompt = template.format(n=n)
            meta.update(value=n, sources=[])
        else:
            diagnosis = self.pools["icd"][(i * 5 + 1) % len(self.pools["icd"])]
            segments = slots.function_segments((diagnosis.answer, "icd"))
            prompt = template.format(d=slots.diagnosis_of(diagnosis))
            meta.update(code=diagnosis.meta["code"], sources=[diagnosis.id])
        return _record(domain, prompt, segments, "handover", meta)


def _pools(split: str, excluded: Excluded) -> dict[str, list[Example]]:
    """Per domain, the split's examples that use no excluded item, in a fixed shuffled order."""
    pools = {}
    for domain in DOMAINS:
        pool = [e for e in load_split(domain, split) if excluded.allows(e)]
        rng_for(ROBUST, f"{domain}:{split}:pool").shuffle(pool)
        pools[domain] = pool
    return pools


def generate(mix: Mix = DEFAULT_MIX, sizes: dict[str, int] | None = None) -> dict[str, list[Example]]:
    """Build every domain's robust train and dev split (deterministic).

    Args:
        mix: Shares of plain, foreign-prefix and hand-over examples.
        sizes: Examples per domain and split (default :data:`SIZES`).

    Returns:
        ``"<domain>/<split>"`` -> examples (ids ``robust-<domain>-<split>-NNNNN``, ``domain`` the
        adapter's domain, ``phrasing`` 0: the template is ``meta["template"]``).
    """
    sizes = dict(sizes or SIZES)
    seen: set[str] = set(excluded_items("train").expressions)  # fresh expressions avoid every held-out one
    dev_numbers: set[int] = set()
    out: dict[str, list[Example]] = {}
    for split in ("dev", "train"):  # dev first: its fresh items are then never drawn for train
        excluded = excluded_items(split)
        builder = _Builder(split, _pools(split, excluded), excluded, seen, dev_numbers)
        for domain in DOMAINS:
            rng = rng_for(ROBUST, f"{domain}:{split}")
            make = {"plain": builder.plain, "prefix": builder.prefix, "handover": builder.handover}
            records = [make[kind](domain, i, rng) for kind, n in mix.counts(sizes[split]).items() for i in range(n)]
            rng.shuffle(records)
            out[f"{domain}/{split}"] = [
                Example(id=f"{ROBUST}-{domain}-{split}-{i:05d}", domain=domain, prompt=prompt, answer=answer,
                        phrasing=0, split=split, meta=meta)
                for i, (prompt, answer, meta) in enumerate(records)
            ]
    return {f"{d}/{s}": out[f"{d}/{s}"] for d in DOMAINS for s in SPLITS}


def load_robust(domain: str, split: str = "train", kinds: Sequence[str] | None = None) -> list[Example]:
    """Load a domain's committed robust split, optionally only some kinds of example.

    Raises:
        UnknownDatasetError: Unknown domain, split or kind.
    """
    if domain not in DOMAINS:
        raise UnknownDatasetError(f"Unknown domain {domain!r}. Domains: {format_choices(DOMAINS)}.")
    if split not in SPLITS:
        raise UnknownDatasetError(f"Unknown robust split {split!r}. Splits: {format_choices(SPLITS)}.")
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise UnknownDatasetError(f"Unknown kinds {sorted(unknown)}. Kinds: {format_choices(KINDS)}.")
    resource = files_root() / ROBUST / domain / f"{split}.jsonl"
    if not resource.is_file():
        raise DatasetFormatError(f"Data file {ROBUST}/{domain}/{split}.jsonl is missing from the moa package. "
                                 "Regenerate it with: python -m moa.data.generate --domain robust")
    examples = [Example.from_json(line) for line in resource.read_text(encoding="utf-8").splitlines()]
    return [e for e in examples if kinds is None or e.meta["kind"] in kinds]
