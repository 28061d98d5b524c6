"""Hand-built result pairs with every metric's value worked out from the official definitions.

Used by the golden test (`test_official_cases.py`) and rendered into the
README's metrics table (`render_table`), which a test keeps in sync.
Expected values (columns of `METRIC_COLUMNS`): ``T``/``F`` for accuracy
metrics, numbers for QATCH/Think2SQL scores, ``-`` where the metric is not
reported (QATCH's tuple order without ``order by`` in the gold text).
"""

from __future__ import annotations

import dataclasses
from typing import Any

METRIC_COLUMNS = ("bird_ex", "spider_ex", "cell_precision", "cell_recall", "tuple_cardinality",
                  "tuple_constraint", "tuple_order", "think2sql_ex", "cp_cr_tc", "ex_set", "ex_bag",
                  "ex_bag_rowfree", "ex_ordered")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    gold: list[tuple[Any, ...]]
    pred: list[tuple[Any, ...]]
    gold_sql: str
    expected: str  # one entry per METRIC_COLUMNS, space separated
    pred_sql: str = "SELECT * FROM prediction"

    def values(self) -> dict[str, Any]:
        """Metric name -> expected value (True/False, a float, or None)."""
        words = {"T": True, "F": False, "-": None}
        return {name: words[t] if t in words else float(t)
                for name, t in zip(METRIC_COLUMNS, self.expected.split(), strict=True)}


ORDER = "SELECT id FROM t ORDER BY id"
PLAIN = "SELECT id FROM t"
CASES = (
    #                                                               bird spid cp   cr   tc    tcons tord  t2s  cpcrtc set  bag  rowf ord
    Case("reordered columns", [(1, "a"), (2, "b")], [("a", 1), ("b", 2)], "SELECT id, name FROM t",
         "F T 1 1 1 1 - 1 1 F F T T"),
    Case("one permutation for every row", [(1, 2), (3, 4)], [(2, 1), (3, 4)], "SELECT a, b FROM t",
         "F F 1 1 1 1 - 1 1 F F T T"),
    Case("reordered rows, no order by", [(1,), (2,), (3,)], [(3,), (1,), (2,)], PLAIN,
         "T T 1 1 1 1 - 1 1 T T T T"),
    Case("reordered rows, order by", [(1,), (2,), (3,)], [(3,), (1,), (2,)], ORDER,
         "T F 1 1 1 1 0.25 1 1 T T T F"),
    Case("order by only in a subquery", [(1,), (2,), (3,)], [(3,), (1,), (2,)],
         "SELECT id FROM (SELECT id FROM t ORDER BY id LIMIT 3)",
         "T F 1 1 1 1 0.25 1 1 T T T T"),
    Case("duplicated rows", [(1,), (2,)], [(1,), (2,), (2,)], PLAIN,
         "T F 1 1 0.667 0.5 - 0 0.889 T F F F"),
    Case("NULLs", [(None, "x"), (1, "y")], [("y", 1), ("x", None)], "SELECT a, b FROM t",
         "F T 1 1 1 1 - 1 1 F F T T"),
    Case("1 vs 1.0", [(1,)], [(1.0,)], PLAIN,
         "T T 1 1 1 1 - 1 1 T T T T"),
    Case("text vs number", [(1,)], [("1",)], PLAIN,
         "F F 0 0 1 0 - 0 0.333 F F F F"),
    Case("floats differing in the 10th digit", [(0.1234567891,)], [(0.1234567892,)], PLAIN,
         "F F 0 0 1 0 - 0 0.333 T T T T"),
    Case("BLOB vs its hex text", [(b"\x01\xff",)], [("x'01ff'",)], PLAIN,
         "F F 0 0 1 0 - 0 0.333 T T T T"),
    Case("both empty", [], [], PLAIN,
         "T T 1 1 1 1 - 1 1 T T T T"),
    Case("empty vs one row", [], [(1,)], PLAIN,
         "F F 0 0 0 0 - 0 0 F F F F"),
)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if v is True:
        return "✓"
    if v is False:
        return "✗"
    return f"{v:g}"


def _rows(rows: list[tuple[Any, ...]]) -> str:
    return "`" + repr(rows).replace("|", "\\|") + "`" if rows else "`[]`"


def render_table(computed: dict[str, dict[str, Any]]) -> str:
    """The README table: one row per case with the values `computed` holds (metric -> value)."""
    head = "| case | gold | prediction | gold SQL has | " + " | ".join(f"`{m}`" for m in METRIC_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (4 + len(METRIC_COLUMNS))]
    for case in CASES:
        order = ("outer ORDER BY" if case.gold_sql.startswith("SELECT id FROM t ORDER")
                 else "ORDER BY in a subquery" if "ORDER BY" in case.gold_sql else "no ORDER BY")
        lines.append(f"| {case.name} | {_rows(case.gold)} | {_rows(case.pred)} | {order} | "
                     + " | ".join(_cell(computed[case.name][m]) for m in METRIC_COLUMNS) + " |")
    return "\n".join(lines)
