"""Each official evaluator's rules, piece by piece, against its definition.

Where our code replaces a slow construction of the released code (backtracking
regular expressions, permutation enumeration, quadratic scans), a small
reference written from the released definition is compared with ours on many
random inputs.
"""

from __future__ import annotations

import collections
import itertools
import random
import re
import time
import unicodedata

import pytest

from jaxsql.extract import extract_sql_think2sql, findall_delimited, format_ok_think2sql
from jaxsql.official import qatch, spider, think2sql, wikitq

# --- Spider test suite ---------------------------------------------------------------------------


@pytest.mark.parametrize("sql,prepared", [
    ("SELECT DISTINCT a FROM t", "SELECT  a FROM t"),
    ("select count(distinct a) from t", "select count( a) from t"),
    ("SELECT a FROM t; DROP TABLE t", "SELECT a FROM t; "),  # only the first statement is kept
    ("SELECT 'distinct', distinct_a FROM t -- distinct", "SELECT 'distinct', distinct_a FROM t -- distinct"),
    ("SELECT a FROM t WHERE b > = 1", "SELECT a FROM t WHERE b >= 1"),
])
def test_spider_prepare(sql, prepared):
    assert spider.prepare_sql(sql) == prepared
    assert spider.prepare_sql("SELECT DISTINCT a FROM t", keep_distinct=True) == "SELECT DISTINCT a FROM t"


def test_spider_rewrites_what_it_runs():
    assert spider.executed_sql("SELECT YEAR(CURDATE()) - age FROM p") == "SELECT 2020- age FROM p"
    assert spider.prediction_text("SELECT value FROM t WHERE market_value > 1") == \
        "SELECT 1 FROM t WHERE market_1 > 1"  # evaluation.py's p_str.replace("value", "1")
    with pytest.raises(ValueError):
        spider.remove_distinct("   ")
    with pytest.raises(spider.SearchCapped):
        spider.remove_distinct("SELECT DISTINCT " + "a, " * 10_000 + "b FROM t")


def test_spider_order_rule_is_textual():
    assert spider.order_matters("select a from (select a from t order by a)")
    assert spider.order_matters("SELECT 'order by' FROM t")
    assert not spider.order_matters("SELECT a FROM t ORDER  BY a")  # two spaces: not the text 'order by'


def test_spider_test_suite_databases(tmp_path):
    for name in ("db.sqlite", "db_alt.sqlite", "schema.sql", "notes.txt"):
        (tmp_path / name).write_text("")
    assert spider.test_suite_databases(tmp_path / "db_alt.sqlite") == [str(tmp_path / "db_alt.sqlite"),
                                                                       str(tmp_path / "db.sqlite")]
    assert spider.test_suite_databases(tmp_path / "missing" / "db.sqlite") == [str(tmp_path / "missing" / "db.sqlite")]


def _reference_result_eq(gold, pred, ordered):
    """``exec_eval.result_eq`` with the permutation space enumerated in full."""
    if len(gold) == 0 and len(pred) == 0:
        return True
    if len(gold) != len(pred) or len(gold[0]) != len(pred[0]):
        return False

    def unorder(r):
        return tuple(sorted(r, key=lambda x: str(x) + str(type(x))))

    s1, s2 = [unorder(r) for r in gold], [unorder(r) for r in pred]
    if (s1 != s2) if ordered else (set(s1) != set(s2)):
        return False
    for perm in itertools.permutations(range(len(gold[0]))):
        p = [tuple(r[i] for i in perm) for r in pred]
        if (p == list(gold)) if ordered else (collections.Counter(p) == collections.Counter(gold)):
            return True
    return False


def test_spider_result_eq_matches_the_definition_on_random_results():
    rng = random.Random(0)
    values = [0, 1, 1.0, 2, "a", "1", None, "1.0x"]
    disagreements = 0
    for _ in range(20_000):
        ncols, nrows = rng.randint(1, 4), rng.randint(0, 4)
        gold = [tuple(rng.choice(values) for _ in range(ncols)) for _ in range(nrows)]
        if rng.random() < 0.6 and nrows:
            perm = rng.sample(range(ncols), ncols)
            pred = [tuple(r[i] for i in perm) for r in gold]
            if rng.random() < 0.5:
                rng.shuffle(pred)
            if rng.random() < 0.3:
                r = list(pred[0])
                r[rng.randrange(ncols)] = rng.choice(values)
                pred[0] = tuple(r)
        else:
            pred = [tuple(rng.choice(values) for _ in range(ncols)) for _ in range(nrows)]
        for ordered in (False, True):
            disagreements += spider.result_eq(gold, pred, ordered) != _reference_result_eq(gold, pred, ordered)
    assert disagreements == 0


def test_spider_quick_rejection_is_kept():
    # 1 == 1.0, yet the rows sort differently by str(v) + str(type(v)), so the released code rejects
    assert spider.result_eq([(1, "1.0x")], [(1.0, "1.0x")], False) is False
    assert spider.result_eq([(1, "a")], [(1.0, "a")], False) is True


def test_spider_search_is_bounded():
    # A 40-column Latin square: every column holds every value once, so the released code keeps all
    # 40^40 candidate permutations (it prunes only by 20 sampled rows); the search here finds one at once.
    n = 40
    gold = [tuple((i + j) % n for j in range(n)) for i in range(n)]
    t0 = time.perf_counter()
    flipped = [tuple(reversed(r)) for r in reversed(gold)]  # columns and rows in reverse
    assert spider.result_eq(gold, flipped, False) is True
    assert spider.result_eq(gold, flipped, True) is False  # rows out of order
    assert spider.result_eq(gold, [tuple(reversed(r)) for r in gold], True) is True
    assert time.perf_counter() - t0 < 5.0
    # Even-parity bit vectors: every partial projection agrees whatever the columns, so the search
    # must go deep; with a tiny step budget it gives up with SearchCapped instead of running on.
    bits = [r for r in itertools.product((0, 1), repeat=6) if sum(r) % 2 == 0]
    shuffled = [r[3:] + r[:3] for r in bits]
    assert spider.result_eq(bits, shuffled, False) is True
    with pytest.raises(spider.SearchCapped):
        spider.result_eq(bits, shuffled, False, max_steps=len(bits) * 3)


# --- QATCH -----------------------------------------------------------------------------------------


def test_qatch_orchestrator_rules():
    gold = [(1,), (2,)]
    # the same SQL text (ignoring case) scores 1 without looking at results
    assert qatch.qatch_metrics("SELECT a FROM t", "select A from T", [(9,)], gold)["cell_precision"] == 1.0
    assert qatch.qatch_metrics("SELECT x", "SELECT a FROM t", None, gold) == {
        "cell_precision": 0.0, "cell_recall": 0.0, "tuple_cardinality": 0.0, "tuple_constraint": 0.0,
        "tuple_order": None}
    ordered = qatch.qatch_metrics("SELECT x", "SELECT a FROM t ORDER BY a", [(2,), (1,)], gold)
    assert ordered["tuple_order"] == 0.0 and ordered["cell_recall"] == 1.0
    assert qatch.prepare_sql("SELECT ';' FROM t;") == "SELECT '' FROM t"


def test_qatch_tuple_order_matches_the_definition():
    def reference(target, prediction):
        new_pred, new_target = [], []
        [new_pred.append(p) for p in prediction if p in target and p not in new_pred]
        [new_target.append(t) for t in target if t in prediction and t not in new_target]
        if not new_target:
            rho = 0.0
        else:
            d = sum((i - new_target.index(r)) ** 2 for i, r in enumerate(new_pred))
            n = len(new_target) if len(new_target) > 1 else 2
            rho = 1 - 6 * d / (n * (n ** 2 - 1))
        return (round(rho, 3) + 1) / 2

    rng = random.Random(1)
    for _ in range(3000):
        gold = [(rng.randint(0, 6),) for _ in range(rng.randint(1, 7))]
        pred = [(rng.randint(0, 6),) for _ in range(rng.randint(1, 7))]
        assert qatch.tuple_order(pred, gold) == reference([list(r) for r in gold], [list(r) for r in pred])


# --- Think2SQL -------------------------------------------------------------------------------------


def test_think2sql_metrics():
    assert think2sql.think2sql_ex([(1,), (1,), (2,)], [(1,), (2,), (2,)]) == 1.0  # same count, same set
    assert think2sql.think2sql_ex([(1,), (2,)], [(1,), (2,), (2,)]) == 0.0
    assert think2sql.think2sql_ex([("a", 1)], [(1, "a")]) == 1.0
    assert think2sql.think2sql_ex(None, None) == 1.0  # released quirk: both queries fail
    assert think2sql.think2sql_ex(None, [(1,)]) == 0.0 and think2sql.think2sql_ex([(1,)], None) == 0.0
    assert think2sql.think2sql_bird_ex([("a", 1)], [(1, "a")]) == 0.0
    assert think2sql.cp_cr_tc([(1,), (2,), (2,)], [(1,), (2,)]) == 0.889
    assert think2sql.cp_cr_tc([], []) == 1.0 and think2sql.cp_cr_tc([], [(1,)]) == 0.0
    assert think2sql.cp_cr_tc(None, [(1,)]) == 0.0 and think2sql.cp_cr_tc([(1,)], None) == 0.0


def _reference_extract(generation):
    def last(text, pattern):
        m = re.findall(pattern, text, re.DOTALL | re.IGNORECASE)
        return m[-1].strip() if m else text

    text = last(last(last(generation, r"<answer>(.*?)</answer>"), r"```sql(.*?)```"), r"```(.*?)```")
    return text.strip().strip("`").strip()


def _reference_format(completion, tag="think"):
    pattern = re.compile(rf"\s*<{tag}>\s*([\s\S]*?)\s*</{tag}>\s*<answer>\s*([\s\S]*?)\s*</answer>\s*\Z",
                         flags=re.DOTALL | re.MULTILINE | re.IGNORECASE)
    return pattern.fullmatch(completion.strip()) is not None


@pytest.mark.parametrize("completion,sql", [
    ("<think>x</think><answer>SELECT 1</answer>", "SELECT 1"),
    ("<THINK>x</THINK><ANSWER>```sql\nSELECT 2\n```</ANSWER>", "SELECT 2"),
    ("<answer>```sqlite\nSELECT 3\n```</answer>", "ite\nSELECT 3"),  # released: ```sql matches ```sqlite
    ("<think>plan</think><answer>SELECT 4 FROM", "<think>plan</think><answer>SELECT 4 FROM"),  # cut off
    ("`SELECT 5`", "SELECT 5"),
])
def test_think2sql_extraction_as_released(completion, sql):
    assert extract_sql_think2sql(completion) == sql == _reference_extract(completion)


@pytest.mark.parametrize("completion,ok", [
    ("<think>a</think><answer>b</answer>", True),
    ("  <THINK>a</Think>\n<answer></answer>\n", True),  # case-insensitive, empty answer allowed
    ("<think>a</think>b</think><answer>c</answer>", True),  # tags may repeat inside blocks
    ("<think>a</think> x <answer>b</answer>", False),
    ("pre <think>a</think><answer>b</answer>", False),
    ("<think>a</think><answer>b</answer> post", False),
    ("<answer>b</answer>", False),
])
def test_think2sql_format_as_released(completion, ok):
    assert format_ok_think2sql(completion) is ok is _reference_format(completion)


def test_think2sql_text_rules_match_the_regexes_on_random_text():
    rng = random.Random(2)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "<ANSWER>", "```", "```sql", "```sqlite",
              "SELECT 1", " ", "\n", "x", "`"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        assert extract_sql_think2sql(text) == _reference_extract(text), text
        assert format_ok_think2sql(text) == _reference_format(text), text


def test_findall_delimited_matches_findall():
    rng = random.Random(3)
    for _ in range(5000):
        text = "".join(rng.choice(["<a>", "</a>", "```", "`", "x"]) for _ in range(rng.randint(0, 10)))
        for o, c in (("<a>", "</a>"), ("```", "```")):
            spans = findall_delimited(text, re.compile(re.escape(o)), re.compile(re.escape(c)))
            assert [text[a:b] for a, b in spans] == re.findall(re.escape(o) + "(.*?)" + re.escape(c), text,
                                                               re.DOTALL)


# --- WikiTQ ----------------------------------------------------------------------------------------


def _reference_normalize(x):
    """The official ``normalize``, regular expressions and all (exponential on some inputs)."""
    x = "".join(c for c in unicodedata.normalize("NFKD", x) if unicodedata.category(c) != "Mn")
    x = re.sub(r"[‘’´`]", "'", x)
    x = re.sub(r"[“”]", '"', x)
    x = re.sub(r"[‐‑‒–—−]", "-", x)
    while True:
        old = x
        x = re.sub(r"((?<!^)\[[^\]]*\]|\[[0-9]+\]|[•♦†‡*#+])*$", "", x.strip())
        x = re.sub(r"(?<!^)( \([^)]*\))*$", "", x.strip())
        x = re.sub(r'^"([^"]*)"$', r"\1", x.strip())
        if x == old:
            break
    if x and x[-1] == ".":
        x = x[:-1]
    return re.sub(r"\s+", " ", x).lower().strip()


def test_wikitq_normalize_matches_the_official_regexes():
    rng = random.Random(4)
    pieces = ["[", "]", "(", ")", " ", '"', "a", "1", "*", "#", ".", "\t", "é", "—", "[1]", " (x)", '"a"', "•",
              "“", "[nb 2]"]
    for _ in range(50_000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert wikitq.normalize(s) == _reference_normalize(s), s


@pytest.mark.parametrize("gold,pred,ok", [
    (["17 years"], ["17"], True),  # gold canonicalised "number unit" -> 17
    (["1,000"], ["1000"], True),  # Java NumberFormat reads thousands separators in gold
    (["1000"], ["1,000"], False),  # predictions are only int / float / yyyy-mm-dd
    (["1,000"], ["1,000"], True),  # equal normalised strings always match
    (["January 4, 1994"], ["1994-01-04"], True),
    (["1994-01-04"], ["January 4, 1994"], False),
    (["7 August 2004"], ["2004-08-07"], True),  # CoreNLP date form
    (["2000"], ["2000-xx-xx"], True),  # a year alone is the number 2000
    (["3"], ["3.0"], True),
    (["3.5"], ["3.50000001"], True),  # within 1e-6
    (["3.5"], ["3.5001"], False),
    (["2.9999999"], ["2"], True),  # released NumberValue truncates near-integers with int()
    (["Paris"], ["paris", "PARIS"], True),  # deduplicated: one value
    (["Paris"], ["Paris", "Rome"], False),  # sizes differ
    (["Paris [1]"], ['"Paris"'], True),
])
def test_wikitq_hard_cases(gold, pred, ok):
    assert wikitq.denotation_accuracy(pred, gold) is ok


def test_wikitq_canonical_forms():
    c = wikitq.canonical_form
    assert c("17 years") == "17.0" and c("82.6 m") == "82.6" and c(".13 seconds") == "0.13"
    assert c("4,000") == "4000.0" and c("1E5") == "100000.0" and c("-3") == "-3.0"
    assert c("2000") == "2000.0" and c("1990-05") == "1990-05-xx" and c("XXXX-05-06") == "xx-05-06"
    assert c("Jan 4, 1994") == "1994-01-04" and c("February 30, 1994") == "February 30, 1994"
    assert c("August 2004") == "2004-08-xx" and c("March 3") == "xx-03-03"
    assert c("Poland") == "Poland" and c("1,") == "1," and c("+5") == "+5" and c("17  years") == "17  years"
    assert wikitq.java_number_strict(",5") == 5.0 and wikitq.java_number_strict("1,2,3") == 123.0
    assert wikitq.java_number_strict("1.5.") is None and wikitq.java_number_strict("1e5") is None


def test_wikitq_uses_given_canonical_forms():
    # the release's targetCanon wins over our computation
    assert wikitq.denotation_accuracy(["5"], ["five"], canonicals=["5.0"]) is True
    assert wikitq.denotation_accuracy(["5"], ["five"]) is False
