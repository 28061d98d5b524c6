"""The sandbox on ordinary queries: values, types, error kinds."""

import json
import math

import pytest

from jaxsql.sql import ERROR_KINDS, ExecResult, execute


def test_rows_columns_and_types(tiny_db):
    r = execute(tiny_db, "SELECT name, age FROM people WHERE city = 'Paris' ORDER BY id")
    assert r.ok and r.error is None and r.message == ""
    assert r.columns == ("name", "age")
    assert r.rows == (("Ann", 30), ("Cid", 35))
    assert r.elapsed_s >= 0


def test_null_float_blob_and_invalid_utf8_values(tiny_db):
    r = execute(tiny_db, "SELECT v FROM odd ORDER BY rowid")
    assert r.ok, r.message
    assert r.rows[0] == ("x'00ff10'",)  # BLOBs become x'<hex>' text
    assert r.rows[1] == ("A\ufffdB",)  # invalid UTF-8 decoded with a replacement character
    assert r.rows[2] == (2.5,)
    hash(r)  # rows are hashable
    json.dumps(r.to_json())  # and JSON-ready
    assert execute(tiny_db, "SELECT age FROM people WHERE id = 4").rows == ((None,),)


def test_trailing_semicolon_and_comment_allowed(tiny_db):
    assert execute(tiny_db, "SELECT 1;").rows == ((1,),)
    assert execute(tiny_db, "SELECT 1; -- done").rows == ((1,),)


@pytest.mark.parametrize(
    "sql,kind",
    [
        ("SELEC name FROM people", "syntax"),
        ("SELECT name FROM nowhere", "syntax"),
        ("SELECT nope FROM people", "syntax"),
        ("SELECT name FROM people WHERE", "syntax"),
        ("SELECT abs(-9223372036854775808)", "runtime"),
        ("", "syntax"),
        ("   \n ", "syntax"),
        ("-- just a comment", "syntax"),
    ],
)
def test_error_kinds(tiny_db, sql, kind):
    r = execute(tiny_db, sql)
    assert not r.ok and r.error == kind, r
    assert r.rows == () and r.message


def test_row_cap_is_too_large_not_truncated(tiny_db):
    r = execute(tiny_db, "SELECT x FROM big", max_rows=100)
    assert r.error == "too_large" and "100" in r.message
    assert execute(tiny_db, "SELECT x FROM big", max_rows=3000).ok


def test_byte_cap(tiny_db):
    r = execute(tiny_db, "SELECT printf('%.1000c', 'a') FROM big", max_bytes=100_000)
    assert r.error == "too_large"


def test_to_json_is_strict_json(tiny_db):
    r = execute(tiny_db, "SELECT 1e999, -1e999, 0.5")
    assert r.rows == ((math.inf, -math.inf, 0.5),)
    assert json.loads(json.dumps(r.to_json(), allow_nan=False))["rows"] == [["Infinity", "-Infinity", 0.5]]


def test_to_json_shapes(tiny_db):
    ok = execute(tiny_db, "SELECT 1 AS one").to_json()
    assert ok["ok"] is True and ok["columns"] == ["one"] and ok["rows"] == [[1]]
    bad = execute(tiny_db, "SELEC 1").to_json()
    assert bad["ok"] is False and bad["error"] == "syntax" and "syntax error" in bad["message"]


def test_exec_result_validates_kind():
    with pytest.raises(ValueError):
        ExecResult(ok=False, error="weird")
    with pytest.raises(ValueError):
        ExecResult(ok=True, error="syntax")
    assert set(ERROR_KINDS) == {"syntax", "runtime", "timeout", "too_large", "denied", "db_missing"}


def test_invalid_utf8_sql_text(tiny_db):
    r = execute(tiny_db, "SELECT '\udcff'")
    assert r.error == "syntax" and "UTF-8" in r.message


@pytest.mark.parametrize("kwargs", [dict(timeout_s=0), dict(max_rows=0), dict(max_bytes=0)])
def test_bad_limits_raise(tiny_db, kwargs):
    with pytest.raises(ValueError):
        execute(tiny_db, "SELECT 1", **kwargs)
