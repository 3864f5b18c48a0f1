"""docs/benchmarks.md quotes only numbers its committed result files hold; README.md stays a front door.

The convention the benchmarks page follows (and states in its last section):

* every table has a ``Source:`` line right above it (blank lines between are allowed), naming one
  or more result files as ```benchmarks/results/<file>` (commit `<hash>`)``;
* the table's section (from the heading above it) has a ``Command:`` or ``Commands:`` line;
* every number in the table's body cells appears in one of those files, allowing for rounding to
  the decimals shown, thousands separators (``1,435``), a sign written ``−`` or ``+``, suffixes
  such as ``%``, ``×`` or ``x``, and a share or a time the file stores unscaled when the cell, its
  column header or its row label says ``%`` (the file may hold 0.995 for 99.5 %) or ``ms`` (the
  file may hold seconds);
* each commit is the last one that changed its file (checked when git history is available).

Standard library and pytest only.
"""

from __future__ import annotations

import bisect
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"

SOURCE_ENTRY = re.compile(r"`(benchmarks/results/[^`]+)`\s*\(commit `([0-9a-f]{7,40})`\)")
RESULT_PATH = re.compile(r"benchmarks/results/[^\s`;,)]+")
# A number in a table cell: not glued to a word or a dot before it (so `s0`, `v1:`, `mixed-8`'s
# dash and `2.13.0`'s tail are not read as numbers or signs), optional sign, thousands groups.
CELL_NUMBER = re.compile(r"(?<![\w.])([−+-]?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?)(?!\d)")
# A number in a result file (JSON, text, Markdown): signs only when not glued to a word.
FILE_NUMBER = re.compile(r"(?<![\w.])(-?)(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
FILE_GROUPED = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\d,])")
# "Issue 11", "issue #13", "#13" in prose; not Markdown anchors such as (#22-the-plugin-module).
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d+|(?<![\w&(/])#\d+(?![\w-])", re.IGNORECASE)


@dataclass
class Table:
    line: int  # 1-based line of the header row
    header: list[str]
    rows: list[list[str]]
    sources: list[tuple[str, str]]  # (path, commit)
    source_line: str
    has_command: bool


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_tables(text: str) -> list[Table]:
    lines = text.splitlines()
    tables: list[Table] = []
    i = 0
    while i < len(lines):
        if not (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\s*\|?(\s*:?-{3,}:?\s*\|)+\s*:?-{0,}:?\s*\|?\s*", lines[i + 1])):
            i += 1
            continue
        start = i
        header = split_row(lines[i])
        i += 2
        rows = []
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            rows.append(split_row(lines[i]))
            i += 1
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        source_line = lines[above].strip() if above >= 0 else ""
        section = start - 1
        while section >= 0 and not lines[section].startswith("#"):
            section -= 1
        has_command = any(re.match(r"(Command|Commands):", line.strip()) for line in lines[section + 1 : start])
        sources = SOURCE_ENTRY.findall(source_line) if source_line.startswith("Source:") else []
        tables.append(Table(start + 1, header, rows, sources, source_line, has_command))
    return tables


@dataclass
class CellNumber:
    value: float
    decimals: int
    text: str


def cell_numbers(cell: str) -> list[CellNumber]:
    numbers = []
    for match in CELL_NUMBER.finditer(cell):
        sign, digits = match.groups()
        plain = digits.replace(",", "")
        value = float(plain) * (-1 if sign in ("−", "-") else 1)
        decimals = len(plain.split(".")[1]) if "." in plain else 0
        numbers.append(CellNumber(value, decimals, match.group(0)))
    return numbers


def scales(*texts: str) -> list[float]:
    """1, and 100 where a text says % (a share stored as 0..1), 1000 where it says ms (seconds stored)."""
    joined = " ".join(texts)
    result = [1.0]
    if "%" in joined:
        result.append(100.0)
    if re.search(r"\bms\b", joined):
        result.append(1000.0)
    return result


_FILE_VALUES: dict[Path, list[float]] = {}


def file_values(path: Path) -> list[float]:
    """Every number in a result file, sorted."""
    if path not in _FILE_VALUES:
        text = path.read_text(encoding="utf-8", errors="replace")
        values = []
        for match in FILE_NUMBER.finditer(text):
            sign, digits = match.groups()
            try:
                values.append(float(digits) * (-1 if sign else 1))
            except ValueError:  # pragma: no cover - the regex only matches floats
                continue
        values.extend(float(m.group(0).replace(",", "")) for m in FILE_GROUPED.finditer(text))
        _FILE_VALUES[path] = sorted(values)
    return _FILE_VALUES[path]


def found_in(number: CellNumber, values: list[float], factors: list[float]) -> bool:
    """Some file value, times one of the factors, rounds to the cell's number at its decimals."""
    tolerance = 0.5 * 10 ** -number.decimals + 1e-9
    for factor in factors:
        low = (number.value - tolerance) / factor
        high = (number.value + tolerance) / factor
        k = bisect.bisect_left(values, min(low, high))
        if k < len(values) and values[k] <= max(low, high):
            return True
    return False


def doc_tables() -> list[Table]:
    return parse_tables(DOC.read_text(encoding="utf-8"))


def table_id(table: Table) -> str:
    return f"line{table.line}"


def test_the_page_has_tables():
    assert len(doc_tables()) >= 10, f"{DOC} should hold the benchmark tables"


@pytest.mark.parametrize("table", doc_tables(), ids=table_id)
def test_every_table_cites_its_result_files_and_command(table: Table):
    where = f"{DOC.name}, table at line {table.line}"
    assert table.source_line.startswith("Source:"), (
        f"{where}: the line above the table must be 'Source: `benchmarks/results/<file>` (commit `<hash>`)', "
        f"found {table.source_line!r}")
    assert table.sources, f"{where}: no '`benchmarks/results/<file>` (commit `<hash>`)' in {table.source_line!r}"
    named = RESULT_PATH.findall(table.source_line)
    assert len(named) == len(table.sources), f"{where}: every result file on the Source line needs its commit"
    for path, _ in table.sources:
        assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
    assert table.has_command, f"{where}: its section has no 'Command:' line"


@pytest.mark.parametrize("table", doc_tables(), ids=table_id)
def test_every_number_in_a_table_is_in_its_result_files(table: Table):
    values = sorted(v for path, _ in table.sources for v in file_values(ROOT / path))
    missing = []
    for row in table.rows:
        label = row[0] if row else ""
        for column, cell in enumerate(row):
            header = table.header[column] if column < len(table.header) else ""
            factors = scales(cell, header, label)
            for number in cell_numbers(cell):
                if not found_in(number, values, factors):
                    missing.append(f"{number.text!r} in row {label!r}, column {header!r}")
    files = ", ".join(path for path, _ in table.sources)
    assert not missing, f"{DOC.name}, table at line {table.line}: not in {files}: " + "; ".join(missing)


def git_history_available() -> bool:
    if shutil.which("git") is None:
        return False
    try:
        shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return shallow == "false"


def test_every_cited_commit_is_the_last_to_change_its_file():
    if not git_history_available():
        pytest.skip("needs a git checkout with full history")
    wrong = []
    for table in doc_tables():
        for path, commit in table.sources:
            last = subprocess.run(["git", "log", "-1", "--format=%H", "--", path], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.strip()
            if not last.startswith(commit):
                wrong.append(f"line {table.line}: {path} cites {commit}, last changed in {last[:12] or 'no commit'}")
    assert not wrong, f"{DOC.name}: " + "; ".join(sorted(set(wrong)))


def test_the_number_check_can_fail():
    """The checker itself: a changed digit, a changed sign, a wrong scale are caught."""
    values = sorted([57.99, -0.0473, 0.16442, 1149.0, 0.00199])
    assert found_in(cell_numbers("58.0")[0], values, [1.0])
    assert not found_in(cell_numbers("58.3")[0], values, [1.0])
    assert found_in(cell_numbers("−4.7 %")[0], values, scales("−4.7 %"))
    assert not found_in(cell_numbers("+4.7 %")[0], values, scales("+4.7 %"))
    assert found_in(cell_numbers("1,149")[0], values, [1.0])
    assert found_in(cell_numbers("164.4")[0], values, scales("164.4", "median ms per step"))
    assert not found_in(cell_numbers("164.4")[0], values, scales("164.4", "median s"))
    assert found_in(cell_numbers("0.20 %")[0], values, scales("0.20 %"))
    assert [n.text for n in cell_numbers("moa mixed-8, `s0`, v1:x, 1.50×, [−8, +7]")] == ["8", "1.50", "−8", "+7"]


def test_readme_is_a_short_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 160, "README.md should stay under 160 lines: details belong in docs/"


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers(page: Path):
    hits = ISSUE_NUMBER.findall(page.read_text(encoding="utf-8"))
    assert not hits, f"{page.relative_to(ROOT)} mentions issue numbers {hits}: say what is true now instead"
