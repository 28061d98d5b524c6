"""The synthetic benchmark: deterministic bytes, correct gold answers, disjoint splits."""

import json
import sqlite3
from pathlib import Path

import pytest

from data.schema import tables_in_sql
from data.synthetic import generate_benchmark, load_benchmark
from data.synthetic_templates import DOMAINS, TEMPLATES
from jaxsql.errors import JaxsqlError


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return generate_benchmark(tmp_path_factory.mktemp("synth"), seed=7, n_train=600, n_dev=150)


def test_deterministic_bytes(tmp_path, bench):
    again = generate_benchmark(tmp_path / "again", seed=7, n_train=600, n_dev=150)
    first = {p.name: p.read_bytes() for p in Path(bench.out_dir).iterdir()}
    second = {p.name: p.read_bytes() for p in Path(again.out_dir).iterdir()}
    assert first.keys() == second.keys() and len(first) >= 4 * 4 + 3
    assert first == second
    other = generate_benchmark(tmp_path / "other", seed=8, n_train=600, n_dev=150)
    assert Path(other.out_dir, "train.jsonl").read_bytes() != first["train.jsonl"]


def test_gold_sql_returns_gold_answers(bench):
    for ex in bench.train + bench.dev:
        conn = sqlite3.connect(f"file:{ex.db_path}?mode=ro", uri=True)
        cells = tuple(str(c) for row in conn.execute(ex.gold_sql) for c in row)
        conn.close()
        assert cells == ex.gold_answers, ex.id


def test_coverage_and_size(bench):
    assert len(TEMPLATES) >= 30 and len(DOMAINS) >= 3
    assert all(len(t.phrasings) >= 3 for t in TEMPLATES)
    sql = " ".join(e.gold_sql for e in bench.train)
    for keyword in ("WHERE", "COUNT(", "AVG(", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "JOIN", "IN (SELECT"):
        assert keyword in sql, keyword
    assert {e.difficulty for e in bench.dev} == {"easy", "medium", "hard"}
    domains = {Path(e.db_path).name.split("_")[0] for e in bench.train}
    assert domains == {d.name for d in DOMAINS}
    assert max(len(e.gold_sql.split()) for e in bench.train) < 40


def test_train_dev_disjoint(bench):
    train_dbs = {e.db_path for e in bench.train}
    dev_dbs = {e.db_path for e in bench.dev}
    assert not train_dbs & dev_dbs

    def literals(exs):
        out = set()
        for e in exs:
            for tok in e.gold_sql.replace("(", " ").replace(")", " ").split():
                if tok.startswith("'") or tok.isdigit():
                    out.add(tok)
        return out - {"1", "2", "3"}  # LIMIT and HAVING counts are shared on purpose

    assert not literals(bench.train) & literals(bench.dev)
    manifest = json.loads(Path(bench.out_dir, "synthetic.json").read_text())
    heldout = {tuple(h.split("@")) for h in manifest["heldout"]}
    assert heldout
    def combos(exs):
        return {(e.id.split("-", 3)[3], Path(e.db_path).name.split("_")[0]) for e in exs}

    assert not heldout & combos(bench.train)
    assert heldout & combos(bench.dev)


def test_level_knob(tmp_path):
    easy = generate_benchmark(tmp_path, seed=0, n_train=200, n_dev=50, max_level=1)
    for e in easy.train + easy.dev:
        assert "JOIN" not in e.gold_sql and "GROUP BY" not in e.gold_sql and len(tables_in_sql(e.gold_sql)) == 1
    with pytest.raises(JaxsqlError, match="max_level"):
        generate_benchmark(tmp_path, max_level=4)


def test_refuses_foreign_files_and_reloads(tmp_path, bench):
    (tmp_path / "train.jsonl").write_text("my data\n")
    with pytest.raises(JaxsqlError, match="train.jsonl"):
        generate_benchmark(tmp_path, seed=0, n_train=20, n_dev=5)
    assert (tmp_path / "train.jsonl").read_text() == "my data\n"
    loaded = load_benchmark(bench.out_dir)
    assert loaded.train == bench.train and loaded.dev == bench.dev
