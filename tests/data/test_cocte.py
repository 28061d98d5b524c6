"""Gold SQL -> chains of CTEs: golden rewrites, equivalence by execution, reasons, the CLI, GeoQuery."""

import collections
import json
import sqlite3

import pytest

from data.cocte import REASONS, chain_target, convert_examples, has_subquery_or_join, lift_to_chain
from data.prompts import render_target
from data.readers.jsonl import read_jsonl
from data.records import Example
from jaxsql.cli import main
from jaxsql.cocte import split_steps
from jaxsql.sql import SqlPool


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory):
    """product(id, name, category, price), sale(id, product_id, store, qty): NULLs and unmatched rows included."""
    path = tmp_path_factory.mktemp("cocte") / "shop.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE product (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price INTEGER)")
    con.execute("CREATE TABLE sale (id INTEGER PRIMARY KEY, product_id INTEGER, store TEXT, qty INTEGER)")
    con.executemany("INSERT INTO product VALUES (?, ?, ?, ?)", [
        (1, "pen", "office", 3), (2, "cup", "home", 7), (3, "lamp", "home", 20), (4, "ink", "office", None),
        (5, "rug", "home", 40)])
    con.executemany("INSERT INTO sale VALUES (?, ?, ?, ?)", [
        (1, 1, "north", 5), (2, 1, "south", 2), (3, 2, "north", 1), (4, 3, "west", 4), (5, 3, "north", 9),
        (6, 9, "north", 1)])
    con.commit()
    con.close()
    return str(path)


def rows(db, sql):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


GOLDEN = [
    ("SELECT name FROM product WHERE price > 5 ORDER BY price",
     ("filter",),
     "WITH step1 AS (SELECT * FROM product WHERE price > 5)\n\nSELECT name FROM step1 ORDER BY price"),
    ("SELECT name FROM product WHERE price > (SELECT AVG(price) FROM product)",
     ("subquery", "filter"),
     "WITH step1 AS (SELECT AVG(price) FROM product),\n\n"
     "step2 AS (SELECT * FROM product WHERE price > (SELECT * FROM step1))\n\nSELECT name FROM step2"),
    ("SELECT DISTINCT product.name FROM product JOIN sale ON product.id = sale.product_id WHERE sale.store = 'north'",
     ("filter", "join"),
     "WITH step1 AS (SELECT * FROM sale WHERE sale.store = 'north'),\n\n"
     "step2 AS (SELECT product.name AS product_name FROM product JOIN step1 AS sale ON product.id = sale.product_id)"
     "\n\nSELECT DISTINCT product_name AS name FROM step2"),
    ("SELECT MAX(d.n) FROM (SELECT category, COUNT(*) AS n FROM product GROUP BY category) AS d",
     ("derived",),
     "WITH step1 AS (SELECT category, COUNT(*) AS n FROM product GROUP BY category)\n\n"
     "SELECT MAX(d.n) FROM step1 AS d"),
    ("SELECT COUNT(*) FROM product", ("whole",), "WITH step1 AS (SELECT COUNT(*) FROM product)\n\nSELECT * FROM step1"),
]


@pytest.mark.parametrize("sql,kinds,chain", GOLDEN, ids=[g[1][-1] for g in GOLDEN])
def test_lift_golden_and_equivalent(shop_db, sql, kinds, chain):
    text, got_kinds = lift_to_chain(sql)
    assert (text, got_kinds) == (chain, kinds)
    assert collections.Counter(rows(shop_db, text)) == collections.Counter(rows(shop_db, sql))
    parsed = split_steps(text)
    assert parsed.is_cocte and len(parsed.steps) == len(kinds) + 1


@pytest.mark.parametrize("sql", [
    # a filter on the null-extended side of a LEFT JOIN must stay after the join
    "SELECT product.name, sale.store FROM product LEFT JOIN sale ON product.id = sale.product_id "
    "WHERE sale.store = 'north' OR sale.store IS NULL",
    "SELECT p.name FROM product AS p LEFT JOIN sale AS s ON p.id = s.product_id WHERE s.id IS NULL AND p.price > 5",
    # a correlated subquery stays in place; the uncorrelated one is lifted
    "SELECT p.name FROM product AS p WHERE p.price = (SELECT MAX(q.price) FROM product AS q "
    "WHERE q.category = p.category) AND p.id IN (SELECT product_id FROM sale)",
    "SELECT category FROM product GROUP BY category HAVING COUNT(*) > (SELECT COUNT(*) FROM sale WHERE qty > 4)",
    "SELECT name FROM product WHERE id NOT IN (SELECT product_id FROM sale WHERE product_id IS NOT NULL) "
    "UNION SELECT store FROM sale WHERE qty > 4",
    "WITH big AS (SELECT * FROM product WHERE price > 5) SELECT big.name, sale.qty FROM big, sale "
    "WHERE big.id = sale.product_id AND sale.qty > 1",
    "SELECT p.name, COUNT(*) FROM product AS p JOIN sale AS s ON p.id = s.product_id GROUP BY p.name "
    "ORDER BY COUNT(*) DESC, p.name",
])
def test_lift_keeps_the_result(shop_db, sql):
    text, kinds = lift_to_chain(sql)
    assert kinds != ("whole",)
    assert collections.Counter(rows(shop_db, text)) == collections.Counter(rows(shop_db, sql)), text
    assert split_steps(text).is_cocte


def test_correlated_subquery_is_not_lifted():
    text, kinds = lift_to_chain("SELECT p.name FROM product AS p WHERE p.price = "
                                "(SELECT MAX(q.price) FROM product AS q WHERE q.category = p.category)")
    assert "q.category = p.category" in text and kinds == ("filter",)


def test_chain_target_keeps_an_existing_chain():
    chain = "WITH a AS (SELECT *   FROM product WHERE price > 5),\nb AS (SELECT name FROM a)  SELECT * FROM b"
    assert chain_target(chain) == ("WITH a AS (SELECT * FROM product WHERE price > 5),\n\n"
                                   "b AS (SELECT name FROM a)\n\nSELECT * FROM b")
    assert chain_target("SELECT 1") is None
    commented = "-- plan\nWITH a AS (SELECT 1 -- one\n),\nb AS (SELECT * FROM a) SELECT * FROM b"
    assert chain_target(commented) == ("-- plan\nWITH a AS (SELECT 1 -- one\n),\n\n"
                                       "b AS (SELECT * FROM a)\n\nSELECT * FROM b")
    e = Example(id="x", db_path="none.sqlite", question="q", gold_sql=chain)
    assert render_target(e, "cocte") == chain_target(chain)


def test_convert_examples_counts_reasons(shop_db, tmp_path):
    exs = [Example(id=f"e{i}", db_path=shop_db, question="q", gold_sql=sql) for i, (sql, _, _) in enumerate(GOLDEN)]
    exs += [Example(id="fails", db_path=shop_db, question="q", gold_sql="SELECT nope FROM product"),
            Example(id="answers", db_path=shop_db, question="q", gold_answers=("1",)),
            Example(id="garbage", db_path=shop_db, question="q", gold_sql="SELECT (((")]
    with SqlPool(2) as pool:
        report = convert_examples(exs, pool)
    reasons = {e.id: c.reason for e, c in report.examples}
    assert reasons == {"e0": "converted", "e1": "converted", "e2": "converted", "e3": "converted",
                       "e4": "single_step", "fails": "gold_fails", "answers": "no_gold_sql", "garbage": "gold_fails"}
    assert set(report.to_json()["by_reason"]) == set(REASONS)
    assert (report.nested_total, report.nested_converted) == (3, 3)
    assert [has_subquery_or_join(sql) for sql, _, _ in GOLDEN] == [False, True, True, True, False]


def test_cli_writes_sft_data_the_cocte_format_reads(small_bench, tmp_path, capsys):
    out = tmp_path / "cocte.jsonl"
    assert main(["data", "cocte", f"synthetic:{small_bench.out_dir}:train", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == 120 and report["by_reason"]["converted"] > 30
    assert report["with_subquery_or_join_share"] == 1.0
    back = read_jsonl(out)
    gold = {e.id: e for e in small_bench.train}
    for e in back:
        target = render_target(e, "cocte")
        assert target == e.gold_sql  # already a chain: the prompt format keeps it as written
        assert collections.Counter(rows(e.db_path, target)) == collections.Counter(rows(e.db_path, gold[e.id].gold_sql))
    assert main(["data", "cocte", f"synthetic:{small_bench.out_dir}:train", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["data", "cocte", "synthetic", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "SOURCE:PATH" in capsys.readouterr().err


def test_synth_emits_cocte_splits(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--n-train", "40", "--n-dev", "10", "--cocte"]) == 0
    report = json.loads(capsys.readouterr().out)["cocte"]
    assert report["train"]["written"] == 40 and report["dev"]["written"] == 10
    dev = read_jsonl(tmp_path / "dev.cocte.jsonl")
    assert all(split_steps(e.gold_sql).is_cocte for e in dev)


@pytest.mark.real_data
def test_geoquery_conversions_execute_to_the_gold_result(real_data):
    from data.readers import read_examples

    root = real_data / "geoquery"
    if not (root / "geography.json").is_file():
        pytest.skip("geoquery not in the real data")
    examples = read_examples("geoquery", root)
    with SqlPool(2, timeout_s=10.0, max_rows=100_000) as pool:
        report = convert_examples(examples, pool)
    summary = report.to_json()
    print(f"\nGeoQuery CoCTE conversion: {json.dumps(summary)}")
    assert summary["by_reason"]["result_differs"] == 0
    assert report.nested_total > 300
    assert report.nested_share >= 0.8
