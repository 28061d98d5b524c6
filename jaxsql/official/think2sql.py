"""Think2SQL's released execution metrics (the values its rewards are built from).

Source: spapicchio/Think2SQL at e099208fe6cd1371ddf43429aa0c3e340181ff38
(``src/think2sql/grpo/rewards/``), whose ``uv.lock`` pins nl2sqlevaluator
1.3.4 (PyPI wheel): ``NL2SQLEvaluator/evaluator_nodes/ex_with_card.py``
(``EXEvaluator``, the ``EX_EX`` reward), ``bird_ex_evaluator.py``
(``BirdEXEvaluator``, the ``EX`` reward) and ``qatch_metrics.py``
(``QATCHEvaluator`` with ``metric="cp_cr_tc"``, the ``QATCH`` reward). With
one prediction per task the majority vote is that prediction's result.

A failed query is represented as None. The released code has one quirk kept
here: when the gold AND the predicted query both fail, both EX evaluators
return 1.0 (their "no target and no predictions" branch); Think2SQL trains
only on gold queries that run, so it never meets that case.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from jaxsql.official.qatch import sorted_row

Rows = Sequence[Sequence[Any]]


def think2sql_ex(pred: Rows | None, gold: Rows | None) -> float:
    """``EXEvaluator``: equal row counts and equal SETS of value-sorted rows.

    Rows have their values sorted (None, numbers as floats, then str), so column
    order does not matter; duplicates are not counted beyond the row count.
    """
    if gold is None:
        return 1.0 if pred is None else 0.0
    if pred is None:
        return 0.0
    target = [sorted_row(r) for r in gold]
    predicted = [sorted_row(r) for r in pred]
    if len(target) == len(predicted) == 0:
        return 1.0
    if len(target) != len(predicted):
        return 0.0
    return float(set(target) == set(predicted))


def think2sql_bird_ex(pred: Rows | None, gold: Rows | None) -> float:
    """``BirdEXEvaluator``: ``frozenset(gold rows) == frozenset(pred rows)`` (BIRD's EX)."""
    if gold is None:
        return 1.0 if pred is None else 0.0
    if pred is None:
        return 0.0
    return float(frozenset(tuple(r) for r in gold) == frozenset(tuple(r) for r in pred))


def cp_cr_tc(pred: Rows | None, gold: Rows | None) -> float:
    """``QATCHEvaluator(metric="cp_cr_tc")``: ``round((CP + CR + TC) / 3, 3)`` of rounded parts.

    0 when either query fails; both results empty = 1, exactly one empty = 0.
    """
    if gold is None or pred is None:
        return 0.0
    if len(pred) == len(gold) == 0:
        return 1.0
    if len(pred) == 0 or len(gold) == 0:
        return 0.0
    p = set(itertools.chain.from_iterable(pred))
    g = set(itertools.chain.from_iterable(gold))
    shared = len(p & g)
    cp = round(shared / len(p), 3) if p else 0.0
    cr = round(shared / len(g), 3) if g else 0.0
    tc = round(len(gold) / len(pred), 3) if len(pred) >= len(gold) else round(len(pred) / len(gold), 3)
    return round((cp + cr + tc) / 3, 3)
