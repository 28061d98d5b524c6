"""Fixtures of the evaluation tests: one small real SQLite database in the Spider and BIRD layouts."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.sql.conftest import tiny_db  # noqa: F401 - re-exported fixture

#: (question, gold SQL, BIRD difficulty): duplicates, NULLs, ORDER BY outside and inside a
#: subquery, DISTINCT, a BLOB, an empty result, a float.
QUESTIONS = [
    ("how many items?", "SELECT count(*) FROM items", "simple"),
    ("names by price", "SELECT name FROM items ORDER BY price DESC, id", "moderate"),
    ("categories", "SELECT DISTINCT cat FROM items", "simple"),
    ("items per category", "SELECT cat, COUNT(*) FROM items GROUP BY cat", "moderate"),
    ("cheap items", "SELECT name, price FROM items WHERE price < 3", "simple"),
    ("two cheapest", "SELECT name FROM items WHERE id IN (SELECT id FROM items ORDER BY price LIMIT 2)",
     "challenging"),
    ("raw data", "SELECT data FROM blobs", "challenging"),
    ("no category", "SELECT name FROM items WHERE cat IS NULL", "simple"),
    ("expensive", "SELECT name FROM items WHERE price > 1000", "simple"),
    ("average price", "SELECT avg(price) FROM items", "moderate"),
]
ITEMS = [(1, "pen", 1.5, "office"), (2, "ink", 2.25, "office"), (3, "cup", 4.0, "kitchen"),
         (4, "mug", 4.0, "kitchen"), (5, "box", 7.1, None)]


def make_db(path: Path, items=ITEMS) -> Path:
    """items(id, name, price, cat) and blobs(data): duplicates per category, a NULL, a BLOB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, cat TEXT)")
    con.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", items)
    con.execute("CREATE TABLE blobs (data BLOB)")
    con.execute("INSERT INTO blobs VALUES (x'00ff10')")
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="session")
def spider_root(tmp_path_factory) -> Path:
    """A Spider layout: dev.json and database/shop/shop.sqlite."""
    root = tmp_path_factory.mktemp("spider")
    make_db(root / "database" / "shop" / "shop.sqlite")
    (root / "dev.json").write_text(json.dumps([{"db_id": "shop", "question": q, "query": sql}
                                               for q, sql, _ in QUESTIONS]))
    return root


@pytest.fixture(scope="session")
def bird_root(tmp_path_factory) -> Path:
    """A BIRD layout: dev.json (with difficulty) and dev_databases/shop/shop.sqlite."""
    root = tmp_path_factory.mktemp("bird")
    make_db(root / "dev_databases" / "shop" / "shop.sqlite")
    (root / "dev.json").write_text(json.dumps([
        {"question_id": i, "db_id": "shop", "question": q, "evidence": "", "SQL": sql, "difficulty": d}
        for i, (q, sql, d) in enumerate(QUESTIONS)]))
    return root
