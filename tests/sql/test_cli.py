"""`jaxsql exec`, `jaxsql compare`, `jaxsql bench sql` through the real dispatcher."""

import json

import pytest

from jaxsql.cli import main

from .conftest import file_hash


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_exec_ok(capsys, tiny_db):
    code, out, _ = run(capsys, "exec", str(tiny_db), "SELECT name, age FROM people WHERE id < 3 ORDER BY id")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True and data["columns"] == ["name", "age"] and data["rows"] == [["Ann", 30], ["Bob", 25]]


def test_exec_failure_is_data(capsys, tiny_db, tmp_path):
    before = file_hash(tiny_db)
    code, out, _ = run(capsys, "exec", str(tiny_db), "DROP TABLE people")
    assert code == 0 and json.loads(out) == {**json.loads(out), "ok": False, "error": "denied"}
    code, out, _ = run(capsys, "exec", str(tmp_path / "none.db"), "SELECT 1")
    assert code == 0 and json.loads(out)["error"] == "db_missing"
    assert not (tmp_path / "none.db").exists()
    code, out, _ = run(capsys, "exec", str(tiny_db), "SELECT x FROM big", "--max-rows", "10")
    assert code == 0 and json.loads(out)["error"] == "too_large"
    code, out, _ = run(capsys, "exec", str(tiny_db),
                       "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c) SELECT count(*) FROM c",
                       "--timeout", "0.2")
    assert code == 0 and json.loads(out)["error"] == "timeout"
    assert file_hash(tiny_db) == before


def test_exec_usage_errors(capsys, tiny_db):
    with pytest.raises(SystemExit) as e:
        main(["exec", str(tiny_db)])
    assert e.value.code == 2
    code, _, err = run(capsys, "exec", str(tiny_db), "SELECT 1", "--timeout", "0")
    assert code == 2 and "--timeout" in err
    code, _, err = run(capsys, "exec", str(tiny_db), "SELECT 1", "--max-rows", "0")
    assert code == 2 and "--max-rows" in err


def test_compare_with_gold_sql(capsys, tiny_db):
    code, out, _ = run(capsys, "compare", str(tiny_db), "--pred", "SELECT name FROM people",
                       "--gold", "SELECT name FROM people WHERE city = 'Paris'")
    assert code == 0
    data = json.loads(out)
    m, r = data["metrics"], data["rewards"]
    assert m["ex_set"] is False and m["cell_precision"] == 0.5 and m["cell_recall"] == 1.0
    assert m["tuple_cardinality"] == 0.5
    assert r == {"execution": 0.0, "qatch": 0.667, "gated": 0.0, "format": 0.0, "arctic": 0.1}
    assert data["gold"]["rows"] == [["Ann"], ["Cid"]]


def test_compare_with_answers(capsys, tiny_db):
    code, out, _ = run(capsys, "compare", str(tiny_db), "--pred",
                       "<think>count</think><answer>SELECT count(*) FROM people</answer>", "--answer", "4")
    data = json.loads(out)
    assert code == 0 and data["gold"] is None
    assert data["metrics"]["denotation_exact"] is True
    assert data["rewards"] == {"execution": 1.0, "qatch": 1.0, "gated": 1.0, "format": 1.0, "arctic": 1.0}


def test_compare_needs_gold_or_answer(tiny_db):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tiny_db), "--pred", "SELECT 1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tiny_db), "--pred", "SELECT 1", "--gold", "SELECT 1", "--answer", "1"])
    assert e.value.code == 2


def test_bench_sql_small(capsys):
    code, out, _ = run(capsys, "bench", "sql", "--json", "--queries", "24", "--rows", "3000", "--workers", "2")
    assert code == 0
    data = json.loads(out)
    assert data["queries"] == 24 and data["errors"] == 0 and data["pool_matches_serial"] is True
    assert data["serial_qps"] > 0 and data["pool_qps"] > 0 and data["cache_executed"] <= 3


def test_exec_vm_step_budget_and_bad_timeouts(capsys, tiny_db):
    slow = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c) SELECT count(*) FROM c"
    code, out, _ = run(capsys, "exec", str(tiny_db), slow, "--timeout", "60", "--max-vm-steps", "100000")
    data = json.loads(out)
    assert code == 0 and data["error"] == "timeout" and data["limit"] == "vm_steps" and data["vm_steps"] == 100000
    for bad in ("inf", "nan", "-1"):
        code, _, err = run(capsys, "exec", str(tiny_db), "SELECT 1", "--timeout", bad)
        assert code == 2 and "--timeout" in err and "Traceback" not in err
    code, _, err = run(capsys, "exec", str(tiny_db), "SELECT 1", "--max-vm-steps", "0")
    assert code == 2 and "--max-vm-steps" in err
