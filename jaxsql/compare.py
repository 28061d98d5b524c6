"""Compare query results: execution accuracy, QATCH metrics, answer denotations.

All functions are pure. Rows are sequences of tuples as `ExecResult.rows`
holds them. Before any comparison every value goes through `normalize_value`:
integers and floats with the same value are equal (``1 == 1.0``), floats are
rounded to `FLOAT_DIGITS` decimal places (so ``0.1 + 0.2`` equals ``0.3``),
strings are compared exactly (case-sensitive, as the BIRD and Spider
evaluators do); ``NULL`` equals ``NULL``.
"""

from __future__ import annotations

import collections
import datetime
import functools
import math
import re
import unicodedata
from typing import Any, Iterable, Sequence

from jaxsql.sql.result import ExecResult

FLOAT_DIGITS = 6
Rows = Sequence[Sequence[Any]]


# ---------------------------------------------------------------------------
# value and row normalisation
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
# execution accuracy
def ex_set(pred: Rows, gold: Rows) -> bool:
    """BIRD execution accuracy: ``set(pred_rows) == set(gold_rows)``.

    Rows are compared as tuples (column order matters), duplicates and row
    order are ignored. Source: BIRD evaluation script (Li et al. 2023).
    """
    return {_row(r) for r in pred} == {_row(r) for r in gold}


def ex_bag(pred: Rows, gold: Rows) -> bool:
    """Think2SQL refined EX: ``Counter(bag(r) for r in pred) == Counter(bag(r) for r in gold)``.

    Each row is a multiset of its values (column order free), and the result
    is a multiset of such rows (duplicates count, row order does not).
    Source: Papicchio et al. 2025, Think2SQL, refined execution accuracy.
    """
    return collections.Counter(_row_bag(r) for r in pred) == collections.Counter(_row_bag(r) for r in gold)


def ex_ordered(pred: Rows, gold: Rows, gold_sql: str | None) -> bool:
    """Spider test-suite EX: when the gold SQL has a top-level ORDER BY the row
    sequences must be equal (``[bag(r) for r in pred] == [bag(r) for r in gold]``),
    otherwise `ex_bag`. Source: Zhong et al. 2020, test-suite evaluation
    (``order_matters`` is true iff the gold query has ``ORDER BY``).
    """
    if gold_sql is not None and has_top_level_order_by(gold_sql):
        return [_row_bag(r) for r in pred] == [_row_bag(r) for r in gold]
    return ex_bag(pred, gold)


_QUOTED = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]""")


@functools.lru_cache(maxsize=65_536)
def has_top_level_order_by(sql: str) -> bool:
    """True when the outermost query of `sql` has ORDER BY (not one inside a subquery or CTE).

    Parsed with sqlglot (SQLite); text sqlglot cannot parse is scanned for
    ``ORDER BY`` at parenthesis depth 0 outside quotes.
    """
    try:
        import sqlglot
        from sqlglot import exp

        root = sqlglot.parse_one(sql, read="sqlite")
        if isinstance(root, exp.Query):
            return root.args.get("order") is not None
    except Exception:  # noqa: BLE001 - fall back to the textual scan below
        pass
    text = _QUOTED.sub("''", sql)
    depth = 0
    flat = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        flat.append(ch if depth == 0 else " ")
    return re.search(r"\border\s+by\b", "".join(flat), flags=re.IGNORECASE) is not None


# ---------------------------------------------------------------------------
# QATCH metrics (Papicchio et al. 2023, NeurIPS Datasets & Benchmarks)
def _cells(rows: Rows) -> set[Any]:
    return {normalize_value(v) for r in rows for v in r}


def _empty_rule(pred: Rows, gold: Rows) -> float | None:
    if len(pred) == 0 and len(gold) == 0:
        return 1.0
    if len(pred) == 0 or len(gold) == 0:
        return 0.0
    return None


def cell_precision(pred: Rows, gold: Rows) -> float:
    """QATCH cell precision: ``|cells(pred) ∩ cells(gold)| / |cells(pred)|``.

    ``cells`` is the set of all values of all rows (deduplicated); both
    results empty = 1, one empty = 0.
    """
    e = _empty_rule(pred, gold)
    if e is not None:
        return e
    p = _cells(pred)
    return len(p & _cells(gold)) / len(p)


def cell_recall(pred: Rows, gold: Rows) -> float:
    """QATCH cell recall: ``|cells(pred) ∩ cells(gold)| / |cells(gold)|`` (empty rules as `cell_precision`)."""
    e = _empty_rule(pred, gold)
    if e is not None:
        return e
    g = _cells(gold)
    return len(_cells(pred) & g) / len(g)


def tuple_cardinality(pred: Rows, gold: Rows) -> float:
    """QATCH tuple cardinality: ``min(|pred|, |gold|) / max(|pred|, |gold|)`` in rows; both empty = 1."""
    if len(pred) == 0 and len(gold) == 0:
        return 1.0
    return min(len(pred), len(gold)) / max(len(pred), len(gold))


def tuple_constraint(pred: Rows, gold: Rows) -> float:
    """QATCH tuple constraint: fraction of distinct gold tuples whose count in pred equals their count in gold.

    ``TCS = |{t in G : count_P(t) = count_G(t)}| / |G|`` over distinct gold
    tuples, each tuple a multiset of values (projection order free); empty rules as above.
    """
    e = _empty_rule(pred, gold)
    if e is not None:
        return e
    pc = collections.Counter(_row_bag(r) for r in pred)
    gc = collections.Counter(_row_bag(r) for r in gold)
    return sum(pc[t] == n for t, n in gc.items()) / len(gc)


def tuple_order(pred: Rows, gold: Rows, gold_sql: str | None = None) -> float | None:
    """QATCH tuple order: Spearman's rho of the shared rows' positions, mapped to [0, 1].

    Only rows present in both results count (first occurrence, order kept):
    ``rho = 1 - 6 Σ d_i² / (n (n² - 1))`` with ``d_i`` the rank difference and
    ``n`` the number of shared rows (``n = 2`` when a single row is shared);
    the score is ``(rho + 1) / 2``; no shared row gives rho = 0 (score 0.5);
    empty rules as above. Returns None when `gold_sql` is given and has no
    top-level ORDER BY (order is then meaningless).
    """
    if gold_sql is not None and not has_top_level_order_by(gold_sql):
        return None
    e = _empty_rule(pred, gold)
    if e is not None:
        return e
    p_rows = [_row(r) for r in pred]
    g_rows = [_row(r) for r in gold]
    p_set, g_set = set(p_rows), set(g_rows)
    shared_pred = list(dict.fromkeys(r for r in p_rows if r in g_set))
    shared_gold = list(dict.fromkeys(r for r in g_rows if r in p_set))
    if not shared_gold:
        rho = 0.0
    else:
        rank = {r: i for i, r in enumerate(shared_gold)}
        d2 = sum((i - rank[r]) ** 2 for i, r in enumerate(shared_pred))
        n = len(shared_gold) if len(shared_gold) > 1 else 2
        rho = 1 - 6 * d2 / (n * (n * n - 1))
    return (rho + 1) / 2


def qatch_score(pred: Rows, gold: Rows) -> float:
    """Think2SQL dense reward: mean of cell precision, cell recall and tuple cardinality."""
    return (cell_precision(pred, gold) + cell_recall(pred, gold) + tuple_cardinality(pred, gold)) / 3


# ---------------------------------------------------------------------------
# denotation match (WikiTableQuestions evaluator semantics, Pasupat & Liang 2015)
_DATE_FORMATS = (
    "%Y-%m-%d", "%Y/%m/%d", "%d/%m/%Y", "%B %d, %Y", "%b %d, %Y", "%d %B %Y", "%d %b %Y",
    "%B %d %Y", "%b %d %Y", "%Y-%m", "%B %Y", "%b %Y",
)


def normalize_text(x: str) -> str:
    """WikiTQ string normalisation: strip accents, unify quotes and dashes,
    drop trailing citations/parentheses and outer quotes, drop a final ``.``,
    collapse whitespace, lower-case."""
    x = "".join(c for c in unicodedata.normalize("NFKD", x) if unicodedata.category(c) != "Mn")
    x = re.sub(r"[‘’´`]", "'", x)
    x = re.sub(r"[“”]", '"', x)
    x = re.sub(r"[‐‑‒–—−]", "-", x)
    while True:
        before = x
        x = re.sub(r"((?<!^)\[[^\]]*\]|\[\d+\]|[•♦†‡*#+])*$", "", x.strip())
        x = re.sub(r"(?<!^)( \([^)]*\))*$", "", x.strip())
        x = re.sub(r'^"([^"]*)"$', r"\1", x.strip())
        if x == before:
            break
    if x.endswith("."):
        x = x[:-1]
    return re.sub(r"\s+", " ", x).lower().strip()


def parse_number(text: str) -> float | None:
    """A number from text: ``1,000`` = ``1000`` = ``1000.0``; a trailing ``%`` is dropped (``45%`` = 45)."""
    s = text.strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def parse_date(text: str) -> tuple[int, int, int] | None:
    """``(year, month, day)`` of a date string (ISO, ``May 3, 2010``, ``3 May 2010``...); -1 for a missing part."""
    s = re.sub(r"\s+", " ", text.strip())
    s = re.sub(r"[T ]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?$", "", s)  # a time of day carries no date information
    s = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", s)
    for fmt in _DATE_FORMATS:
        try:
            d = datetime.datetime.strptime(s, fmt)
        except ValueError:
            continue
        has_day = "%d" in fmt
        return (d.year, d.month, d.day if has_day else -1)
    return None


class _Value:
    __slots__ = ("kind", "key", "text")

    def __init__(self, kind: str, key: Any, text: str) -> None:
        self.kind, self.key, self.text = kind, key, text

    def match(self, other: "_Value") -> bool:
        if self.kind == other.kind == "num":
            return math.isclose(self.key, other.key, rel_tol=1e-9, abs_tol=1e-6)
        if self.kind == other.kind == "date":
            return self.key == other.key
        return self.text == other.text


def _to_value(v: Any) -> _Value:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        text = normalize_text(repr(normalize_value(v)))
        return _Value("num", float(v), text)
    s = str(v)
    text = normalize_text(s)
    n = parse_number(s)
    if n is not None:
        return _Value("num", n, text)
    d = parse_date(s)
    if d is not None:
        return _Value("date", d, text)
    return _Value("str", text, text)


def _dedupe(values: Iterable[_Value]) -> list[_Value]:
    out: list[_Value] = []
    for v in values:
        if not any(v.kind == u.kind and v.match(u) for u in out):
            out.append(v)
    return out


def denotation_match(result: ExecResult | Rows, gold_answers: Sequence[str]) -> tuple[bool, float]:
    """Match a result's cells against gold answer strings; returns ``(exact, relaxed)``.

    The predicted values are all non-NULL cells of all rows; predicted and gold
    values are each deduplicated and typed as number (``1,000`` = ``1000`` =
    ``1000.0``, ``45%`` = ``45``; equal within 1e-6), date (year, month, day) or
    normalised string (`normalize_text`); values of different types match when
    their normalised strings are equal. ``exact``: as many predicted as gold
    values and every gold value matched (WikiTQ ``check_denotation``).
    ``relaxed``: fraction of gold values matched by some predicted value. A
    failed result is ``(False, 0.0)``. Source: WikiTableQuestions official
    evaluator (Pasupat & Liang 2015), also used by TempTabQA-C (Kulkarni et al.).
    """
    if isinstance(result, ExecResult):
        if not result.ok:
            return False, 0.0
        rows: Rows = result.rows
    else:
        rows = result
    pred = _dedupe(_to_value(v) for r in rows for v in r if v is not None)
    gold = _dedupe(_to_value(a) for a in gold_answers)
    if not gold:
        return (not pred), (1.0 if not pred else 0.0)
    matched = [any(g.match(p) for p in pred) for g in gold]
    exact = len(pred) == len(gold) and all(matched)
    return exact, sum(matched) / len(gold)


# ---------------------------------------------------------------------------
def compare_all(
    pred: ExecResult,
    gold: ExecResult | None,
    gold_answers: Sequence[str] | None = None,
    gold_sql: str | None = None,
) -> dict[str, Any]:
    """Every metric of a predicted result against a gold result and/or gold answers.

    Keys: ``executed``, ``gold_executed``, ``ordered`` (gold has a top-level
    ORDER BY), ``ex_set``, ``ex_bag``, ``ex_ordered``, ``cell_precision``,
    ``cell_recall``, ``tuple_cardinality``, ``tuple_constraint``,
    ``tuple_order``, ``qatch``, ``denotation_exact``, ``denotation_relaxed``.
    Metrics against gold SQL are None when there is no gold result or it
    failed; they are False/0.0 when the prediction failed. Denotation metrics
    are None without gold answers.
    """
    out: dict[str, Any] = {"executed": pred.ok, "gold_executed": None if gold is None else gold.ok}
    ordered = has_top_level_order_by(gold_sql) if gold_sql else False
    out["ordered"] = ordered
    sql_keys = ("ex_set", "ex_bag", "ex_ordered", "cell_precision", "cell_recall",
                "tuple_cardinality", "tuple_constraint", "tuple_order", "qatch")
    if gold is None or not gold.ok:
        out.update(dict.fromkeys(sql_keys))
    elif not pred.ok:
        out.update({"ex_set": False, "ex_bag": False, "ex_ordered": False, "cell_precision": 0.0,
                    "cell_recall": 0.0, "tuple_cardinality": 0.0, "tuple_constraint": 0.0,
                    "tuple_order": 0.0 if ordered else None, "qatch": 0.0})
    else:
        p, g = pred.rows, gold.rows
        out.update({
            "ex_set": ex_set(p, g),
            "ex_bag": ex_bag(p, g),
            "ex_ordered": ex_bag(p, g) if not ordered else [_row_bag(r) for r in p] == [_row_bag(r) for r in g],
            "cell_precision": cell_precision(p, g),
            "cell_recall": cell_recall(p, g),
            "tuple_cardinality": tuple_cardinality(p, g),
            "tuple_constraint": tuple_constraint(p, g),
            "tuple_order": tuple_order(p, g) if ordered else None,
        })
        out["qatch"] = (out["cell_precision"] + out["cell_recall"] + out["tuple_cardinality"]) / 3
    if gold_answers is None:
        out["denotation_exact"] = out["denotation_relaxed"] = None
    else:
        out["denotation_exact"], out["denotation_relaxed"] = denotation_match(pred, gold_answers)
    return out
