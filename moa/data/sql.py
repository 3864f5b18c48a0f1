"""SQL domain: templated questions over the bundled Chinook database -> one SQLite query.

Every question template has one slot (an artist, album, genre, country, city, composer,
track or customer) filled with real values from the database. The values of each slot
type are split 70/10/20 into train/dev/test, so no test value ever appears in training.
The prompt carries a compact schema of the tables the question needs. Scoring is
execution accuracy (see :func:`moa.data.scoring.score`).
"""

from __future__ import annotations

import random
from typing import Any

from moa.data.chinook import run_query, schema_text
from moa.data.common import Example, assign_phrasings, make_examples, rng_for, split_values

DOMAIN = "sql"

PHRASINGS: tuple[str, ...] = (
    "Tables: {schema}\nQuestion: {question}\nWrite the SQLite query.",
    "Write an SQL query for this question: {question}\nSchema: {schema}",
    "Database tables: {schema}\n{question} Answer with one SQL query.",
    "Given the SQLite tables {schema}, what query answers this: {question}",
)
HELD_OUT: tuple[int, ...] = (3,)

SIZES = {"train": 2000, "dev": 100, "test": 260}
MAX_LIST_ROWS = 25

_TAA = "track JOIN album ON track.album_id = album.id JOIN artist ON album.artist_id = artist.id"
_TA = "track JOIN album ON track.album_id = album.id"
_TG = "track JOIN genre ON track.genre_id = genre.id"
_TAG = f"{_TA} JOIN genre ON track.genre_id = genre.id"
_IC = "invoice JOIN customer ON invoice.customer_id = customer.id"
_CUST = "customer.first_name = {0} AND customer.last_name = {1}"

# slot -> [(question, tables, gold SQL)]; {0}/{1}: slot parts (questions raw, SQL quoted)
TEMPLATES: dict[str, list[tuple[str, list[str], str]]] = {
    "artist": [
        ('How many albums does the artist "{0}" have?', ["artist", "album"],
         "SELECT COUNT(*) FROM album JOIN artist ON album.artist_id = artist.id WHERE artist.name = {0}"),
        ('List the titles of the albums by "{0}".', ["artist", "album"],
         "SELECT album.title FROM album JOIN artist ON album.artist_id = artist.id WHERE artist.name = {0}"),
        ('How many tracks does the artist "{0}" have?', ["artist", "album", "track"],
         f"SELECT COUNT(*) FROM {_TAA} WHERE artist.name = {{0}}"),
        ('What is the name of the longest track by "{0}"?', ["artist", "album", "track"],
         f"SELECT track.name FROM {_TAA} WHERE artist.name = {{0}} ORDER BY track.milliseconds DESC LIMIT 1"),
    ],
    "album": [
        ('How many tracks are on the album "{0}"?', ["album", "track"],
         f"SELECT COUNT(*) FROM {_TA} WHERE album.title = {{0}}"),
        ('List the names of the tracks on the album "{0}".', ["album", "track"],
         f"SELECT track.name FROM {_TA} WHERE album.title = {{0}}"),
        ('Who is the artist of the album "{0}"?', ["artist", "album"],
         "SELECT artist.name FROM artist JOIN album ON album.artist_id = artist.id WHERE album.title = {0}"),
        ('What is the total length in milliseconds of the album "{0}"?', ["album", "track"],
         f"SELECT SUM(track.milliseconds) FROM {_TA} WHERE album.title = {{0}}"),
    ],
    "genre": [
        ("How many tracks are in the genre {0}?", ["genre", "track"],
         f"SELECT COUNT(*) FROM {_TG} WHERE genre.name = {{0}}"),
        ("What is the average length in milliseconds of the {0} tracks?", ["genre", "track"],
         f"SELECT AVG(track.milliseconds) FROM {_TG} WHERE genre.name = {{0}}"),
        ("How many different artists have tracks in the genre {0}?", ["genre", "track", "album"],
         f"SELECT COUNT(DISTINCT album.artist_id) FROM {_TAG} WHERE genre.name = {{0}}"),
    ],
    "country": [
        ("How many customers live in {0}?", ["customer"], "SELECT COUNT(*) FROM customer WHERE country = {0}"),
        ("List the emails of the customers from {0}.", ["customer"],
         "SELECT email FROM customer WHERE country = {0}"),
        ("What is the total of the invoices billed to {0}?", ["invoice"],
         "SELECT SUM(total) FROM invoice WHERE billing_country = {0}"),
        ("How many invoices were billed to {0}?", ["invoice"],
         "SELECT COUNT(*) FROM invoice WHERE billing_country = {0}"),
    ],
    "city": [
        ("List the first and last names of the customers in {0}.", ["customer"],
         "SELECT first_name, last_name FROM customer WHERE city = {0}"),
        ("How many invoices were billed to the city of {0}?", ["invoice"],
         "SELECT COUNT(*) FROM invoice WHERE billing_city = {0}"),
        ("What is the total of the invoices billed to the city of {0}?", ["invoice"],
         "SELECT SUM(total) FROM invoice WHERE billing_city = {0}"),
    ],
    "composer": [
        ('List the names of the tracks composed by "{0}".', ["track"],
         "SELECT name FROM track WHERE composer = {0}"),
        ('How many tracks were composed by "{0}"?', ["track"], "SELECT COUNT(*) FROM track WHERE composer = {0}"),
    ],
    "track": [
        ('Which album contains the track "{0}"?', ["album", "track"],
         "SELECT album.title FROM album JOIN track ON track.album_id = album.id WHERE track.name = {0}"),
        ('What genre is the track "{0}"?', ["genre", "track"],
         "SELECT genre.name FROM genre JOIN track ON track.genre_id = genre.id WHERE track.name = {0}"),
        ('Who composed the track "{0}"?', ["track"], "SELECT composer FROM track WHERE name = {0}"),
        ('How long in milliseconds is the track "{0}"?', ["track"],
         "SELECT milliseconds FROM track WHERE name = {0}"),
    ],
    "customer": [
        ("How many invoices does the customer {0} {1} have?", ["customer", "invoice"],
         f"SELECT COUNT(*) FROM {_IC} WHERE {_CUST}"),
        ("What is the total of all invoices of the customer {0} {1}?", ["customer", "invoice"],
         f"SELECT SUM(invoice.total) FROM {_IC} WHERE {_CUST}"),
        ("Which country does the customer {0} {1} live in?", ["customer"],
         "SELECT country FROM customer WHERE first_name = {0} AND last_name = {1}"),
    ],
}

# slot -> query listing its candidate values (one or two text columns)
_SLOT_VALUES: dict[str, str] = {
    "artist": "SELECT DISTINCT artist.name FROM artist JOIN album ON album.artist_id = artist.id",
    "album": "SELECT title FROM album GROUP BY title HAVING COUNT(*) = 1",
    "genre": "SELECT DISTINCT genre.name FROM genre JOIN track ON track.genre_id = genre.id",
    "country": "SELECT DISTINCT country FROM customer",
    "city": "SELECT DISTINCT city FROM customer",
    "composer": "SELECT DISTINCT composer FROM track WHERE composer IS NOT NULL AND length(composer) <= 30 "
    "AND composer NOT LIKE '%,%' AND composer NOT LIKE '%/%' AND composer NOT LIKE '%&%'",
    "track": "SELECT name FROM track WHERE length(name) <= 40 GROUP BY name HAVING COUNT(*) = 1",
    "customer": "SELECT first_name, last_name FROM customer",
}


def quote(value: str) -> str:
    """SQL string literal for ``value`` (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def slot_values(slot: str) -> list[tuple[str, ...]]:
    """Candidate values of a slot type, as tuples of strings, without double quotes."""
    rows = run_query(_SLOT_VALUES[slot], timeout=30.0)
    return sorted({tuple(str(v) for v in row) for row in rows if all(v and '"' not in str(v) for v in row)})


def _accept(rows: list[tuple[Any, ...]], is_list: bool) -> bool:
    """Keep questions whose gold result is non-empty, non-null, not zero and (lists) not too long."""
    if not rows or any(v is None for row in rows for v in row):
        return False
    if is_list:
        return len(rows) <= MAX_LIST_ROWS
    return len(rows) == 1 and rows[0][0] != 0


def _candidates(values_of_slot: dict[str, list[tuple[str, ...]]], rng: random.Random) -> list[list[dict[str, Any]]]:
    """Per template, its shuffled candidate questions for the slot values of one split."""
    groups = []
    for slot, templates in TEMPLATES.items():
        for number, (question, tables, sql) in enumerate(templates):
            values = list(values_of_slot[slot])
            rng.shuffle(values)
            schema = schema_text(tables)
            groups.append([
                {"question": question.format(*v), "schema": schema, "gold": sql.format(*(quote(x) for x in v)),
                 "template": f"{slot}-{number}", "slot": slot, "slot_value": list(v)}
                for v in values
            ])
    return groups


def _pick(groups: list[list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Round-robin over templates, running each gold query and keeping the accepted ones."""
    cursors = [iter(g) for g in groups]
    picked: list[dict[str, Any]] = []
    active = list(range(len(groups)))
    while active and len(picked) < limit:
        still = []
        for t in active:
            for cand in cursors[t]:
                rows = run_query(cand["gold"], timeout=30.0)
                if _accept(rows, is_list=cand["question"].startswith("List")):
                    picked.append({**cand, "result": [list(r) for r in rows]})
                    still.append(t)
                    break
            if len(picked) >= limit:
                break
        active = still
    return picked


def generate() -> dict[str, list[Example]]:
    """Build the train/dev/test examples of the SQL domain (deterministic)."""
    rng = rng_for(DOMAIN, "slots")
    parts = {slot: split_values(slot_values(slot), rng, (0.2, 0.1, 0.7)) for slot in TEMPLATES}
    out: dict[str, list[Example]] = {}
    for index, split in enumerate(("test", "dev", "train")):
        split_rng = rng_for(DOMAIN, split)
        picked = _pick(_candidates({s: p[index] for s, p in parts.items()}, split_rng), SIZES[split])
        split_rng.shuffle(picked)
        items = []
        for item, k in zip(picked, assign_phrasings(len(picked), split, len(PHRASINGS), HELD_OUT)):
            prompt = PHRASINGS[k].format(schema=item["schema"], question=item["question"])
            meta = {key: item[key] for key in ("template", "slot", "slot_value")}
            meta.update(gold_sql=item["gold"], gold_result=item["result"])
            items.append((prompt, item["gold"], k, meta))
        out[split] = make_examples(DOMAIN, split, items)
    return {s: out[s] for s in ("train", "dev", "test")}
