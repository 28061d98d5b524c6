"""Every metric on hand-built result pairs, against values worked out from the official definitions."""

from pathlib import Path

import pytest

from jaxsql.compare import compare_all
from jaxsql.sql import ExecResult
from tests.eval.official_cases import CASES, METRIC_COLUMNS, render_table

README = Path(__file__).resolve().parents[2] / "README.md"


def _compute(case):
    def res(rows):
        return ExecResult(ok=True, columns=tuple(f"c{i}" for i in range(len(rows[0]) if rows else 1)),
                          rows=tuple(rows))

    return compare_all(res(case.pred), res(case.gold), gold_sql=case.gold_sql, pred_sql=case.pred_sql)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_metric_equals_the_official_value(case):
    got = _compute(case)
    expected = case.values()
    assert {m: got[m] for m in METRIC_COLUMNS} == expected
    for m, v in expected.items():  # booleans stay booleans, scores stay numbers
        assert type(got[m]) is type(v) or (isinstance(v, float) and isinstance(got[m], float))


def test_readme_table_shows_the_same_cases():
    table = render_table({c.name: _compute(c) for c in CASES})
    assert table in README.read_text(), "README's metrics table is out of date; paste render_table's output"
