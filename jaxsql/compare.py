"""Compare query results: every metric of one prediction, official and our own variants.

Metrics named after a benchmark compute exactly what its released evaluator
computes (`jaxsql.official`, one module per source). Our own variants keep
their own names and differ from the official ones as `METRICS` says: before
comparing, `normalize_value` makes ``1 == 1.0`` and rounds floats to
`FLOAT_DIGITS` decimals (so ``0.1 + 0.2`` equals ``0.3``); strings stay
exact and case-sensitive; ``NULL`` equals ``NULL``.

`compare_all` computes them all for one prediction. The Spider test suite and
QATCH run rewritten queries (Spider drops ``DISTINCT`` and keeps one
statement, QATCH removes ``;``); when a rewrite changes the text, the caller
passes the rewritten queries' results (`OfficialRuns`), otherwise those
metrics are None ("needs its own execution").
"""

from __future__ import annotations

import bisect
import calendar
import collections
import dataclasses
import datetime
import functools
import math
import re
from typing import Any, Collection, Sequence

from jaxsql.deadline import NEVER, Deadline
from jaxsql.official import qatch as qatch_official
from jaxsql.official import spider as spider_official
from jaxsql.official import wikitq
from jaxsql.official.bird import bird_ex
from jaxsql.official.qatch import (
    cell_precision, cell_recall, tuple_cardinality, tuple_constraint,
)
from jaxsql.official.think2sql import cp_cr_tc, think2sql_ex
from jaxsql.sql.result import ExecResult

FLOAT_DIGITS = 6
Rows = Sequence[Sequence[Any]]

__all__ = [
    "FLOAT_DIGITS", "METRICS", "MetricInfo", "OfficialRuns", "bird_ex", "cell_precision", "cell_recall",
    "compare_all", "cp_cr_tc", "denotation_match", "ex_bag", "ex_bag_rowfree", "ex_ordered", "ex_set",
    "has_top_level_order_by", "normalize_text", "normalize_value", "official_rewrites", "parse_date",
    "parse_number", "qatch_score", "think2sql_ex", "tuple_cardinality", "tuple_constraint", "tuple_order",
]


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """One per-example metric: its name, what it needs, where it comes from, what it computes."""

    name: str
    needs: str  # "gold_sql" (a gold result) or "answers" (gold answer strings)
    source: str  # the released evaluator it reproduces, or "ours"
    summary: str


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("bird_ex", "gold_sql", "BIRD evaluation.py",
               "set of row tuples equal, exact values"),
    MetricInfo("spider_ex", "gold_sql", "Spider test-suite exec_eval.py",
               "bag (or list, if 'order by' is in the gold text) equal under one column permutation, "
               "after DISTINCT removal, on every database of the test suite"),
    MetricInfo("cell_precision", "gold_sql", "QATCH", "share of distinct predicted cells found in gold"),
    MetricInfo("cell_recall", "gold_sql", "QATCH", "share of distinct gold cells found in the prediction"),
    MetricInfo("tuple_cardinality", "gold_sql", "QATCH", "min/max of the row counts"),
    MetricInfo("tuple_constraint", "gold_sql", "QATCH", "share of gold rows (values sorted) with the same count"),
    MetricInfo("tuple_order", "gold_sql", "QATCH", "Spearman rank correlation of shared rows (gold has 'order by')"),
    MetricInfo("think2sql_ex", "gold_sql", "Think2SQL (NL2SQLEvaluator EXEvaluator)",
               "same row count and same set of value-sorted rows"),
    MetricInfo("cp_cr_tc", "gold_sql", "Think2SQL (NL2SQLEvaluator QATCHEvaluator)",
               "round((CP + CR + TC) / 3, 3), 0 when a query fails"),
    MetricInfo("ex_set", "gold_sql", "ours", "bird_ex after value normalisation (1 == 1.0, floats to 6 decimals)"),
    MetricInfo("ex_bag", "gold_sql", "ours", "bag of row tuples equal after value normalisation"),
    MetricInfo("ex_bag_rowfree", "gold_sql", "ours",
               "bag of rows equal, each row a bag of normalised values (column order free)"),
    MetricInfo("ex_ordered", "gold_sql", "ours",
               "ex_bag_rowfree, or row sequences equal when the OUTER gold query has ORDER BY"),
    MetricInfo("qatch", "gold_sql", "ours", "(cell_precision + cell_recall + tuple_cardinality) / 3, unrounded"),
    MetricInfo("wikitq_accuracy", "answers", "WikiTableQuestions evaluator.py 1.0.2",
               "check_denotation of the result's cells against the gold answers"),
    MetricInfo("denotation_exact", "answers", "ours",
               "like wikitq_accuracy with lenient parsing (1,000 / 45% / May 3, 2010) and relative tolerance"),
    MetricInfo("denotation_relaxed", "answers", "ours", "share of gold answers matched by some cell"),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
SQL_METRICS = tuple(m.name for m in METRICS if m.needs == "gold_sql")
ANSWER_METRICS = tuple(m.name for m in METRICS if m.needs == "answers")
_BOOL_METRICS = frozenset({"bird_ex", "spider_ex", "ex_set", "ex_bag", "ex_bag_rowfree", "ex_ordered",
                           "wikitq_accuracy", "denotation_exact"})


# ---------------------------------------------------------------------------
# value and row normalisation (our variants)
def normalize_value(v: Any) -> Any:
    """Canonical form of one cell: integral floats become ints, floats rounded to `FLOAT_DIGITS`."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return v
        r = round(v, FLOAT_DIGITS)
        if r.is_integer() and abs(r) < 2**63:
            return int(r)
        return r
    if isinstance(v, (bytes, bytearray)):
        return "x'" + bytes(v).hex() + "'"
    return v


def _sort_key(v: Any) -> tuple[int, Any]:
    if v is None:
        return (0, 0)
    if isinstance(v, (int, float)):
        return (1, v)
    return (2, str(v))


def _row(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(normalize_value(v) for v in row)


def _row_bag(row: Sequence[Any]) -> tuple[Any, ...]:
    """A row's values as a multiset (sorted tuple): column order does not matter."""
    return tuple(sorted((normalize_value(v) for v in row), key=_sort_key))


# ---------------------------------------------------------------------------
# execution accuracy, our variants
def ex_set(pred: Rows, gold: Rows) -> bool:
    """``set(pred_rows) == set(gold_rows)`` after `normalize_value` (`bird_ex` with float tolerance).

    Rows are compared as tuples (column order matters); duplicates and row order are ignored.
    """
    return {_row(r) for r in pred} == {_row(r) for r in gold}


def ex_bag(pred: Rows, gold: Rows) -> bool:
    """``Counter(pred_rows) == Counter(gold_rows)`` after `normalize_value`: duplicates count,
    row order does not, column order does."""
    return collections.Counter(_row(r) for r in pred) == collections.Counter(_row(r) for r in gold)


def ex_bag_rowfree(pred: Rows, gold: Rows) -> bool:
    """``Counter(bag(r) for r in pred) == Counter(bag(r) for r in gold)``.

    Each row is a multiset of its normalised values (column order free), and
    the result is a multiset of such rows (duplicates count, row order does not).
    """
    return collections.Counter(_row_bag(r) for r in pred) == collections.Counter(_row_bag(r) for r in gold)


def ex_ordered(pred: Rows, gold: Rows, gold_sql: str | None) -> bool:
    """When the OUTER gold query has ORDER BY, the row sequences must be equal
    (``[bag(r) for r in pred] == [bag(r) for r in gold]``); otherwise `ex_bag_rowfree`.

    Unlike `spider_ex`, an ORDER BY inside a subquery or string does not count.
    """
    if gold_sql is not None and has_top_level_order_by(gold_sql):
        return [_row_bag(r) for r in pred] == [_row_bag(r) for r in gold]
    return ex_bag_rowfree(pred, gold)


_ORDER_BY = re.compile(r"\border\s+by\b", flags=re.IGNORECASE)
_SQLGLOT_MAX_CHARS = 20_000


@functools.lru_cache(maxsize=65_536)
def has_top_level_order_by(sql: str) -> bool:
    """True when the outermost query of `sql` has ORDER BY (not one inside a subquery or CTE).

    Parsed with sqlglot (SQLite; texts up to 20,000 characters); other text is
    scanned for ``ORDER BY`` at parenthesis depth 0 outside quotes.
    """
    if len(sql) <= _SQLGLOT_MAX_CHARS:
        try:
            import sqlglot
            from sqlglot import exp

            root = sqlglot.parse_one(sql, read="sqlite")
            if isinstance(root, exp.Query):
                return root.args.get("order") is not None
        except Exception:  # noqa: BLE001 - fall back to the textual scan below
            pass
    from jaxsql.sql.normalize import split_quoted

    text = "".join("''" if quoted else part for quoted, part in split_quoted(sql))
    depth = 0
    flat = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        flat.append(ch if depth == 0 else " ")
    return _ORDER_BY.search("".join(flat)) is not None


# ---------------------------------------------------------------------------
# QATCH (official values; see jaxsql.official.qatch)
def tuple_order(pred: Rows, gold: Rows, gold_sql: str | None = None) -> float | None:
    """QATCH tuple order; None when `gold_sql` is given and does not contain ``order by``."""
    if gold_sql is not None and not qatch_official.is_order(gold_sql):
        return None
    return qatch_official.tuple_order(pred, gold)


def qatch_score(pred: Rows, gold: Rows) -> float:
    """``(cell_precision + cell_recall + tuple_cardinality) / 3`` of QATCH's values, unrounded."""
    return (cell_precision(pred, gold) + cell_recall(pred, gold) + tuple_cardinality(pred, gold)) / 3


# ---------------------------------------------------------------------------
# denotation match, our variant (lenient parsing); the official one is jaxsql.official.wikitq
_MONTH_NUMBERS = {name.lower(): i for names in (calendar.month_name, calendar.month_abbr)
                  for i, name in enumerate(names) if name}
# The shapes of the strptime formats %Y-%m-%d, %Y/%m/%d, %Y-%m, %d/%m/%Y, %B %d, %Y, %B %d %Y,
# %d %B %Y and %B %Y (%b for abbreviated month names), matched without strptime's cost.
_ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})(?:-(\d{1,2}))?|(\d{4})/(\d{1,2})/(\d{1,2})")
_DMY_SLASH = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")
_MONTH_DAY_YEAR = re.compile(r"([A-Za-z]+) (\d{1,2}),? (\d{4})")
_DAY_MONTH_YEAR = re.compile(r"(\d{1,2}) ([A-Za-z]+) (\d{4})")
_MONTH_YEAR = re.compile(r"([A-Za-z]+) (\d{4})")
_DATE_MAX_CHARS = 64
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_TIME_OF_DAY = re.compile(r"[T ]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?$")
_ORDINAL = re.compile(r"(\d)(st|nd|rd|th)\b")
_SPACES = re.compile(r"\s+")


def normalize_text(x: str) -> str:
    """WikiTQ string normalisation (`jaxsql.official.wikitq.normalize`): strip accents, unify
    quotes and dashes, drop trailing citations/parentheses and outer quotes, drop a final ``.``,
    collapse whitespace, lower-case."""
    return wikitq.normalize(x)


def parse_number(text: str) -> float | None:
    """A number from text: ``1,000`` = ``1000`` = ``1000.0``; a trailing ``%`` is dropped (``45%`` = 45)."""
    s = text.strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    if _GROUPED_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def parse_date(text: str) -> tuple[int, int, int] | None:
    """``(year, month, day)`` of a date string (ISO, ``May 3, 2010``, ``3 May 2010``...); -1 for a missing part.

    Accepted: ``YYYY-MM-DD``, ``YYYY/MM/DD``, ``YYYY-MM``, ``DD/MM/YYYY``,
    ``Month D, YYYY``, ``Month D YYYY``, ``D Month YYYY``, ``Month YYYY``
    (full or abbreviated English month names, any case), an ordinal suffix on
    the day and a trailing time of day ignored; the date must exist. Strings
    longer than 64 characters are not dates.
    """
    if len(text) > _DATE_MAX_CHARS:
        return None
    s = text.strip()
    if not s or not (s[0].isdigit() or s.split(None, 1)[0].lower() in _MONTH_NUMBERS):
        return None  # every accepted shape starts with a digit or a month name
    s = _SPACES.sub(" ", s)
    s = _TIME_OF_DAY.sub("", s)  # a time of day carries no date information
    s = _ORDINAL.sub(r"\1", s)
    m = _ISO_DATE.fullmatch(s)
    if m is not None:
        y, mo, d = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(4), m.group(5), m.group(6))
        return _checked_date(y, mo, d)
    m = _DMY_SLASH.fullmatch(s)
    if m is not None:
        return _checked_date(m.group(3), m.group(2), m.group(1))
    for pattern, order in ((_MONTH_DAY_YEAR, "mdy"), (_DAY_MONTH_YEAR, "dmy"), (_MONTH_YEAR, "my")):
        m = pattern.fullmatch(s)
        if m is not None:
            parts = dict(zip(order, m.groups()))
            month = _MONTH_NUMBERS.get(parts["m"].lower())
            return None if month is None else _checked_date(parts["y"], str(month), parts.get("d"))
    return None


def _checked_date(year: str, month: str, day: str | None) -> tuple[int, int, int] | None:
    try:
        date = datetime.date(int(year), int(month), int(day) if day else 1)
    except ValueError:
        return None
    return date.year, date.month, date.day if day else -1


@dataclasses.dataclass(frozen=True)
class _Value:
    kind: str  # "num", "date" or "str"
    key: Any
    text: str


def _to_value(v: Any) -> _Value:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _Value("num", float(v), normalize_text(repr(normalize_value(v))))
    s = str(v)
    text = normalize_text(s)
    n = parse_number(s)
    if n is not None:
        return _Value("num", n, text)
    d = parse_date(s)
    if d is not None:
        return _Value("date", d, text)
    return _Value("str", text, text)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def _near(sorted_numbers: list[float], x: float) -> bool:
    k = bisect.bisect_left(sorted_numbers, x)
    return any(0 <= j < len(sorted_numbers) and _close(x, sorted_numbers[j]) for j in (k - 1, k))


def _dedupe(values: Sequence[_Value]) -> list[_Value]:
    """Keep a value unless an earlier kept value of its kind matches it (numbers: within tolerance)."""
    out: list[_Value] = []
    seen: set[tuple[str, Any]] = set()
    numbers: list[float] = []
    for v in values:
        if v.kind == "num":
            if _near(numbers, v.key):
                continue
            bisect.insort(numbers, v.key)
        else:
            if (v.kind, v.key) in seen:
                continue
            seen.add((v.kind, v.key))
        out.append(v)
    return out


def denotation_match(result: ExecResult | Rows, gold_answers: Sequence[str],
                     deadline: Deadline = NEVER) -> tuple[bool, float]:
    """Match a result's cells against gold answer strings; returns ``(exact, relaxed)``.

    The predicted values are all non-NULL cells of all rows; predicted and gold
    values are each deduplicated and typed as number (``1,000`` = ``1000`` =
    ``1000.0``, ``45%`` = ``45``; equal within 1e-6 absolute or 1e-9 relative),
    date (year, month, day) or normalised string (`normalize_text`); values of
    different types match when their normalised strings are equal. ``exact``:
    as many predicted as gold values and every gold value matched. ``relaxed``:
    fraction of gold values matched by some predicted value. A failed result is
    ``(False, 0.0)``. Our variant of WikiTQ's ``check_denotation``
    (`jaxsql.official.wikitq`): more lenient parsing, relative tolerance.
    """
    if isinstance(result, ExecResult):
        if not result.ok:
            return False, 0.0
        rows: Rows = result.rows
    else:
        rows = result
    pred = _dedupe([_to_value(v) for r in rows for v in r if v is not None])
    deadline.check()
    gold = _dedupe([_to_value(a) for a in gold_answers])
    if not gold:
        return (not pred), (1.0 if not pred else 0.0)
    texts = {p.text for p in pred}
    dates = {p.key for p in pred if p.kind == "date"}
    numbers = sorted(p.key for p in pred if p.kind == "num")
    matched = 0
    for g in gold:
        if (g.text in texts or (g.kind == "date" and g.key in dates)
                or (g.kind == "num" and _near(numbers, g.key))):
            matched += 1
    exact = len(pred) == len(gold) and matched == len(gold)
    return exact, matched / len(gold)


# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OfficialRuns:
    """Results of the queries the Spider test suite and QATCH actually run.

    Attributes:
      spider: ``(pred, gold)`` result pairs of `spider.executed_sql` of both
        queries on every test-suite database (the example's first), or None
        when the rewritten prediction has no statement; None when not run.
      spider_order: whether ``order by`` is in the rewritten gold text.
      qatch: ``(pred, gold)`` results of both queries with ``;`` removed.
      capped: a reason when the Spider rewrite passed its documented cap.
    """

    spider: tuple[tuple[ExecResult, ExecResult], ...] | None = None
    spider_order: bool = False
    qatch: tuple[ExecResult, ExecResult] | None = None
    capped: str | None = None


def official_rewrites(pred_sql: str, gold_sql: str, keep_distinct: bool = False) -> dict[str, Any]:
    """The texts the official evaluators run: ``spider_pred``, ``spider_gold``, ``spider_order``,
    ``qatch_pred``, ``qatch_gold``, and ``capped`` (a reason, or None). The Spider
    prediction is read as ``evaluation.py`` reads it (`spider.prediction_text`).

    ``spider_pred`` is None when the rewritten prediction has no statement
    (the released evaluator crashes there; we count it as failed).
    """
    out: dict[str, Any] = {"qatch_pred": qatch_official.prepare_sql(pred_sql),
                           "qatch_gold": qatch_official.prepare_sql(gold_sql), "capped": None}
    try:
        g = spider_official.prepare_sql(gold_sql, keep_distinct)
        out["spider_gold"] = spider_official.replace_cur_year(g)
        out["spider_order"] = spider_official.order_matters(g)
    except (ValueError, spider_official.SearchCapped) as e:
        out.update(spider_gold=None, spider_order=False, capped=f"gold: {e}")
    try:
        out["spider_pred"] = spider_official.executed_sql(spider_official.prediction_text(pred_sql), keep_distinct)
    except ValueError:
        out["spider_pred"] = None
    except spider_official.SearchCapped as e:
        out["spider_pred"], out["capped"] = None, str(e)
    return out


def _rows(r: ExecResult | None) -> Rows | None:
    return r.rows if r is not None and r.ok else None


def compare_all(
    pred: ExecResult,
    gold: ExecResult | None,
    gold_answers: Sequence[str] | None = None,
    gold_sql: str | None = None,
    pred_sql: str | None = None,
    *,
    official: OfficialRuns | None = None,
    answer_canon: Sequence[str] | None = None,
    metrics: Collection[str] | None = None,
    keep_distinct: bool = False,
    deadline: Deadline = NEVER,
) -> dict[str, Any]:
    """Every metric of a predicted result against a gold result and/or gold answers.

    Keys: ``executed``, ``gold_executed``, ``ordered`` (the outer gold query has
    ORDER BY), ``spider_capped``, and every name in `METRICS` (or only those in
    `metrics`). Metrics against gold SQL are None when there is no gold result or
    it failed; they are False/0 when the prediction failed. Denotation metrics
    are None without gold answers. ``spider_ex``, ``cell_precision`` ...
    ``tuple_order`` use `official` results when given; without them they are
    computed from `pred`/`gold` when the official rewrite leaves both texts
    unchanged, else None. `answer_canon`: WikiTQ canonical forms of the gold
    answers (``targetCanon``), computed when absent. Raises
    `jaxsql.deadline.ScoringTimeout` past `deadline`.
    """
    want = set(METRIC_NAMES if metrics is None else metrics)
    unknown = want - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"compare_all: unknown metric(s) {sorted(unknown)}")
    out: dict[str, Any] = {"executed": pred.ok, "gold_executed": None if gold is None else gold.ok,
                           "ordered": bool(gold_sql) and has_top_level_order_by(gold_sql), "spider_capped": None}
    sql_keys = [k for k in SQL_METRICS if k in want]
    if gold is None or not gold.ok:
        out.update(dict.fromkeys(sql_keys))
    else:
        out.update(_sql_metrics(pred, gold, gold_sql, pred_sql, official, sql_keys, keep_distinct, deadline, out))
    ans_keys = [k for k in ANSWER_METRICS if k in want]
    if gold_answers is None:
        out.update(dict.fromkeys(ans_keys))
    elif ans_keys:
        out.update(_answer_metrics(pred, gold_answers, answer_canon, ans_keys, deadline))
    return out


def _sql_metrics(pred: ExecResult, gold: ExecResult, gold_sql: str | None, pred_sql: str | None,
                 official: OfficialRuns | None, keys: list[str], keep_distinct: bool, deadline: Deadline,
                 out: dict[str, Any]) -> dict[str, Any]:
    p, g = (pred.rows if pred.ok else None), gold.rows
    res: dict[str, Any] = {}
    for k in keys:
        deadline.check()
        if k in ("spider_ex",) or k in qatch_official.METRICS:
            continue
        if k == "think2sql_ex":
            res[k] = think2sql_ex(p, g)
        elif k == "cp_cr_tc":
            res[k] = cp_cr_tc(p, g)
        elif p is None:
            res[k] = False if k in _BOOL_METRICS else 0.0
        elif k == "bird_ex":
            res[k] = bird_ex(p, g)
        elif k == "ex_set":
            res[k] = ex_set(p, g)
        elif k == "ex_bag":
            res[k] = ex_bag(p, g)
        elif k == "ex_bag_rowfree":
            res[k] = ex_bag_rowfree(p, g)
        elif k == "ex_ordered":
            res[k] = ex_ordered(p, g, gold_sql)
        elif k == "qatch":
            res[k] = qatch_score(p, g)
    if "spider_ex" in keys:
        res["spider_ex"], out["spider_capped"] = _spider(pred, gold, gold_sql, pred_sql, official,
                                                         keep_distinct, deadline)
    qkeys = [k for k in keys if k in qatch_official.METRICS]
    if qkeys:
        q = _qatch(pred, gold, gold_sql, pred_sql, official)
        res.update({k: (q[k] if q is not None else None) for k in qkeys})
    return res


def _spider(pred: ExecResult, gold: ExecResult, gold_sql: str | None, pred_sql: str | None,
            official: OfficialRuns | None, keep_distinct: bool, deadline: Deadline) -> tuple[bool | None, str | None]:
    if official is not None and (official.spider is not None or official.capped):
        if official.capped:
            return False, official.capped
        ordered = official.spider_order
        pairs = official.spider
    else:
        if gold_sql is None or pred_sql is None:
            return None, None
        rw = official_rewrites(pred_sql, gold_sql, keep_distinct)
        if rw["capped"]:
            return False, rw["capped"]
        if rw["spider_pred"] != pred_sql or rw["spider_gold"] != gold_sql:
            return None, None  # the rewritten queries need their own execution
        ordered, pairs = rw["spider_order"], ((pred, gold),)
    for p, g in pairs:
        if g is None or not g.ok:
            return None, None
        if p is None or not p.ok:
            return False, None
        try:
            if not spider_official.result_eq(g.rows, p.rows, ordered, deadline=deadline):
                return False, None
        except spider_official.SearchCapped as e:
            return False, str(e)
    return True, None


def _qatch(pred: ExecResult, gold: ExecResult, gold_sql: str | None, pred_sql: str | None,
           official: OfficialRuns | None) -> dict[str, float | None] | None:
    if gold_sql is None or pred_sql is None:
        return None
    if official is not None and official.qatch is not None:
        p, g = official.qatch
    elif qatch_official.prepare_sql(pred_sql) == pred_sql and qatch_official.prepare_sql(gold_sql) == gold_sql:
        p, g = pred, gold
    else:
        return None
    if not g.ok:
        return None
    return qatch_official.qatch_metrics(pred_sql, gold_sql, _rows(p), g.rows)


def _answer_metrics(pred: ExecResult, answers: Sequence[str], canon: Sequence[str] | None,
                    keys: list[str], deadline: Deadline) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if "wikitq_accuracy" in keys:
        res["wikitq_accuracy"] = pred.ok and wikitq.denotation_accuracy(
            wikitq.result_strings(pred.rows), answers, canon, deadline)
    if "denotation_exact" in keys or "denotation_relaxed" in keys:
        exact, relaxed = denotation_match(pred, answers, deadline)
        if "denotation_exact" in keys:
            res["denotation_exact"] = exact
        if "denotation_relaxed" in keys:
            res["denotation_relaxed"] = relaxed
    return res
