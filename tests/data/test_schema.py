"""Schema serialisation: DDL and compact styles, comments, evidence, truncation."""

import sqlite3

import pytest

from data.schema import (default_count_tokens, read_sqlite_schema, serialize_schema, spider_tables_schema,
                         tables_in_sql)
from jaxsql.errors import JaxsqlError


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "t.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INT);
        CREATE TABLE song (id INTEGER PRIMARY KEY, singer_id INT REFERENCES singer(id), title TEXT);
        CREATE TABLE extra (a TEXT, b TEXT, c TEXT, d TEXT, e TEXT);
        INSERT INTO singer VALUES (1, 'Ann', 30), (2, 'Bob', 41), (3, 'Cy''d', NULL), (4, 'Dee', 22);
        INSERT INTO song VALUES (1, 1, 'Hello'), (2, 2, 'World');
    """)
    conn.commit()
    conn.close()
    return path


def test_ddl_exact(db):
    text = serialize_schema(db, sample_values=2)
    assert text.split("\n\n")[0] == (
        "CREATE TABLE singer (\n"
        "  id INTEGER PRIMARY KEY,  -- e.g. 1, 2\n"
        "  name TEXT,  -- e.g. 'Ann', 'Bob'\n"
        "  age INT  -- e.g. 30, 41\n"
        ");"
    )
    assert "  FOREIGN KEY (singer_id) REFERENCES singer(id)\n);" in text
    # Each statement parses as SQL once comments are stripped.
    conn = sqlite3.connect(":memory:")
    conn.executescript(text)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["singer", "song", "extra"]


def test_compact_comments_evidence(db):
    text = serialize_schema(db, style="compact", sample_values=0, evidence="age in years",
                            column_comments={"singer": {"name": "full name"}})
    lines = text.splitlines()
    assert lines[0] == "singer(id int, name text, age int)"
    assert "-- singer.name: full name" in lines
    assert "-- song.singer_id -> singer.id" in lines
    assert lines[-1] == "-- Evidence: age in years"
    with pytest.raises(JaxsqlError, match="style"):
        serialize_schema(db, style="xml")
    with pytest.raises(JaxsqlError, match="not found"):
        serialize_schema(db.parent / "missing.sqlite")


def test_truncation_keeps_gold_tables(db):
    gold = "SELECT T1.name FROM singer AS T1 JOIN song AS T2 ON T1.id = T2.singer_id"
    keep = tables_in_sql(gold)
    assert keep == {"singer", "song"}
    full = serialize_schema(db)
    budget = default_count_tokens(serialize_schema(db, sample_values=0)) - 10
    cut = serialize_schema(db, max_tokens=budget, keep_tables=keep)
    assert default_count_tokens(cut) <= budget < default_count_tokens(full)
    assert "CREATE TABLE singer" in cut and "CREATE TABLE song" in cut and "extra" not in cut
    assert serialize_schema(db, max_tokens=10**6) == full


def test_tables_in_sql_ignores_ctes():
    assert tables_in_sql("WITH s AS (SELECT * FROM a) SELECT * FROM s JOIN b ON 1") == {"a", "b"}
    assert tables_in_sql("not sql at all ((") == set()


def test_spider_entry():
    entry = {"db_id": "x", "table_names_original": ["A", "B"],
             "column_names_original": [[-1, "*"], [0, "id"], [1, "a_id"], [1, "v"]],
             "column_types": ["text", "number", "number", "text"], "primary_keys": [1],
             "foreign_keys": [[2, 1]]}
    tables = spider_tables_schema(entry)
    assert serialize_schema(tables, style="compact") == "A(id num)\nB(a_id num, v text)\n-- B.a_id -> A.id"
    with pytest.raises(JaxsqlError, match="'x'"):
        spider_tables_schema({"db_id": "x"})


def test_read_schema_samples(db):
    tables = read_sqlite_schema(db, sample_values=5)
    assert tables[0].columns[1].samples == ("'Ann'", "'Bob'", "'Cy''d'", "'Dee'")
    assert tables[0].columns[2].samples == ("30", "41", "22")
