"""The domain metrics: gold answers pass, wrong ones fail, SQL stays read-only, code is sandboxed."""

from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest

from moa.data import DOMAINS, Example, load_composite, load_split, score, score_many
from moa.data.chinook import SqlExecutionError, database_path, run_query
from moa.data.code import CONDITIONS
from moa.data.scoring import last_number
from moa.errors import MoaError


def _one_per(examples, key):
    out = {}
    for ex in examples:
        out.setdefault(key(ex), ex)
    return list(out.values())


@pytest.mark.parametrize("domain", [d for d in DOMAINS if d != "code"])
def test_every_test_gold_scores_true(domain):
    test = load_split(domain, "test")
    assert all(score(ex, ex.answer) for ex in test)


def test_code_gold_passes_in_subprocess():
    # one per held-out combination (every test combination, every operation): each run is a process
    sample = _one_per(load_split("code", "test"), lambda ex: ex.meta["combination"])
    assert len(sample) == 23
    assert score_many(sample, [ex.answer for ex in sample], workers=2) == 1.0


def test_composite_golds_score_true():
    items = load_composite()
    assert score_many(items, [ex.answer for ex in items], workers=2) == 1.0


def test_wrong_answers_score_false():
    arith = load_split("arithmetic", "test")[:50]
    assert not any(score(ex, str(ex.meta["value"] + 1)) for ex in arith)
    assert not score(arith[0], "")
    icd = load_split("icd", "test")
    assert not any(score(ex, next(o.answer for o in icd if o.answer != ex.answer)) for ex in icd[:50])
    french = load_split("french", "test")
    assert not any(score(ex, ex.answer + "s") for ex in french[:50])
    assert not any(score(ex, ex.answer.replace("-", " ")) for ex in french if "-" in ex.answer)


def test_lenient_normalisation():
    arith = Example("a", "arithmetic", "What is 5 - 8?", "-3", 0, "test", {"expression": "5 - 8", "value": -3})
    assert score(arith, "5 - 8 = -3") and score(arith, "\u22123") and score(arith, "The answer is -3.")
    assert not score(arith, "-3 + 1 = -2")
    ex = next(e for e in load_split("icd", "test") if e.answer.startswith("Neoplasms"))
    assert score(ex, "  neoplasms (C00-D49). ")
    fr = next(e for e in load_split("french", "test") if e.meta["kind"] == "country")
    assert score(fr, fr.answer.lower() + ".") and score(fr, f" {fr.answer.upper()} ")
    accented = next(e for e in load_split("french", "test") if "\u00e9" in e.answer)
    assert not score(accented, accented.answer.replace("\u00e9", "e"))
    assert last_number("1,234 apples") == 1234 and last_number("none") is None


def test_sql_gold_executes_and_wrong_query_fails():
    test = load_split("sql", "test")
    ex = test[0]
    assert run_query(ex.answer) == [tuple(r) for r in ex.meta["gold_result"]]
    assert score(ex, f"```sql\n{ex.answer}\n```")
    assert score(ex, "  " + ex.answer + " ;")
    assert not score(ex, "SELECT name FROM artist WHERE id < 0")
    assert not score(ex, "SELEC oops")
    assert not score(ex, "SELECT 1; SELECT 2")
    other = next(e for e in test if e.meta["gold_result"] != ex.meta["gold_result"])
    assert not score(ex, other.answer)


def test_sql_connection_is_read_only_and_db_unchanged():
    path = database_path()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    ex = load_split("sql", "test")[0]
    for query in ("DELETE FROM artist", "DROP TABLE artist", "UPDATE artist SET name = 'x'",
                  "INSERT INTO genre VALUES (99, 'x')", "ATTACH DATABASE 'evil.db' AS evil", "PRAGMA query_only = OFF"):
        with pytest.raises(SqlExecutionError):
            run_query(query)
        assert not score(ex, query)
    # the mode=ro URI alone (no authorizer) refuses writes too
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM artist")
    finally:
        conn.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert run_query("SELECT COUNT(*) FROM artist") == [(275,)]


def test_sql_timeout_is_enforced():
    ex = load_split("sql", "test")[0]
    start = time.monotonic()
    assert not score(ex, "SELECT COUNT(*) FROM track a, track b, track c", timeout=0.3)
    assert time.monotonic() - start < 3


def test_code_broken_functions_fail():
    sample = _one_per(load_split("code", "test"), lambda ex: ex.meta["op"])
    broken = []
    for ex in sample:  # drop the second condition: the tests are built to catch that
        cond, k = ex.meta["conditions"][1]
        broken.append(ex.answer.replace(" and " + CONDITIONS[cond][2].format(k=k), ""))
    assert all(b != ex.answer for b, ex in zip(broken, sample))
    assert score_many(sample, broken, workers=2) == 0.0
    assert not score(sample[0], "def solve(nums):\n    raise ValueError")
    assert not score(sample[0], "import sys\nsys.exit(0)")
    assert not score(sample[0], "this is not python")


def test_code_infinite_loop_times_out_quickly():
    ex = load_split("code", "test")[0]
    start = time.monotonic()
    assert not score(ex, "def solve(nums):\n    while True:\n        pass", timeout=1.0)
    assert time.monotonic() - start < 5


def test_score_many_checks_lengths_and_unknown_domain():
    dev = load_split("arithmetic", "dev")
    assert score_many(dev[:4], [e.answer for e in dev[:2]] + ["x", "y"]) == 0.5
    with pytest.raises(MoaError):
        score_many(dev[:2], ["1"])
    bogus = Example("x", "weather", "?", "sunny", 0, "test", {})
    with pytest.raises(MoaError, match="arithmetic"):
        score(bogus, "sunny")
