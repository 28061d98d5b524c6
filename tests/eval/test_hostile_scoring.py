"""Host-side scoring is bounded: linear answer normalisation and matching, and a deadline on score_batch.

Each timing runs in a fresh subprocess with a generous wall-clock limit and
asserts the work itself took under a second of CPU time (so that a loaded
machine does not fail it); the code these replace took 21 s
(one result string through the backtracking normalisation), 13 s (10,000
cells through the quadratic denotation match) and minutes (quadratic answer
extraction).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data.records import Example
from jaxsql.rewards import RewardConfig, score_batch
from jaxsql.sql import SqlPool

REPO = Path(__file__).resolve().parents[2]


def _timed(code: str, limit_s: float = 60.0) -> dict:
    """Run `code` (which sets `result` and prints nothing) in a subprocess; returns its JSON report."""
    script = ("import json, time\nt0 = time.process_time()\n" + textwrap.dedent(code)
              + '\nprint(json.dumps({"seconds": time.process_time() - t0, "result": result}))\n')
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=limit_s, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_backtracking_prone_string_is_normalised_in_linear_time():
    # "[1]" can be read two ways by the official citation pattern, so a failing end tries 2^n readings.
    report = _timed("""
        from jaxsql.compare import denotation_match
        from jaxsql.official.wikitq import denotation_accuracy
        cell = "x" + "[1]" * 40 + "y]"
        result = [denotation_match([(cell,)], ["x"]), denotation_accuracy([cell], ["x"])]
    """)
    assert report["result"] == [[False, 0.0], False]
    assert report["seconds"] < 1.0


@pytest.mark.parametrize("call,expected", [
    ("denotation_match([(f'value {i}',) for i in range(N)], [f'value {i}' for i in range(N)])", [True, 1.0]),
    ("denotation_match([(i + 0.5,) for i in range(N)], [str(i + 0.5) for i in range(N)])", [True, 1.0]),
    ("denotation_accuracy([f'value {i}' for i in range(N)], [f'value {i}' for i in range(N)])", True),
    ("denotation_accuracy([str(i) for i in range(N)], [f'{i:,}' for i in range(N)])", True),
])
def test_ten_thousand_cells_match_in_under_a_second(call, expected):
    report = _timed(f"""
        from jaxsql.compare import denotation_match
        from jaxsql.official.wikitq import denotation_accuracy
        N = 10_000
        result = {call}
    """)
    assert report["result"] == expected
    assert report["seconds"] < 1.0


def test_hostile_completions_are_read_in_linear_time():
    report = _timed("""
        from jaxsql.extract import extract_sql, extract_sql_think2sql, format_ok, format_ok_think2sql
        text = "<answer>" * 100_000 + "```sql" * 50_000 + "</think>" * 50_000
        result = [len(extract_sql(text)), len(extract_sql_think2sql(text)), format_ok(text),
                  format_ok_think2sql("<think>" + text + "</answer>")]
    """)
    assert report["result"][2:] == [False, False]
    assert report["seconds"] < 1.0


def test_score_batch_has_a_deadline(tiny_db):
    db = str(tiny_db)
    gold = Example(id="g", db_path=db, question="q", gold_sql="SELECT x FROM big")
    qa = Example(id="a", db_path=db, question="q", gold_answers=tuple(str(i) for i in range(3000)))
    completions = ["SELECT x FROM big", "SELECT x + 1 FROM big"]
    cfg = RewardConfig(weights={"execution": 1.0, "qatch": 1.0})
    with SqlPool(2) as pool:
        fine = score_batch(pool, completions * 2, [gold, gold, qa, qa], cfg)
        late = score_batch(pool, completions * 2, [gold, gold, qa, qa], cfg, timeout_s=1e-9)
    assert fine.summary["scoring/timeouts"] == 0.0 and list(fine.components["execution"]) == [1, 0, 1, 0]
    # past the deadline every completion is scored as a failed query, quickly and in full
    assert late.summary["scoring/timeouts"] == 1.0
    assert [m["error"] for m in late.metrics] == ["timeout"] * 4
    np.testing.assert_array_equal(late.components["execution"], [-1, -1, -1, -1])
    np.testing.assert_array_equal(late.components["qatch"], [0, 0, 0, 0])
