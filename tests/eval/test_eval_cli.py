"""``jaxsql eval --predictions``: every layout, official rewrites, bad input, outputs and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jaxsql.cli import main
from jaxsql.official.bird import BIRD_SEPARATOR
from tests.eval.conftest import QUESTIONS, make_db

EX_METRICS = ("bird_ex", "spider_ex", "think2sql_ex", "ex_set", "ex_bag", "ex_bag_rowfree", "ex_ordered")
SCORES = ("cell_precision", "cell_recall", "tuple_cardinality", "tuple_constraint", "tuple_order", "cp_cr_tc", "qatch")


def run(capsys, *argv):
    code = main(["eval", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def spider_file(tmp_path: Path, sqls) -> Path:
    p = tmp_path / "pred.sql"
    p.write_text("\n".join(sqls) + "\n")
    return p


# --- gold against gold ------------------------------------------------------------------------------


def test_gold_vs_gold_spider_layout(capsys, tmp_path, spider_root):
    pred = spider_file(tmp_path, [sql for _, sql, _ in QUESTIONS])
    code, out, _ = run(capsys, "--predictions", pred, "--data", f"spider:{spider_root}:dev", "--out", tmp_path / "o")
    assert code == 0
    s = metrics(tmp_path / "o")["summary"]
    assert all(s[m] == 1.0 for m in EX_METRICS + SCORES), s
    assert s["error_rate"] == 0.0 and s["skipped"] == 0 and s["n"] == len(QUESTIONS)
    assert (tmp_path / "o" / "predictions.sql").read_text() == pred.read_text()
    assert "| `spider_ex` | Spider test-suite exec_eval.py | 100.00 |" in out
    assert out == (tmp_path / "o" / "metrics.md").read_text()


def test_gold_vs_gold_bird_layout(capsys, tmp_path, bird_root):
    data = {str(i): f"{sql}{BIRD_SEPARATOR}shop" for i, (_, sql, _) in enumerate(QUESTIONS)}
    pred = tmp_path / "predict_dev.json"
    pred.write_text(json.dumps(data))
    code, out, _ = run(capsys, "--predictions", pred, "--data", f"bird:{bird_root}:dev", "--out", tmp_path / "o")
    assert code == 0
    m = metrics(tmp_path / "o")
    assert all(m["summary"][k] == 1.0 for k in EX_METRICS + SCORES)
    assert set(m["breakdowns"]) == {"simple", "moderate", "challenging"}
    assert m["breakdowns"]["challenging"]["n"] == 2 and m["breakdowns"]["simple"]["bird_ex"] == 1.0
    assert json.loads((tmp_path / "o" / "predict_dev.json").read_text()) == data
    assert m["budgets"]["timeout_s"] == 300.0 and m["budgets"]["max_vm_steps"] == 500_000_000
    assert m["limits"] == {"deadline": 0, "vm_steps": 0, "rows": 0, "bytes": 0} and m["gold_vm_steps_max"] >= 0
    assert {x["name"] for x in m["metrics"]} >= set(EX_METRICS)


def test_the_official_rewrites_run_their_own_queries(capsys, tmp_path, spider_root):
    # the test suite drops DISTINCT and keeps the first statement; the sandbox runs the text as written
    root = tmp_path / "spider"
    shutil.copytree(spider_root, root)
    questions = [("q0", "SELECT DISTINCT cat FROM items WHERE cat IS NOT NULL"), ("q1", "SELECT count(*) FROM items"),
                 ("q2", "SELECT name FROM items WHERE price < 3")]
    (root / "dev.json").write_text(json.dumps([{"db_id": "shop", "question": q, "query": s} for q, s in questions]))
    # a second test-suite database on which the lucky third prediction is wrong
    make_db(root / "database" / "shop" / "shop_suite.sqlite",
            items=[(1, "pen", 9.0, "office"), (2, "ink", 2.0, "office"), (3, "cup", 1.0, "kitchen")])
    preds = ["SELECT cat FROM items WHERE cat IS NOT NULL", "SELECT count(*) FROM items; SELECT 1",
             "SELECT name FROM items WHERE id IN (1, 2)"]
    code, _, _ = run(capsys, "--predictions", spider_file(tmp_path, preds), "--data", f"spider:{root}",
                     "--out", tmp_path / "o")
    assert code == 0
    r = rows(tmp_path / "o")
    assert [x["spider_ex"] for x in r] == [True, True, False]
    assert [x["bird_ex"] for x in r] == [True, False, True]  # the sandbox refuses two statements
    assert r[0]["ex_bag"] is False and r[1]["error"] == "denied"
    code, _, _ = run(capsys, "--predictions", spider_file(tmp_path, preds), "--data", f"spider:{root}",
                     "--out", tmp_path / "o2", "--keep-distinct", "--no-test-suite")
    # keep_distinct also skips sqlparse, so the two statements reach SQLite, which refuses them
    assert [x["spider_ex"] for x in rows(tmp_path / "o2")] == [False, False, True]


def test_a_folder_of_unrelated_databases_is_no_test_suite(capsys, tmp_path):
    # JSONL (and synthetic, WikiTQ) data keep many unrelated databases in one folder
    make_db(tmp_path / "dbs" / "shop.sqlite")
    make_db(tmp_path / "dbs" / "other.sqlite", items=[(9, "zzz", 0.5, "garden")])
    data = tmp_path / "dbs" / "dev.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "db_path": "shop.sqlite", "question": q, "gold_sql": sql})
                            + "\n" for i, (q, sql, _) in enumerate(QUESTIONS)))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"id": f"q{i}", "sql": sql}) + "\n" for i, (_, sql, _) in enumerate(QUESTIONS)))
    code, _, _ = run(capsys, "--predictions", pred, "--data", f"jsonl:{data}", "--out", tmp_path / "o")
    assert code == 0
    m = metrics(tmp_path / "o")
    assert m["summary"]["spider_ex"] == 1.0 and m["config"]["test_suite"] is False


def test_geoquery_gold_vs_gold(capsys, tmp_path, real_data):
    from data.readers import read_examples

    examples = read_examples("geoquery", real_data / "geoquery")
    pred = tmp_path / "gold.jsonl"
    pred.write_text("".join(json.dumps({"id": e.id, "sql": e.gold_sql}) + "\n" for e in examples))
    code, _, _ = run(capsys, "--predictions", pred, "--data", f"geoquery:{real_data / 'geoquery'}",
                     "--out", tmp_path / "o")
    assert code == 0
    m = metrics(tmp_path / "o")
    s = m["summary"]
    assert all(s[k] == 1.0 for k in EX_METRICS + SCORES), s
    assert s["error_rate"] == 0.0 and s["n"] == len(examples)
    # gold queries SQLite cannot run are skipped (left out of the means) and counted with their reason
    assert s["n_scored"] + s["skipped"] == s["n"] and set(m["skipped"]) <= {"gold_failed:syntax"}
    assert m["predictions_file"] == "predictions.jsonl"


@pytest.mark.parametrize("layout", ["jsonl", "tsv"])
def test_wikitq_gold_answers_score_100_percent(capsys, tmp_path, real_data, layout):
    from data.readers import read_examples

    root = real_data / "wikitq"
    examples = read_examples("wikitq", root)
    pred = tmp_path / f"gold.{layout}"
    if layout == "jsonl":
        pred.write_text("".join(json.dumps({"id": e.id, "answer": list(e.gold_answers)}) + "\n" for e in examples))
    else:
        pred.write_text("".join("\t".join([e.id, *e.gold_answers]) + "\n" for e in examples))
    code, _, _ = run(capsys, "--predictions", pred, "--data", f"wikitq:{root}:test", "--out", tmp_path / "o")
    assert code == 0
    m = metrics(tmp_path / "o")
    assert m["summary"]["wikitq_accuracy"] == 1.0 and m["summary"]["n"] == len(examples) == 4344
    assert m["summary"]["denotation_exact"] == 1.0
    assert m["wikitq_canonical_forms"] == "computed"
    written = (tmp_path / "o" / "predictions.tsv").read_text().splitlines()
    assert written[0].split("\t")[0] == examples[0].id and len(written) == len(examples)


def test_the_vm_step_budget_decides_and_is_reported(capsys, tmp_path, spider_root):
    loop = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    sqls = [loop] + [sql for _, sql, _ in QUESTIONS[1:]]
    args = ("--predictions", spider_file(tmp_path, sqls), "--data", f"spider:{spider_root}", "--max-vm-steps",
            200_000)
    assert run(capsys, *args, "--out", tmp_path / "a")[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "b", "--workers", 1)[0] == 0
    a, b = rows(tmp_path / "a")[0], rows(tmp_path / "b")[0]
    assert a["error"] == "timeout" and a["limit"] == "vm_steps" and a["vm_steps"] == b["vm_steps"] >= 200_000
    m = metrics(tmp_path / "a")
    assert m["budgets"]["max_vm_steps"] == 200_000 and m["limits"]["vm_steps"] == 1
    assert m["summary"]["bird_ex"] == 0.9 and m["config"]["max_vm_steps"] == 200_000


# --- bad input ------------------------------------------------------------------------------------


def test_prediction_file_problems_are_named_and_missing_ones_count_as_wrong(capsys, tmp_path, spider_root):
    lines = [sql for _, sql, _ in QUESTIONS[:6]]  # the last four are missing
    code, _, err = run(capsys, "--predictions", spider_file(tmp_path, lines[:3] + [""] + lines[3:]),
                       "--data", f"spider:{spider_root}", "--out", tmp_path / "o")
    assert code == 0
    assert "4 missing (spider-dev-6, spider-dev-7, spider-dev-8, spider-dev-9)" in err
    assert "1 blank lines (line 4)" in err and len(err.strip().splitlines()) == 1
    m = metrics(tmp_path / "o")
    assert m["missing_ids"] == [f"spider-dev-{i}" for i in range(6, 10)]
    assert m["summary"]["bird_ex"] == 0.6 and m["summary"]["error_rate"] == 0.4
    assert [r["error"] for r in rows(tmp_path / "o")][6:] == ["missing"] * 4


def test_jsonl_and_bird_problems(capsys, tmp_path, bird_root):
    sqls = [sql for _, sql, _ in QUESTIONS]
    bird = {str(i): f"{s}{BIRD_SEPARATOR}shop" for i, s in enumerate(sqls)}
    bird.update({"3": f"{sqls[3]}{BIRD_SEPARATOR}other_db", "4": 7, "5": "no separator", "99": "x", "a": "y"})
    pred = tmp_path / "predict_dev.json"
    pred.write_text(json.dumps(bird))
    code, _, err = run(capsys, "--predictions", pred, "--data", f"bird:{bird_root}", "--out", tmp_path / "o")
    assert code == 0
    assert "2 extra (key '99', key 'a')" in err and "2 unparseable (key '4', key '5')" in err
    assert "1 wrong database (key '3' names 'other_db', not 'shop')" in err
    assert metrics(tmp_path / "o")["summary"]["bird_ex"] == 0.7
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": "bird-dev-0", "sql": "SELECT 1"}\n{"id": "bird-dev-0", "sql": "SELECT 2"}\n'
                     'not json\n{"id": "nope", "sql": "SELECT 1"}\n{"id": "bird-dev-1"}\n')
    code, _, err = run(capsys, "--predictions", jsonl, "--format", "jsonl", "--data", f"bird:{bird_root}",
                       "--out", tmp_path / "o2", "--strict")
    assert code == 1 and err.startswith("error: --predictions") and len(err.strip().splitlines()) == 1
    assert "1 duplicates (id 'bird-dev-0' (line 2; the first is kept))" in err and "id 'nope'" in err
    assert "line 3" in err and "line 5 (needs 'sql' or 'answer')" in err
    assert not (tmp_path / "o2").exists()


def _no_tokenizer_model(tmp_path: Path) -> Path:
    from models.testing import save_random_checkpoint

    return save_random_checkpoint(tmp_path / "model", "tiny", seed=0)


@pytest.mark.parametrize("argv,code,message", [
    (["--data", "spider:{spider}:test"], 1, "spider: unknown split 'test'"),
    (["--data", "bird:{spider}:dev"], 1, "needs string fields db_id, question, SQL"),
    (["--data", "bird:{spider}/database:dev"], 1, "BIRD questions file not found"),
    (["--data", "spider:{missing}"], 1, "Spider directory not found"),
    (["--data", "nope:{spider}"], 2, "unknown source 'nope'"),
    (["--data", "spider"], 2, "expected SOURCE:PATH[:SPLIT]"),
    (["--data", "jsonl:{spider}/dev.json:dev"], 1, "a JSONL file is one split"),
])
def test_bad_data_is_one_line_and_writes_nothing(capsys, tmp_path, spider_root, argv, code, message):
    pred = spider_file(tmp_path, ["SELECT 1"])
    argv = [a.format(spider=spider_root, missing=tmp_path / "missing") for a in argv]
    got, _, err = run(capsys, "--predictions", pred, *argv, "--out", tmp_path / "o")
    assert got == code and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_model_and_output_directories(capsys, tmp_path, spider_root):
    model = _no_tokenizer_model(tmp_path)
    code, _, err = run(capsys, "--model", model, "--data", f"spider:{spider_root}", "--out", tmp_path / "o")
    assert code == 1 and "no tokenizer files" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "--model", tmp_path / "nowhere", "--data", f"spider:{spider_root}",
                       "--out", tmp_path / "o")
    assert code == 1 and "not a directory" in err and not (tmp_path / "o").exists()
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    pred = spider_file(tmp_path, [sql for _, sql, _ in QUESTIONS])
    code, _, err = run(capsys, "--predictions", pred, "--data", f"spider:{spider_root}", "--out", foreign)
    assert code == 1 and "not a jaxsql eval output" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    code, _, _ = run(capsys, "--predictions", pred, "--data", f"spider:{spider_root}", "--out", tmp_path / "o")
    assert code == 0
    code, _, err = run(capsys, "--predictions", pred, "--data", f"spider:{spider_root}", "--out", tmp_path / "o",
                       "--keep-distinct")
    assert code == 1 and "different settings (keep_distinct)" in err
    code, _, err = run(capsys, "--predictions", tmp_path / "none.sql", "--data", f"spider:{spider_root}",
                       "--out", tmp_path / "o3")
    assert code == 1 and "file not found" in err and not (tmp_path / "o3").exists()
    for flag, value in (("--timeout", "inf"), ("--timeout", "0"), ("--workers", "0"), ("--max-vm-steps", "-1")):
        code, _, err = run(capsys, "--predictions", pred, "--data", f"spider:{spider_root}", flag, value,
                           "--out", tmp_path / "o4")
        assert code == 2 and flag in err and not (tmp_path / "o4").exists()


# --- resume ---------------------------------------------------------------------------------------


def test_rerun_skips_finished_examples_and_survives_a_torn_line(capsys, tmp_path, spider_root):
    pred = spider_file(tmp_path, [sql for _, sql, _ in QUESTIONS])
    args = ("--predictions", pred, "--data", f"spider:{spider_root}", "--out", tmp_path / "o")
    assert run(capsys, *args)[0] == 0
    first = rows(tmp_path / "o")
    kept = [dict(r, marker="kept") for r in first[:4]]  # a mark only the first run's rows carry
    text = "".join(json.dumps(r) + "\n" for r in kept) + json.dumps(first[4])[:25]  # killed mid-line
    (tmp_path / "o" / "results.jsonl").write_text(text)
    assert run(capsys, *args)[0] == 0
    again = rows(tmp_path / "o")
    assert [r.get("marker") for r in again] == ["kept"] * 4 + [None] * (len(QUESTIONS) - 4)
    assert [{k: v for k, v in r.items() if k != "marker"} for r in again] == first
    assert metrics(tmp_path / "o")["summary"]["bird_ex"] == 1.0
