"""Every GeoQuery gold SQL, variables substituted, runs in the sandbox (real data)."""

import json
import re

import pytest

from jaxsql.sql import SqlPool

pytestmark = pytest.mark.real_data


def substitute(sql: str, variables: dict) -> str:
    """text2sql-data convention: variable names (``state_name0``) stand in the SQL text for their values."""
    for name in sorted(variables, key=len, reverse=True):
        sql = re.sub(rf"\b{re.escape(name)}\b", lambda _m, v=variables[name]: v, sql)
    return sql


def test_substitute():
    assert substitute('WHERE s = "state_name0" AND c = "city_name10"', {"state_name0": "texas", "city_name10": "austin"}) \
        == 'WHERE s = "texas" AND c = "austin"'


def test_geoquery_gold_sql_runs(real_data):
    root = real_data / "geoquery"
    if not (root / "geography.json").is_file():
        pytest.skip("geoquery not in the real data")
    db = str(root / "geography.sqlite")
    jobs = []
    for entry in json.loads((root / "geography.json").read_text()):
        for sentence in entry["sentences"]:
            for sql in entry["sql"]:
                jobs.append((db, substitute(sql, sentence["variables"])))
    with SqlPool(2, timeout_s=10.0) as pool:
        results = pool.execute_batch(jobs)
        stats = pool.stats()
    ran = sum(r.ok for r in results)
    failures = sorted({(r.error, r.message) for r in results if not r.ok})
    print(f"\nGeoQuery: {ran}/{len(jobs)} gold queries ran ({stats['executed']} distinct executions); "
          f"failures: {failures[:5]}")
    assert len(jobs) > 800
    assert ran / len(jobs) >= 0.95
