"""Hostile SQL: every item of issue 2's "Bad input gets" list.

Each query returns an error kind within the deadline + 0.5 s, the database
file's bytes do not change, nothing is created, and the pool keeps working.
"""

import time

import pytest

from jaxsql.sql import SqlPool, execute

from .conftest import file_hash

DEADLINE = 1.0
DEEP = 10_000

HOSTILE = [
    ("insert", "INSERT INTO people VALUES (9, 'Eve', 1, 'X')", "denied"),
    ("insert_select", "INSERT INTO big SELECT x FROM big", "denied"),
    ("update", "UPDATE people SET age = 0", "denied"),
    ("delete", "DELETE FROM people", "denied"),
    ("replace", "REPLACE INTO people VALUES (1, 'Z', 1, 'Z')", "denied"),
    ("create_table", "CREATE TABLE evil (a)", "denied"),
    ("create_temp", "CREATE TEMP TABLE evil AS SELECT 1", "denied"),
    ("create_index", "CREATE INDEX i ON people(name)", "denied"),
    ("create_view", "CREATE VIEW v AS SELECT 1", "denied"),
    ("create_trigger", "CREATE TRIGGER tr AFTER INSERT ON people BEGIN SELECT 1; END", "denied"),
    ("alter", "ALTER TABLE people ADD COLUMN evil", "denied"),
    ("drop_table", "DROP TABLE people", "denied"),
    ("drop_index", "DROP INDEX IF EXISTS sqlite_autoindex_people_1", "denied"),
    ("attach", "ATTACH DATABASE '/tmp/jaxsql-evil.db' AS evil", "denied"),
    ("attach_memory", "ATTACH ':memory:' AS m", "denied"),
    ("detach", "DETACH DATABASE main", "denied"),
    ("pragma_writable_schema", "PRAGMA writable_schema = 1", "denied"),
    ("pragma_journal", "PRAGMA journal_mode = DELETE", "denied"),
    ("pragma_query_only_off", "PRAGMA query_only = 0", "denied"),
    ("pragma_user_version", "PRAGMA user_version = 7", "denied"),
    ("load_extension", "SELECT load_extension('/tmp/evil.so')", "denied"),
    ("vacuum", "VACUUM", "denied"),
    ("vacuum_into", "VACUUM INTO '/tmp/jaxsql-evil-copy.db'", "denied"),
    ("analyze", "ANALYZE", "denied"),
    ("begin", "BEGIN IMMEDIATE", "denied"),
    ("savepoint", "SAVEPOINT s", "denied"),
    ("infinite_recursive_cte", "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c", "timeout"),
    ("cartesian", "SELECT count(*) FROM big a, big b, big c", "timeout"),
    ("cartesian_sorted", "SELECT a.x FROM big a, big b, big c ORDER BY a.x + b.x + c.x DESC LIMIT 1", "timeout"),
    ("randomblob", "SELECT randomblob(1000000000)", "too_large"),
    ("zeroblob", "SELECT zeroblob(1000000000)", "too_large"),
    ("blob_rows", "SELECT randomblob(500000) FROM big", "too_large"),
    ("deep_parentheses", "SELECT " + "(" * DEEP + "1" + ")" * DEEP, "too_large"),
    ("deep_unary", "SELECT " + "-" * DEEP + "1", "too_large"),
    ("deep_subqueries", "SELECT " + "(SELECT " * DEEP + "1" + ")" * DEEP, "too_large"),
    ("invalid_utf8_sql", "SELECT '\udcff'", "syntax"),
    ("nul_in_sql", "SELECT 1\x00; DROP TABLE people", "syntax"),
    ("several_statements", "SELECT 1; DROP TABLE people", "denied"),
    ("several_selects", "SELECT 1; SELECT 2", "denied"),
    ("empty", "", "syntax"),
]


@pytest.mark.parametrize("name,sql,kind", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_query_returns_error_kind_in_time(tiny_db, name, sql, kind):
    before = file_hash(tiny_db)
    start = time.perf_counter()
    r = execute(tiny_db, sql, timeout_s=DEADLINE)
    elapsed = time.perf_counter() - start
    assert not r.ok, (name, r)
    assert r.error is not None and r.error != "db_missing"
    if kind == "too_large" and name.startswith("deep_"):
        assert r.error in ("too_large", "syntax"), r  # SQLite reports some depth limits as parse errors
    else:
        assert r.error == kind, (name, r)
    assert elapsed < DEADLINE + 0.5, (name, elapsed)
    assert file_hash(tiny_db) == before
    assert not list(tiny_db.parent.glob("*-journal")) and not list(tiny_db.parent.glob("*-wal"))


def test_missing_database_creates_nothing(tmp_path):
    missing = tmp_path / "nope" / "missing.sqlite"
    r = execute(missing, "SELECT 1")
    assert r.error == "db_missing" and "missing.sqlite" in r.message
    assert not missing.exists() and not missing.parent.exists()
    sibling = tmp_path / "missing.sqlite"
    assert execute(sibling, "SELECT 1").error == "db_missing"
    assert not sibling.exists()
    assert list(tmp_path.iterdir()) == []


def test_not_a_database_is_db_missing(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    r = execute(junk, "SELECT 1")
    assert r.error == "db_missing"
    assert junk.read_bytes() == b"this is not sqlite" * 100


def test_attach_did_not_create_file():
    from pathlib import Path

    assert not Path("/tmp/jaxsql-evil-copy.db").exists()


def test_pool_survives_hostile_batch_and_answers_next(tiny_db, tmp_path):
    before = file_hash(tiny_db)
    jobs = [(str(tiny_db), sql) for _, sql, _ in HOSTILE] + [(str(tmp_path / "missing.db"), "SELECT 1")]
    with SqlPool(2, timeout_s=DEADLINE) as pool:
        pool.execute_batch([(str(tiny_db), "SELECT 1"), (str(tiny_db), "SELECT 2")])  # workers started
        start = time.perf_counter()
        results = pool.execute_batch(jobs)
        elapsed = time.perf_counter() - start
        assert all(not r.ok for r in results)
        assert results[-1].error == "db_missing"
        n_slow = sum(1 for _, _, k in HOSTILE if k == "timeout")
        # slow jobs hold one worker each for at most the deadline
        assert elapsed < (n_slow / 2 + 1) * DEADLINE + 1.0
        nxt = pool.execute_batch([(str(tiny_db), "SELECT count(*) FROM people"), (str(tiny_db), "SELECT 2")])
        assert [r.rows for r in nxt] == [((4,),), ((2,),)]
    assert file_hash(tiny_db) == before
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("sql", ["SELECT printf('%.1000000000c', 'x')", "SELECT format('%.*c', 1000000000, 'x')",
                                 "SELECT printf('%1000000000d', 1)"])
def test_huge_printf_is_null_and_fast(tiny_db, sql):
    # SQLite's printf pads inside one VM instruction (no progress handler) and
    # answers NULL past the length limit; the sandbox answers NULL up front.
    start = time.perf_counter()
    r = execute(tiny_db, sql, timeout_s=DEADLINE)
    assert r.ok and r.rows == ((None,),)
    assert time.perf_counter() - start < 0.5


def test_printf_still_formats(tiny_db):
    r = execute(tiny_db, "SELECT printf('%5.2f|%d|%s|%%|%.*c', 3.14159, 7, 'x', 3, 'z'), format('%d items', 3)")
    assert r.rows == ((" 3.14|7|x|%|zzz", "3 items"),)
