"""Small real SQLite databases for the SQL room's tests."""

import hashlib
import sqlite3
from pathlib import Path

import pytest


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory) -> Path:
    """people(id, name, age, city), big(x) with 3,000 rows, odd(v) with a BLOB and invalid UTF-8 text."""
    path = tmp_path_factory.mktemp("db") / "tiny.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, city TEXT)")
    con.executemany(
        "INSERT INTO people VALUES (?, ?, ?, ?)",
        [(1, "Ann", 30, "Paris"), (2, "Bob", 25, "Rome"), (3, "Cid", 35, "Paris"), (4, "Dee", None, "Oslo")],
    )
    con.execute("CREATE TABLE big (x INTEGER)")
    con.executemany("INSERT INTO big VALUES (?)", [(i,) for i in range(3000)])
    con.execute("CREATE TABLE odd (v)")
    con.execute("INSERT INTO odd VALUES (x'00ff10')")
    con.execute("INSERT INTO odd VALUES (CAST(x'41ff42' AS TEXT))")
    con.execute("INSERT INTO odd VALUES (2.5)")
    con.commit()
    con.close()
    return path
