"""Golden values for every comparison, computed by hand from the definitions."""

import pytest

from jaxsql.compare import (
    cell_precision, cell_recall, compare_all, denotation_match, ex_bag, ex_bag_rowfree, ex_ordered, ex_set,
    has_top_level_order_by, normalize_text, normalize_value, parse_date, parse_number, qatch_score,
    tuple_cardinality, tuple_constraint, tuple_order,
)
from jaxsql.sql import ExecResult

DUP = [(1, "a"), (2, "b"), (2, "b")]
GOLD = [(1, "a"), (2, "b")]


def test_value_normalisation():
    assert normalize_value(1.0) == 1 and isinstance(normalize_value(1.0), int)
    assert normalize_value(0.1 + 0.2) == 0.3
    assert normalize_value(0.30000001) == 0.3  # within FLOAT_DIGITS = 6
    assert normalize_value(0.30001) != 0.3
    assert normalize_value(b"\x01\xff") == "x'01ff'"
    assert normalize_value(True) == 1 and normalize_value("A") == "A" and normalize_value(None) is None


def test_ex_set_bag_and_ordered():
    assert ex_set(DUP, GOLD) is True  # duplicates ignored
    assert ex_bag(DUP, GOLD) is False  # duplicates count
    assert ex_set([("a", 1)], [(1, "a")]) is False  # BIRD: column order matters
    assert ex_bag([("a", 1)], [(1, "a")]) is False  # so it does for our bag of row tuples
    assert ex_bag_rowfree([("a", 1)], [(1, "a")]) is True  # row values order-free (was ex_bag)
    assert ex_bag_rowfree(DUP, GOLD) is False  # duplicates count
    assert ex_set([(1,)], [(1.0,)]) and ex_bag([(0.1 + 0.2,)], [(0.3,)]) and ex_bag_rowfree([(0.1 + 0.2,)], [(0.3,)])
    assert ex_set([("A",)], [("a",)]) is False  # strings exact
    assert ex_set([], []) and ex_bag([], []) and ex_bag_rowfree([], [])
    assert ex_set([(None,)], [(None,)])
    assert ex_set([("1",)], [(1,)]) is False
    rev = [(2,), (1,)]
    assert ex_ordered(rev, [(1,), (2,)], "SELECT a FROM t ORDER BY a") is False
    assert ex_ordered(rev, [(1,), (2,)], "SELECT a FROM t") is True
    assert ex_ordered([(2, "x")], [("x", 2)], "SELECT a, b FROM t ORDER BY a") is True


@pytest.mark.parametrize(
    "sql,expected",
    [
        ("SELECT a FROM t ORDER BY a", True),
        ("select a from t order by a desc limit 3", True),
        ("SELECT a FROM (SELECT a FROM t ORDER BY a) LIMIT 2", False),
        ("WITH c AS (SELECT a FROM t ORDER BY a) SELECT a FROM c", False),
        ("WITH c AS (SELECT a FROM t) SELECT a FROM c ORDER BY a", True),
        ("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1", True),
        ("SELECT 'order by' FROM t", False),
        ("SELEC a FROM t ORDER BY a", True),  # unparseable: textual scan at depth 0
        ("SELEC a FROM (x ORDER BY a)", False),
    ],
)
def test_has_top_level_order_by(sql, expected):
    assert has_top_level_order_by(sql) is expected


def test_qatch_cell_metrics_golden():
    # QATCH's own example: one cell of four differs.
    t = [("a", "b"), ("c", "d")]
    p = [("a", "b"), ("c", "e")]
    assert cell_precision(p, t) == 0.75 and cell_recall(p, t) == 0.75
    # cells deduplicated across rows: pred cells {a, b}, gold cells {a, b, c, d}
    p2 = [("a", "b"), ("b", "a"), ("a", "a")]
    assert cell_precision(p2, t) == 1.0 and cell_recall(p2, t) == 0.5
    assert cell_precision([("a",), ("b",), ("c",), ("d",)], t) == 1.0  # schema ignored
    assert cell_precision([(1.0,)], [(1,)]) == 1.0


def test_qatch_empty_rules():
    for fn in (cell_precision, cell_recall, tuple_constraint, tuple_order):
        assert fn([], []) == 1.0
        assert fn([], [(1,)]) == 0.0 and fn([(1,)], []) == 0.0
    assert tuple_cardinality([], []) == 1.0
    assert tuple_cardinality([], [(1,)]) == 0.0


def test_tuple_cardinality_golden():
    assert tuple_cardinality([(1,), (2,)], [(1,), (2,), (3,), (4,)]) == 0.5
    assert tuple_cardinality([(1,), (2,), (3,), (4,)], [(1,), (2,)]) == 0.5
    assert tuple_cardinality([(9,), (8,)], [(1,), (2,)]) == 1.0


def test_tuple_constraint_golden():
    t = [("a", "b"), ("c", "d")]
    assert tuple_constraint(t, t) == 1.0
    assert tuple_constraint([("a", "b"), ("a", "b"), ("c", "d")], t) == 0.5
    assert tuple_constraint([("a", "b"), ("a", "b"), ("c", "d"), ("c", "d")], t) == 0.0
    assert tuple_constraint([("b", "a"), ("d", "c")], t) == 1.0  # projection order free


def test_tuple_order_golden():
    t = [("a", "b"), ("c", "d")]
    assert tuple_order([("c", "d"), ("a", "b")], t) == 0.0  # reversed: rho = -1
    assert tuple_order(t, t) == 1.0
    # one swap among three: d^2 = 0 + 1 + 1 = 2, rho = 1 - 6*2/(3*8) = 0.5 -> 0.75
    assert tuple_order([(1,), (3,), (2,)], [(1,), (2,), (3,)]) == pytest.approx(0.75)
    assert tuple_order([("pear",)], [("apple",), ("pear",)]) == 1.0  # one shared row
    assert tuple_order([("x",)], [("apple",), ("pear",)]) == 0.5  # nothing shared: rho = 0
    assert tuple_order(t, t, gold_sql="SELECT a, b FROM t") is None
    assert tuple_order(t, t, gold_sql="SELECT a, b FROM t ORDER BY a") == 1.0


def test_qatch_score():
    # CP = 1, CR = 1, TC = 2/3, which QATCH rounds to 0.667
    assert qatch_score(DUP, GOLD) == pytest.approx((1 + 1 + 0.667) / 3)


def test_number_date_text_parsing():
    assert parse_number("1,000") == parse_number("1000") == parse_number("1000.0") == 1000.0
    assert parse_number("45%") == 45.0 and parse_number("-3.5") == -3.5
    assert parse_number("12,34") is None and parse_number("nan") is None and parse_number("abc") is None
    assert parse_date("2010-05-03") == parse_date("May 3, 2010") == parse_date("3 May 2010") == (2010, 5, 3)
    assert parse_date("2010-05-03 00:00:00") == (2010, 5, 3)
    assert parse_date("May 2010") == (2010, 5, -1)
    assert normalize_text("  New   York. ") == "new york"
    assert normalize_text("Café") == "cafe"
    assert normalize_text('"Quoted"') == "quoted"
    assert normalize_text("Tokyo [1]") == "tokyo"


def test_denotation_match_golden():
    assert denotation_match([(1000.0,)], ["1,000"]) == (True, 1.0)
    assert denotation_match([("1,000",)], ["1000"]) == (True, 1.0)
    assert denotation_match([(45,)], ["45%"]) == (True, 1.0)
    assert denotation_match([(3,)], ["3.0"]) == (True, 1.0)
    assert denotation_match([(3.5,)], ["3"]) == (False, 0.0)
    assert denotation_match([("2010-05-03",)], ["May 3, 2010"]) == (True, 1.0)
    assert denotation_match([("  New   York ",)], ["new york"]) == (True, 1.0)
    assert denotation_match([("Paris",), ("Rome",)], ["paris"]) == (False, 1.0)  # too many values
    assert denotation_match([("Paris",)], ["Paris", "Rome"]) == (False, 0.5)
    assert denotation_match([("Rome", "Paris")], ["Paris", "Rome"]) == (True, 1.0)  # all cells count
    assert denotation_match([("Paris",), ("paris",)], ["Paris"]) == (True, 1.0)  # deduplicated
    assert denotation_match([(None,), ("a",)], ["a"]) == (True, 1.0)  # NULL ignored
    assert denotation_match([], []) == (True, 1.0)
    assert denotation_match([], ["x"]) == (False, 0.0)
    assert denotation_match(ExecResult.failure("syntax", "x"), ["x"]) == (False, 0.0)
    assert denotation_match(ExecResult(ok=True, columns=("c",), rows=((7,),)), ["7"]) == (True, 1.0)


def test_compare_all_keys_and_none_rules():
    ok = ExecResult(ok=True, columns=("a", "b"), rows=tuple(DUP))
    gold = ExecResult(ok=True, columns=("a", "b"), rows=tuple(GOLD))
    c = compare_all(ok, gold, None, "SELECT a, b FROM t", "SELECT a, b FROM t JOIN u")
    assert c["executed"] and c["gold_executed"] and not c["ordered"]
    assert c["ex_set"] is True and c["ex_bag"] is False and c["ex_ordered"] is False
    assert c["bird_ex"] is True and c["spider_ex"] is False and c["think2sql_ex"] == 0.0
    assert c["cell_precision"] == 1.0 and c["cell_recall"] == 1.0
    assert c["tuple_cardinality"] == 0.667 and c["tuple_constraint"] == 0.5  # QATCH rounds to 3 decimals
    assert c["tuple_order"] is None and c["qatch"] == pytest.approx((2 + 0.667) / 3) and c["cp_cr_tc"] == 0.889
    assert c["denotation_exact"] is None and c["wikitq_accuracy"] is None
    failed = ExecResult.failure("runtime", "boom")
    c = compare_all(failed, gold, ["1"], "SELECT a FROM t ORDER BY a", "SELECT b FROM t")
    assert c["ex_bag"] is False and c["qatch"] == 0.0 and c["tuple_order"] == 0.0 and c["bird_ex"] is False
    assert c["denotation_exact"] is False and c["denotation_relaxed"] == 0.0 and c["wikitq_accuracy"] is False
    c = compare_all(ok, failed, None, "SELECT x")
    assert c["gold_executed"] is False and c["ex_bag"] is None and c["qatch"] is None and c["bird_ex"] is None
    c = compare_all(ok, None, ["1", "a", "2", "b"])
    assert c["ex_set"] is None and c["denotation_exact"] is True and c["wikitq_accuracy"] is True
    # official metrics that run rewritten SQL need the caller's executions when the rewrite changes the text
    c = compare_all(ok, gold, None, "SELECT a, b FROM t", "SELECT DISTINCT a, b FROM t;")
    assert c["spider_ex"] is None and c["cell_precision"] is None and c["bird_ex"] is True
    with pytest.raises(ValueError, match="unknown metric"):
        compare_all(ok, gold, metrics=["exact_match"])
