"""BIRD execution accuracy, as the released evaluator computes it.

Source: AlibabaResearch/DAMO-ConvAI, ``bird/llm/src/evaluation.py``
(last changed in dec31ae335d7a5168ee17d5cc40c105e0da66d4e, unchanged on main
at 483554eae102996f5ec1f4feab4e78ef29c2a394), ``execute_sql``::

    set(predicted_res) == set(ground_truth_res)

on the rows ``cursor.fetchall()`` returns: tuples of the exact values
(``1 == 1.0`` because Python says so; ``'1' != 1``; floats exact; BLOBs as
bytes; column order matters; duplicates and row order do not). A prediction
or gold query that raises or passes the timeout scores 0. The prediction file
is a JSON object ``{"0": "SQL\\t----- bird -----\\tdb_id", ...}``; a value that
is not a string is scored as the query ``" "`` (an error).
"""

from __future__ import annotations

from typing import Any, Sequence

Rows = Sequence[Sequence[Any]]

#: The separator between the SQL and the database id in a BIRD prediction file.
BIRD_SEPARATOR = "\t----- bird -----\t"


def bird_ex(pred_rows: Rows, gold_rows: Rows) -> bool:
    """``set(pred_rows) == set(gold_rows)`` with rows as tuples of exact values."""
    return {tuple(r) for r in pred_rows} == {tuple(r) for r in gold_rows}
