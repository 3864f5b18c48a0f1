"""The wordings of the context-robust mix (:mod:`moa.data.robust`): new templates, joiners, item forms.

Every template uses the placeholders of its domain's own ``PHRASINGS`` (``{expr}``,
``{item}``, ``{desc}``, ``{schema}`` and ``{question}``), so any training item of the
domain can be written with it. None repeats a domain's or a slot task's held-out test
phrasing (``HELD_OUT`` in each module), and none starts like one: generalisation to
wordings we did not write is measured on those. The last template of each list is
*dev-only*: the robust dev split uses it, its train split never does.
"""

from __future__ import annotations

from moa.data.slots import INVOICE_SCHEMA

#: Per domain, new request templates (train), then one dev-only template (the last).
NEW_PHRASINGS: dict[str, tuple[str, ...]] = {
    "sql": (
        "{question}\nTables: {schema}\nSQLite query:",
        "Schema:\n{schema}\n\nQuestion: {question}",
        "-- tables: {schema}\n-- {question}\nWrite the SQL.",
        "Using the tables {schema}, write one query that answers: {question}",
        "Q: {question}\nDB: {schema}",
        "SQLite. Tables: {schema}. Task: {question}",
        "[sql] {question} ({schema})",
        "Turn this question into SQL over {schema}: {question}",
    ),
    "arithmetic": (
        "Reduce {expr} one operation at a time.",
        "Q: {expr}\nA:",
        "How much is {expr}?",
        "[math] {expr}",
        "Find the result of {expr}.",
        "Expression: `{expr}`\nSimplify it step by step.",
        "Please calculate: {expr}",
        "Please simplify {expr} for me.",
    ),
    "icd": (
        "{desc}\nICD-10-CM chapter?",
        'Diagnosis "{desc}" -> ICD-10-CM chapter:',
        "Name the ICD-10-CM chapter for: {desc}",
        "Classify into an ICD-10-CM chapter: {desc}",
        "What ICD-10-CM chapter covers {desc}?",
        "ICD-10-CM: {desc}. Chapter title?",
        "[icd] {desc}",
        "Chapter (ICD-10-CM) of the diagnosis: {desc}",
    ),
    "french": (
        "{item} in French:",
        "French for {item}?",
        "Spell out {item} in French.",
        "Translate to French: {item}",
        "Render {item} in the French language.",
        "En français : {item}",
        "What is {item} in French?",
        "Put {item} into French.",
    ),
    "code": (
        "Python function solve(nums): {desc}.",
        "Write solve(nums) returning {desc}.",
        "Code a Python solve(nums) that computes {desc}.",
        "# Task: {desc}\n# Python, function solve(nums)",
        "Return {desc} from a Python function solve(nums).",
        "In Python, solve(nums) should return {desc}. Write it.",
        "[python] solve(nums) -> {desc}",
        "Create solve(nums) in Python giving {desc}.",
    ),
}

#: French items beyond "the number 47": how else a request names the thing to translate.
#: ``{v}`` is the number, the ISO date or the English country name.
ITEM_FORMS: dict[str, tuple[str, ...]] = {
    "number": ("the number {v}", "{v}", "number {v}", "the integer {v}"),
    "date": ("the date {v}", "{v}", "the day {v}"),
    "country": ("the country name {v}", "{v}", "the country {v}"),
}
#: How the original prompts name an item (form 0 above), to read the value back.
ITEM_PREFIXES: dict[str, str] = {"number": "the number ", "date": "the date ", "country": "the country name "}

#: Two requests in one user turn, and their two answers in one assistant turn: ``{a}`` is the
#: foreign domain's, ``{b}`` this domain's. The last one gives only this domain's request: the
#: foreign output still comes first in the answer (robustness to any prefix in the turn).
JOINERS: tuple[tuple[str, str], ...] = (
    ("{a}\n{b}", "{a}\n{b}"),
    ("{a}\n\nThen: {b}", "{a}\n\n{b}"),
    ("Two tasks.\n1. {a}\n2. {b}", "1. {a}\n2. {b}"),
    ("Task A: {a}\nTask B: {b}", "A: {a}\nB: {b}"),
    ("{a} Also: {b}", "{a}\n{b}"),
    ("Answer both, one after the other.\n{a}\n{b}", "{a}\n{b}"),
    ("{b}", "{a}\n{b}"),
)

_SCHEMA = "\nSchema: " + INVOICE_SCHEMA

#: Per slot task, composite request templates besides the task's own train phrasings
#: (``moa.data.slots.PHRASINGS[task][:HELD_OUT]``); the last one is dev-only.
HANDOVER_PHRASINGS: dict[str, tuple[str, ...]] = {
    "arithmetic_french": (
        "Calculate {expr}. Write the answer in French words on a new line.",
        "{expr} = ? Show the reduction, then the result spelled in French.",
        "Reduce {expr} one step at a time, then spell the value in French.",
        "Do {expr} step by step; finish with the number in French words.",
    ),
    "arithmetic_sql": (
        "Calculate {expr}. Then give the SQLite query for the ids of invoices whose total is above that number."
        + _SCHEMA,
        "{expr} = ? Then: an SQL query selecting the ids of the invoices with total greater than the result."
        + _SCHEMA,
        "Reduce {expr} step by step, then query the ids of the invoices with a total above it." + _SCHEMA,
        "Do {expr} step by step; finish with the SQLite query for invoice ids whose total exceeds it." + _SCHEMA,
    ),
    "code_french": (
        "Python: write solve() so it returns the French words for {n}.",
        "Write solve() in Python returning the string that spells {n} in French.",
        "Code a Python solve() giving the French spelling of {n} as a str.",
        "Create solve() in Python returning {n} in French words.",
    ),
    "code_icd": (
        'Python: write solve() so it returns the ICD-10-CM chapter title of "{d}".',
        'Write solve() in Python returning, as a string, the ICD-10-CM chapter of "{d}".',
        'Code a Python solve() giving the ICD-10-CM chapter title for the diagnosis "{d}".',
        'Create solve() in Python returning the ICD-10-CM chapter of "{d}".',
    ),
}
