"""Keyword rules run in linear time: ReDoS patterns on 100 kB prompts, threads, refused rules.

Each classic "evil" regex below backtracks catastrophically under Python's ``re`` on the
prompts used here (minutes to centuries). The router compiles rules with RE2, so each call
must finish well inside ``BOUND_S`` and agree with a reference predicate that computes the
same yes/no answer without a backtracking regex. The references are checked against ``re``
itself on every short prompt over a small alphabet, where ``re`` is fast.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moa.errors import RoutingError
from moa.routing import RoutingRequest
from moa.testing import require_plugin

keyword = require_plugin("moa-router-keyword", "moa_router_keyword")
KeywordRouter = keyword.KeywordRouter

BOUND_S = 2.0  # generous: RE2 takes about a millisecond for these calls


def _strip_final_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _ends_with_a(text: str) -> bool:
    # (a+)+$ and (a|aa)+$ match iff the text ends in "a" (re's $ also allows one final "\n").
    return _strip_final_newline(text).lower().endswith("a")


def _twelve_as_on_a_line(text: str) -> bool:
    # (.*a){12}: "." does not cross a newline, so some line holds twelve a's.
    return any(line.lower().count("a") >= 12 for line in text.split("\n"))


def _letters_blocks_then_word(text: str) -> bool:
    # ^(([a-z])+.)+[A-Z]([a-z])+$ ignoring case: the whole text (less one final "\n") is a
    # letter, then letters or single non-letters each right after a letter, ending in two
    # letters, at least 4 characters, no newline.
    body = _strip_final_newline(text)

    def letter(char: str) -> bool:
        return char.isascii() and char.isalpha()

    if len(body) < 4 or "\n" in body or not (letter(body[0]) and letter(body[-2]) and letter(body[-1])):
        return False
    return all(letter(char) or letter(body[i - 1]) for i, char in enumerate(body) if i)


EVIL: dict[str, Callable[[str], bool]] = {
    r"(a+)+$": _ends_with_a,
    r"(a|aa)+$": _ends_with_a,
    r"(a|a?)+$": lambda text: True,  # (a|a?)+ matches the empty string, so $ always matches
    r"(.*a){12}": _twelve_as_on_a_line,
    r"^(([a-z])+.)+[A-Z]([a-z])+$": _letters_blocks_then_word,
}
PROMPTS = {
    "a*100k+!": "a" * 100_000 + "!",  # the classic trigger for the $-anchored ones
    "a*11+b*100k": "a" * 11 + "b" * 100_000,  # eleven a's: (.*a){12} must try every split
    "(a*50+!)*2k": ("a" * 49 + "!") * 2_000,
}

# Longer than the exhaustive prompts (twelve a's) yet short enough for re.
MEDIUM_PROMPTS = ["a" * 12, "a" * 11 + "b", "a" * 6 + "\n" + "a" * 6, "ba" * 12 + "\n", "A" * 13 + "!",
                  "aB!aB!cDeF", "ab!!cd", "abcd\n", "abcd\n\n", "Ab!c!dEfG\n", "a!bc"]


def _decide(router, prompt: str) -> bool:
    mixture = router.mixture_for(prompt)
    assert mixture in ({"evil": 1.0}, {"other": 1.0})
    return mixture == {"evil": 1.0}


@pytest.mark.parametrize("pattern", list(EVIL))
def test_reference_predicates_agree_with_re_on_every_short_prompt(pattern):
    router = KeywordRouter([(pattern, {"evil": 1.0})], default="other")
    reference = EVIL[pattern]
    for size in range(7):
        for chars in itertools.product("aB!\n", repeat=size):
            text = "".join(chars)
            expected = re.search(pattern, text, re.IGNORECASE) is not None
            assert reference(text) == expected, (pattern, text)
            assert _decide(router, text) == expected, (pattern, text)
    for text in MEDIUM_PROMPTS:
        expected = re.search(pattern, text, re.IGNORECASE) is not None
        assert reference(text) == expected == _decide(router, text), (pattern, text)


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
@pytest.mark.parametrize("pattern", list(EVIL))
def test_evil_rule_on_a_100kb_prompt_finishes_in_bounded_time(pattern, prompt_name):
    prompt = PROMPTS[prompt_name]
    assert len(prompt) >= 100_000
    router = KeywordRouter([(pattern, {"evil": 1.0})], default="other")
    start = time.perf_counter()
    decided = _decide(router, prompt)
    elapsed = time.perf_counter() - start
    assert elapsed < BOUND_S, f"{pattern!r} on {prompt_name} took {elapsed:.2f} s"
    assert decided == EVIL[pattern](prompt)


def test_the_whole_request_path_is_bounded_with_every_evil_rule_at_once():
    rules = [(pattern, {"evil": 1.0}) for pattern in EVIL]
    router = KeywordRouter(rules, mode="sum", default={"other": 1.0})
    prompts = list(PROMPTS.values())
    request = RoutingRequest(input_ids=torch.zeros(len(prompts), 1, dtype=torch.long),
                             adapter_names=["evil", "other"], texts=prompts)
    start = time.perf_counter()
    mixtures = router.route(request).to_mixtures(["evil", "other"])
    assert time.perf_counter() - start < BOUND_S * len(prompts)
    for prompt, mixture in zip(prompts, mixtures, strict=True):
        matches = sum(reference(prompt) for reference in EVIL.values())
        assert mixture == ({"evil": float(matches)} if matches else {"other": 1.0})


def test_threads_routing_at_once_all_finish_with_the_serial_results():
    rules = [(pattern, {"evil": 1.0}) for pattern in EVIL] + [(r"\bselect\b", {"sql": 1.0})]
    router = KeywordRouter(rules, mode="sum", default={"chat": 1.0})
    prompts = [PROMPTS["a*100k+!"], "SELECT * FROM t", "hello", "a" * 20, PROMPTS["a*11+b*100k"],
               "select aaaa", "B" * 1000, ""]
    serial = [router.mixture_for(prompt) for prompt in prompts]
    barrier = threading.Barrier(len(prompts))

    def route(prompt: str) -> dict[str, float] | None:
        barrier.wait(timeout=30)
        return router.mixture_for(prompt)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [pool.submit(route, prompt) for prompt in prompts]
        results = [future.result(timeout=30) for future in futures]
    assert results == serial
    for prompt, mixture in zip(prompts, serial, strict=True):  # and the serial results are right
        expected = {"evil": float(sum(reference(prompt) for reference in EVIL.values()))}
        if re.search(r"\bselect\b", prompt, re.IGNORECASE):  # no backtracking: safe under re
            expected["sql"] = 1.0
        assert mixture == expected


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", r"backreference \\1"),
        (r"(?P<w>\w+) (?P=w)", r"backreference \(\?P=name\)"),
        (r"foo(?=bar)", r"lookahead \(\?=\.\.\.\)"),
        (r"(?<!un)able", r"negative lookbehind \(\?<!\.\.\.\)"),
        (r"(?>a+)b", r"atomic group"),
        (r"a*+b", r"possessive quantifier"),
        (r"(?x) a b", r"inline flag\(s\) x"),
        (r"a{2000}", r"at most 1000"),
    ],
)
def test_a_rule_re2_cannot_run_is_refused_with_a_clear_error(pattern, why):
    with pytest.raises(RoutingError) as caught:
        KeywordRouter([("fine", {"sql": 1.0}), (pattern, {"sql": 1.0})])
    message = str(caught.value)
    assert f"Rule 1: pattern {pattern!r} is not a valid regex for RE2" in message
    assert re.search(why, message), message
    assert "no backreferences" in message and "lookaround" in message and "Rewrite the rule" in message


def test_a_saved_rule_with_a_backreference_is_refused_at_load(tmp_path):
    KeywordRouter([(r"\bselect\b", {"sql": 1.0})]).save(tmp_path / "kw")
    config_path = tmp_path / "kw" / "router_config.json"
    config = json.loads(config_path.read_text())
    config["rules"].append({"pattern": r"(\w+) \1", "weights": {"sql": 1.0}})
    config_path.write_text(json.dumps(config))
    with pytest.raises(RoutingError, match=r"router_config.json'?: Rule 1: .*backreference \\1"):
        KeywordRouter.load(tmp_path / "kw")
