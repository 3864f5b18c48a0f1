"""Rules compiled for RE2 decide as Python's ``re`` did, where rules written for ``re`` relied on it.

RE2's ``\\w \\d \\s \\b`` are ASCII-only, its ``$`` ignores a final newline, and it spells some
escapes differently; ``moa_router_keyword.patterns.to_re2`` rewrites rules so that the yes/no
answer is ``re``'s. These tests compare it with ``re`` itself (safe here: short prompts and
patterns that do not backtrack).
"""

from __future__ import annotations

import itertools
import random
import re
import unicodedata

import pytest

from moa.errors import RoutingError
from moa.testing import require_plugin

keyword = require_plugin("moa-router-keyword", "moa_router_keyword")
KeywordRouter = keyword.KeywordRouter
from moa_router_keyword.patterns import compile_pattern, encode_text  # noqa: E402

# Letters and digits in and out of ASCII (é, 查, Arabic-Indic ٣, superscript ², long s, Kelvin
# sign), "_", ASCII and Unicode spaces, punctuation. Not İ/ı: re folds them with i, RE2 does not.
ALPHABET = ["a", "B", "s", "k", "é", "É", "查", "_", "1", "٣", "²", "ſ", "\u212a", " ", "\u00a0",
            "\u3000", "\n", "\t", "\v", "!", "-", ".", "+"]

# Every rule here must be valid for re and decided exactly like re by the RE2 rewrite.
PATTERNS = [
    r"\bselect\b", r"\bcafé\b", r"\b查\b", r"\bé", r"é\b", r"\B1", r"a\B", r"\b(a|é|查)\b",
    r"\b(?:a|B)+\b", r"(?i)\bab\b", r"a\b!", r"a\bB", r"!\b!", r"!\B!", r"[a-z]\b", r"[.!]\b",
    r"\b[+!]", r"\b\w+\b", r"\bé|\b1\b|!\B", r"(\bB|\b_)", r"\w+", r"\W", r"\d", r"\D\d",
    r"\s", r"\S\s\S", r"[\w-]+!", r"[^\w\s]", r"[^\W_]+", r"[^\W\d_]", r"[^\S\n]", r"[\s\d]",
    r"a$", r"(?:a|é)$", r"\n$", r"$", r"a\Z", r"^a", r"\Aa", r"a{,2}B", r"a{,}B", r"[\b]",
    r"\u00e9", r"\U0000674e|\N{LATIN SMALL LETTER E WITH ACUTE}", r"é(?#a comment)\s",
    r"\x41", r"\101", r"[\x41-\x43]", r"ſ", r"k", r"s", r"c\+\+", r"\.\b", r"^\bé", r"\A\B!",
    r"é\b$", r"!\B\Z", r"(?m)^\b查", r"(?m)1\b$",
]


def _texts() -> list[str]:
    texts = ["".join(chars) for size in range(3) for chars in itertools.product(ALPHABET, repeat=size)]
    rng = random.Random(20251105)
    texts += ["".join(rng.choices(ALPHABET, k=rng.randint(3, 10))) for _ in range(300)]
    texts += ["select", "SELECT *", "a café.", "un café\n", "查 询", "xselect", "select_", "sélect"]
    return texts


TEXTS = _texts()


@pytest.mark.parametrize("case_sensitive", [False, True], ids=["ignore-case", "case-sensitive"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_rules_decide_as_re_did(pattern, case_sensitive):
    compiled = compile_pattern(pattern, case_sensitive=case_sensitive)
    flags = 0 if case_sensitive else re.IGNORECASE
    wrong = [text for text in TEXTS
             if compiled.search(text) != (re.search(pattern, text, flags) is not None)]
    assert not wrong, f"{pattern!r} -> {compiled.re2_pattern!r} disagrees with re on {wrong[:5]!r}"


def test_from_keywords_keeps_whole_words_in_any_script():
    words = {"fr": ["café", "données"], "zh": ["查询"], "code": ["c++", "_init", "select"], "de": ["über"]}
    router = KeywordRouter.from_keywords(words, mode="sum")
    for text in ["un café au lait", "cafés", "Café!", "les données\n", "查询 数据", "我要查询数据",
                 "I like c++ and c++17", "__init__ _init", "SELECT x", "preselect", "Über alles",
                 "überall", "xcafé", "é café é", "select\u3000x", "٣select"]:
        expected: dict[str, float] = {}
        for adapter, adapter_words in words.items():
            for word in adapter_words:
                left = r"\b" if re.match(r"\w", word) else ""
                right = r"\b" if re.search(r"\w$", word) else ""
                if re.search(f"{left}{re.escape(word)}{right}", text, re.IGNORECASE):
                    expected[adapter] = expected.get(adapter, 0.0) + 1.0
        assert (router.mixture_for(text) or {}) == expected, text


def test_python_class_escapes_are_unicode_as_in_re():
    # Every assigned character below U+3000 and a sample of the rest: \w \d \s (and their
    # negations, in and out of brackets) hold exactly the characters re gives them.
    codes = [*range(0x3000), *range(0x3000, 0x110000, 97)]
    chars = [chr(c) for c in codes if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    text = "".join(chars)
    for pattern in [r"\w", r"\W", r"\d", r"\D", r"\s", r"\S", r"[\w]", r"[^\w]", r"[\S]", r"[^\d]",
                    r"[^\W_]", r"[^\S\n]", r"[\w.-]", r"[^\w\s]"]:
        for case_sensitive in (False, True):
            compiled = compile_pattern(pattern, case_sensitive=case_sensitive)
            expected = set(re.findall(pattern, text, 0 if case_sensitive else re.IGNORECASE))
            got = {match.decode() for match in compiled.regex.findall(text.encode())}
            assert got == expected, (pattern, case_sensitive, sorted(got ^ expected)[:5])


def test_a_final_newline_and_lone_surrogates():
    router = KeywordRouter([(r"\?$", {"question": 1.0})], default="chat")
    assert router.mixture_for("Is it?\n") == {"question": 1.0}  # as re: $ before a final newline
    assert router.mixture_for("Is it?\n\n") == {"chat": 1.0}
    multiline = KeywordRouter([(r"(?m)\?$", {"question": 1.0})])
    assert multiline.mixture_for("Is it?\nYes.") == {"question": 1.0}
    # A lone surrogate (json.loads lets them through) is one non-word character, as in re.
    assert encode_text("a\ud800b") == "a\ufffdb".encode()
    assert compile_pattern(r"a.b").search("a\ud800b") and compile_pattern(r"a\Wb").search("a\ud800b")
    assert KeywordRouter([(r"\bb", {"x": 1.0})]).mixture_for("\udc80b") == {"x": 1.0}


def test_re2_only_syntax_is_accepted():
    router = KeywordRouter([(r"\p{Greek}+", {"greek": 1.0}), (r"[[:digit:]]{3}", {"num": 1.0}),
                            (r"\Q1+1\E", {"sum": 1.0})], mode="sum")
    assert router.mixture_for("λόγος 123 1+1") == {"greek": 1.0, "num": 1.0, "sum": 1.0}
    assert router.mixture_for("11") is None


@pytest.mark.parametrize(
    ("pattern", "why"),
    [("(", r"missing '\)'"), ("a)", r"unbalanced '\)'"), ("[a", r"missing '\]'"), ("a\\", "trailing backslash"),
     (r"\N{NO SUCH NAME}", "bad character name"), (r"(?(1)a|b)", "conditional"), (r"\8", r"backreference \\8"),
     (r"[z-a]", "bad character range"), (r"a**", "bad repetition operator")],
)
def test_malformed_rules_are_routing_errors_naming_why(pattern, why):
    with pytest.raises(RoutingError, match=f"Rule 0: pattern .* is not a valid regex for RE2 .*{why}"):
        KeywordRouter([(pattern, {"sql": 1.0})])
