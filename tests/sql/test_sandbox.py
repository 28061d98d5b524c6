"""The sandbox on ordinary queries: values, types, error kinds."""

import json
import math

import pytest

from jaxsql.sql import ERROR_KINDS, ExecResult, execute
from jaxsql.sql.sandbox import PROGRESS_EVERY


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


# -- the VM-step budget (reproducible timeouts) -------------------------------------------

HEAVY = "SELECT count(*) FROM big a, big b WHERE a.x < 40"  # ~120k inner-loop rows, well under a second


def test_vm_steps_are_counted_and_reproducible(tiny_db):
    from jaxsql.sql import SqlPool

    first = execute(tiny_db, HEAVY)
    assert first.ok and first.vm_steps > 10 * PROGRESS_EVERY and first.vm_steps % PROGRESS_EVERY == 0
    # the count does not depend on the connection's history: a pool worker that
    # ran other queries (and this one) before reports the same number
    with SqlPool(1, cache_size=0) as pool:
        runs = pool.execute_batch([(str(tiny_db), "SELECT count(*) FROM big WHERE x % 3 = 0"),
                                   (str(tiny_db), HEAVY), (str(tiny_db), HEAVY)])
    assert [r.vm_steps for r in runs[1:]] == [first.vm_steps] * 2
    assert execute(tiny_db, "SELECT 1").vm_steps == 0


def test_vm_step_budget_stops_query_whatever_the_deadline(tiny_db):
    need = execute(tiny_db, HEAVY).vm_steps
    stopped = execute(tiny_db, HEAVY, timeout_s=600, max_vm_steps=need // 2)
    assert stopped.error == "timeout" and stopped.limit == "vm_steps", stopped
    assert "VM-step budget" in stopped.message
    # it stops at the first check at or past the budget: exactly reproducible
    assert stopped.vm_steps == -(-(need // 2) // PROGRESS_EVERY) * PROGRESS_EVERY
    assert execute(tiny_db, HEAVY, timeout_s=600, max_vm_steps=need + PROGRESS_EVERY).ok
    # a budget below the check interval is checked at its own granularity
    small = execute(tiny_db, "SELECT sum(x) FROM big", max_vm_steps=500)
    assert small.limit == "vm_steps" and small.vm_steps == 500


def test_vm_step_budget_is_independent_of_load(tiny_db):
    """The same budget ends the query at the same count while other threads compete for the CPU."""
    import threading

    from jaxsql.sql import SqlPool

    budget = 10 * PROGRESS_EVERY  # HEAVY needs about 24 checks
    alone = execute(tiny_db, HEAVY, timeout_s=600, max_vm_steps=budget)
    stop = threading.Event()

    def burn():
        while not stop.is_set():
            execute(tiny_db, "SELECT count(*) FROM big a, big b", timeout_s=0.2)

    burners = [threading.Thread(target=burn) for _ in range(3)]
    for t in burners:
        t.start()
    try:
        with SqlPool(2, cache_size=0, timeout_s=600, max_vm_steps=budget) as pool:
            loaded = pool.execute_batch([(str(tiny_db), HEAVY)] * 4)
    finally:
        stop.set()
        for t in burners:
            t.join()
    assert alone.limit == "vm_steps"
    assert [(r.error, r.limit, r.vm_steps) for r in loaded] == [("timeout", "vm_steps", alone.vm_steps)] * 4


def test_limit_names_the_budget(tiny_db):
    assert execute(tiny_db, "SELECT x FROM big", max_rows=10).limit == "rows"
    assert execute(tiny_db, "SELECT printf('%.1000c', 'a') FROM big", max_bytes=100_000).limit == "bytes"
    slow = execute(tiny_db, "SELECT count(*) FROM big a, big b, big c", timeout_s=0.2)
    assert slow.error == "timeout" and slow.limit == "deadline"
    assert execute(tiny_db, "SELEC 1").limit is None and execute(tiny_db, "SELECT 1").limit is None
    assert json.loads(json.dumps(slow.to_json()))["limit"] == "deadline"


def test_exec_result_validates_limit():
    with pytest.raises(ValueError):
        ExecResult(ok=True, limit="deadline")
    with pytest.raises(ValueError):
        ExecResult(ok=False, error="timeout", limit="moon")
    assert ExecResult.failure("timeout", "x", limit="vm_steps").limit == "vm_steps"


@pytest.mark.parametrize("kwargs", [dict(max_vm_steps=0), dict(max_vm_steps=1.5), dict(timeout_s=float("inf")),
                                    dict(timeout_s=float("nan")), dict(timeout_s=-1)])
def test_bad_budgets_raise(tiny_db, kwargs):
    with pytest.raises(ValueError):
        execute(tiny_db, "SELECT 1", **kwargs)
