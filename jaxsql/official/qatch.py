"""QATCH metrics, as the released library computes them (in linear time).

Source: spapicchio/QATCH at ae47e4496e33a9894f822184ddb44d90164f4aa8,
``qatch/evaluate_dataset/metrics_evaluators/{cell_precision,cell_recall,
tuple_cardinality,tuple_constraint,tuple_order,utils}.py`` and the rules of
``orchestrator_evaluator.py`` (``OrchestratorEvaluator.evaluate_single_test``):

- Every query runs with every ``;`` removed (``query.replace(";", "")``).
- When the gold and predicted SQL are equal ignoring case, every metric is 1
  without running anything.
- A prediction that fails to run scores 0 on every metric.
- Tuple order is reported only when the text ``order by`` occurs in the
  lower-cased gold SQL (anywhere); otherwise it is None.
- Per metric: both results empty = 1, exactly one empty = 0; values are rounded
  to 3 decimals; cells and rows compare with Python equality (``1 == 1.0``).

  cell_precision   = |set(P cells) & set(G cells)| / |set(P cells)|
  cell_recall      = |set(P cells) & set(G cells)| / |set(G cells)|
  tuple_cardinality= min(|P|, |G|) / max(|P|, |G|)        (rows)
  tuple_constraint = share of distinct gold rows whose count in P equals
                     their count in G, rows compared with their values sorted
                     by (None first, numbers as floats, then str)
  tuple_order      = Spearman's rho (rounded) over the distinct rows both results
                     share, in first-occurrence order, mapped to [0, 1] by
                     (rho + 1) / 2; one shared row counts as n = 2; none: rho = 0

The released ``tuple_order`` tests list membership row by row (quadratic);
here the same values come from hash lookups.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Sequence

Rows = Sequence[Sequence[Any]]

METRICS = ("cell_precision", "cell_recall", "tuple_cardinality", "tuple_constraint", "tuple_order")


def prepare_sql(sql: str) -> str:
    """The text QATCH executes: every ``;`` removed."""
    return sql.replace(";", "")


def is_order(gold_sql: str) -> bool:
    """``"order by" in target_query.lower()``: whether tuple order is reported."""
    return "order by" in gold_sql.lower()


def sort_key(x: Any) -> tuple[int, Any]:
    """``utils.sort_key``: None first, then numbers (as float), then everything else as str."""
    if x is None:
        return 0, ""
    if isinstance(x, (int, float)):
        return 1, float(x)
    return 2, str(x)


def sorted_row(row: Sequence[Any]) -> tuple[Any, ...]:
    """A row with its values sorted by `sort_key` (projection order does not matter)."""
    return tuple(sorted(row, key=sort_key))


def _empty(pred: Rows, gold: Rows) -> float | None:
    if len(gold) == 0 and len(pred) == 0:
        return 1.0
    if len(gold) == 0 or len(pred) == 0:
        return 0.0
    return None


def cell_precision(pred: Rows, gold: Rows) -> float:
    """``|cells(P) & cells(G)| / |cells(P)|``, rounded to 3 decimals."""
    e = _empty(pred, gold)
    if e is not None:
        return e
    p = set(itertools.chain.from_iterable(pred))
    return round(len(p & set(itertools.chain.from_iterable(gold))) / len(p), 3)


def cell_recall(pred: Rows, gold: Rows) -> float:
    """``|cells(P) & cells(G)| / |cells(G)|``, rounded to 3 decimals."""
    e = _empty(pred, gold)
    if e is not None:
        return e
    g = set(itertools.chain.from_iterable(gold))
    return round(len(set(itertools.chain.from_iterable(pred)) & g) / len(g), 3)


def tuple_cardinality(pred: Rows, gold: Rows) -> float:
    """``min(|P|, |G|) / max(|P|, |G|)`` in rows, rounded to 3 decimals; both empty = 1."""
    if len(gold) == 0 and len(pred) == 0:
        return 1.0
    if len(pred) >= len(gold):
        return round(len(gold) / len(pred), 3)
    return round(len(pred) / len(gold), 3)


def tuple_constraint(pred: Rows, gold: Rows) -> float:
    """Share of distinct (value-sorted) gold rows whose count in P equals their count in G."""
    e = _empty(pred, gold)
    if e is not None:
        return e
    g = collections.Counter(sorted_row(r) for r in gold)
    p = collections.Counter(sorted_row(r) for r in pred)
    return round(sum(p[k] == n for k, n in g.items()) / len(g), 3)


def tuple_order(pred: Rows, gold: Rows) -> float:
    """Spearman's rho of the shared distinct rows' positions, rounded, mapped to [0, 1]."""
    e = _empty(pred, gold)
    if e is not None:
        return e
    pred_t = [tuple(r) for r in pred]
    gold_t = [tuple(r) for r in gold]
    in_gold, in_pred = set(gold_t), set(pred_t)
    new_pred = list(dict.fromkeys(r for r in pred_t if r in in_gold))
    new_target = list(dict.fromkeys(r for r in gold_t if r in in_pred))
    if not new_target:
        rho = 0.0
    else:
        rank = {r: i for i, r in enumerate(new_target)}
        d2 = sum((i - rank[r]) ** 2 for i, r in enumerate(new_pred))
        n = len(new_target) if len(new_target) > 1 else 2
        rho = 1 - 6 * d2 / (n * (n ** 2 - 1))
    rho = round(rho, 3)
    return float((rho - -1.0) / (1.0 - -1.0))


def qatch_metrics(pred_sql: str, gold_sql: str, pred_rows: Rows | None, gold_rows: Rows) -> dict[str, float | None]:
    """The five metrics as ``evaluate_single_test`` reports them.

    `pred_rows` is None when the prediction failed; `gold_rows` must come from
    a gold query that ran (QATCH raises otherwise). Rows are the results of
    `prepare_sql` of each query.
    """
    ordered = is_order(gold_sql)
    if gold_sql.lower() == pred_sql.lower():
        out = dict.fromkeys(METRICS, 1.0)
    elif pred_rows is None:
        out = dict.fromkeys(METRICS, 0.0)
    else:
        out = {"cell_precision": cell_precision(pred_rows, gold_rows),
               "cell_recall": cell_recall(pred_rows, gold_rows),
               "tuple_cardinality": tuple_cardinality(pred_rows, gold_rows),
               "tuple_constraint": tuple_constraint(pred_rows, gold_rows),
               "tuple_order": tuple_order(pred_rows, gold_rows)}
    out["tuple_order"] = out["tuple_order"] if ordered else None
    return out
