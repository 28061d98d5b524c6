"""CoCTE completions: step splitting, prefix execution, broken chains, rendering, hostile input."""

import time

import pytest

from jaxsql.cocte import (MAX_STEPS, STEP_TAG, execute_completions, format_chain, render_result,
                          render_trajectory, split_completion, split_steps, trajectory_segments)
from jaxsql.sql import ExecResult, SqlPool

CHAIN = ("WITH adults AS (SELECT * FROM people WHERE age >= 30),\n\n"
         "paris AS (SELECT name, age FROM adults WHERE city = 'Paris')\n\n"
         "SELECT name FROM paris ORDER BY age")


class CountingPool(SqlPool):
    """A pool that counts `execute_batch` calls."""

    calls = 0

    def execute_batch(self, jobs):
        self.calls += 1
        return super().execute_batch(jobs)


def test_split_well_formed_chain_golden():
    chain = split_steps(CHAIN)
    assert chain.method == "sqlglot" and chain.problems == () and chain.is_cocte
    assert [s.kind for s in chain.steps] == ["cte", "cte", "final"]
    assert [s.name for s in chain.steps] == ["adults", "paris", None]
    assert [s.text for s in chain.steps] == [
        "WITH adults AS (SELECT * FROM people WHERE age >= 30),",
        "paris AS (SELECT name, age FROM adults WHERE city = 'Paris')",
        "SELECT name FROM paris ORDER BY age"]
    assert [CHAIN[s.start:s.end] for s in chain.steps] == [s.text for s in chain.steps]
    assert chain.steps[0].query == "WITH adults AS (SELECT * FROM people WHERE age >= 30) SELECT * FROM adults LIMIT 50"
    assert chain.steps[1].query == ("WITH adults AS (SELECT * FROM people WHERE age >= 30), paris AS (SELECT name, "
                                    "age FROM adults WHERE city = 'Paris') SELECT * FROM paris LIMIT 50")
    assert chain.steps[2].query == CHAIN


def test_leading_comment_and_lower_case():
    chain = split_steps("-- two steps\nwith a as (select 1 as x)\n\nselect x from a")
    assert chain.is_cocte and chain.steps[0].text.startswith("-- two steps\nwith a as")
    assert chain.steps[0].query == "WITH a as (select 1 as x) SELECT * FROM a LIMIT 50"


def test_split_whitespace_free_and_quoted_names():
    sql = 'WITH RECURSIVE "a b"(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM "a b" WHERE n < 3), c AS ' \
          "(SELECT ')' AS p) SELECT * FROM \"a b\", c;"
    chain = split_steps(sql)
    assert chain.is_cocte and [s.name for s in chain.steps] == ['"a b"', "c", None]
    assert chain.steps[1].query.startswith('WITH RECURSIVE "a b"(n) AS (')
    assert chain.steps[1].query.endswith("c AS (SELECT ')' AS p) SELECT * FROM c LIMIT 50")
    assert chain.steps[2].text == 'SELECT * FROM "a b", c;'


@pytest.mark.parametrize("sql,problems,kinds", [
    ("WITH a AS (SELECT 1)", ("final_missing",), ["cte"]),
    ("WITH a AS (SELECT 1),", ("final_missing",), ["cte"]),
    ("WITH a AS (SELECT 1);", ("final_missing",), ["cte"]),
    ("WITH a AS (SELECT 1),\n\nb AS (SELECT (2 + ", ("unterminated",), ["cte", "cte"]),
    ("SELECT name FROM people", ("not_cocte",), ["final"]),
    ("", ("empty",), []),
    ("   \n ", ("empty",), []),
])
def test_split_broken_chains_never_raise(sql, problems, kinds):
    chain = split_steps(sql)
    assert chain.problems == problems
    assert [s.kind for s in chain.steps] == kinds
    assert not chain.is_cocte


def test_unterminated_step_cannot_run_but_earlier_steps_can():
    chain = split_steps("WITH a AS (SELECT 1),\n\nb AS (SELECT (2 + ")
    assert chain.steps[0].query is not None
    assert chain.steps[1].query is None and chain.steps[1].problem == "unterminated"


def test_blank_line_fallback_when_sqlglot_cannot_tokenize():
    sql = "WITH a AS (SELECT 1 AS x),\n\nb AS (SELECT x FROM a)\n\nSELECT 'unterminated FROM b"
    chain = split_steps(sql)
    assert chain.method == "blank_line"
    assert [s.kind for s in chain.steps] == ["cte", "cte", "final"]
    assert chain.steps[1].query == "WITH a AS (SELECT 1 AS x),\n\nb AS (SELECT x FROM a) SELECT * FROM b LIMIT 50"
    assert chain.steps[2].query == sql


def test_blank_line_fallback_when_the_cte_grammar_breaks():
    sql = "WITH AS (SELECT 1)\n\nSELECT 2"
    chain = split_steps(sql)
    assert chain.method == "blank_line"
    assert chain.steps[0].problem == "no_cte_name" and chain.steps[0].query is None
    assert chain.problems == ("no_cte_name",)


def test_split_completion_reads_the_fenced_sql():
    completion = "Here it is:\n```sql\n" + CHAIN + "\n```\nDone."
    offset, chain = split_completion(completion)
    assert completion[offset:offset + len(CHAIN)] == CHAIN
    assert chain.is_cocte and len(chain.steps) == 3


def test_prefixes_execute_in_one_pool_call_with_cache(tiny_db):
    db = str(tiny_db)
    forward = ("WITH a AS (SELECT * FROM later),\n\nlater AS (SELECT 1 AS x)\n\nSELECT * FROM a")
    items = [(db, CHAIN), (db, CHAIN), (db, forward), (db, "WITH a AS (SELECT (1"), (db, "SELECT count(*) FROM people")]
    with CountingPool(2) as pool:
        trajs = execute_completions(pool, items)
        assert pool.calls == 1
        stats = pool.stats()
    assert stats["hits"] >= 3  # the second copy of CHAIN is served from the first's jobs
    t = trajs[0]
    assert [r.ok for r in t.results] == [True, True, True]
    assert set(t.results[0].rows) == {(1, "Ann", 30, "Paris"), (3, "Cid", 35, "Paris")}
    assert t.results[1].rows == (("Ann", 30), ("Cid", 35))
    assert t.results[2].rows == (("Ann",), ("Cid",)) and t.executable
    bad = trajs[2]  # step 1 names a step defined after it
    assert not bad.results[0].ok and "no such table: later" in bad.results[0].message
    assert not bad.executable
    unterminated = trajs[3]
    assert unterminated.results[0].error == "syntax" and "never closed" in unterminated.results[0].message
    plain = trajs[4]
    assert len(plain.steps) == 1 and plain.results[0].rows == ((4,),) and plain.executable


def test_render_result_golden():
    ok = ExecResult(ok=True, columns=("a", "b"), rows=(("x", 1), ("y", 2), ("x", 1)))
    assert render_result(ok) == "{('x', 1): 2, ('y', 2): 1}"
    assert render_result(ExecResult(ok=True, columns=("a",), rows=())) == "{}"
    many = ExecResult(ok=True, columns=("a",), rows=tuple((i,) for i in range(1000)))
    text = render_result(many, max_chars=40)
    assert text == "{(0,): 1, (1,): 1, (2,): 1, (3,): 1, (4,...}"  # the first 40 characters + "...}"
    err = ExecResult.failure("syntax", "no such table: t")
    assert render_result(err) == "Execution error: no such table: t"


def test_render_trajectory_released_layout(tiny_db):
    with SqlPool(1) as pool:
        (t,) = execute_completions(pool, [(str(tiny_db), "WITH a AS (SELECT 1 AS x)\n\nSELECT x + 1 FROM a")])
    assert render_trajectory(t) == ("WITH a AS (SELECT 1 AS x)<result>{(1,): 1}</result> и "
                                    "SELECT x + 1 FROM a<result>{(2,): 1}</result> и")
    segs = trajectory_segments(t)
    assert [is_tag for _, is_tag in segs] == [False, True, False, True]
    assert all(text == STEP_TAG for text, is_tag in segs if is_tag)


def test_format_chain_layout_splits_back():
    text = format_chain(["a AS (SELECT 1 AS x)", "b AS (SELECT x FROM a)"], "SELECT * FROM b")
    assert text == "WITH a AS (SELECT 1 AS x),\n\nb AS (SELECT x FROM a)\n\nSELECT * FROM b"
    assert [s.text for s in split_steps(text).steps] == ["WITH a AS (SELECT 1 AS x),", "b AS (SELECT x FROM a)",
                                                        "SELECT * FROM b"]


# --- hostile input --------------------------------------------------------------------


def test_thousands_of_steps_are_cut_to_max_steps(tiny_db):
    ctes = [f"s{i} AS (SELECT {i} AS x)" for i in range(3000)]
    sql = format_chain(ctes, "SELECT * FROM s2999")
    chain = split_steps(sql, max_chars=len(sql) + 1)  # past the character limit on purpose
    assert len(chain.steps) == MAX_STEPS and "too_many_steps" in chain.problems and not chain.has_final
    with CountingPool(2) as pool:
        start = time.perf_counter()
        (t,) = execute_completions(pool, [(str(tiny_db), sql)])
        assert time.perf_counter() - start < 30
    assert t.chain.problems == ("too_long",) and t.steps == ()  # the default limit refuses to split it at all


def test_huge_completion_is_not_split_and_runs_nothing(tiny_db):
    huge = "WITH a AS (SELECT 1)\n\n" + "SELECT 1 UNION ALL " * 100_000 + "SELECT 1"
    with CountingPool(1) as pool:
        start = time.perf_counter()
        (t,) = execute_completions(pool, [(str(tiny_db), huge)])
        elapsed = time.perf_counter() - start
        assert pool.stats()["executed"] == 0
    assert t.chain.problems == ("too_long",) and t.results == () and not t.executable
    assert elapsed < 10.0


@pytest.mark.parametrize("budget", [dict(timeout_s=0.5), dict(timeout_s=30.0, max_vm_steps=2_000_000)],
                         ids=["deadline", "vm_steps"])
def test_pathological_nesting_and_slow_steps_are_bounded(tiny_db, budget):
    deep = "WITH a AS (SELECT " + "(" * 5000 + "1" + ")" * 5000 + " AS x)\n\nSELECT x FROM a"
    slow = ("WITH c AS (SELECT 1 AS n),\n\nr AS (SELECT count(*) FROM big a, big b, big c)\n\nSELECT * FROM r")
    with SqlPool(2, **budget) as pool:
        start = time.perf_counter()
        deep_t, slow_t = execute_completions(pool, [(str(tiny_db), deep), (str(tiny_db), slow)])
        elapsed = time.perf_counter() - start
    assert [s.kind for s in deep_t.steps] == ["cte", "final"]
    assert not deep_t.results[0].ok and deep_t.results[0].error in ("too_large", "syntax")
    assert slow_t.results[0].ok and slow_t.results[1].error == "timeout" and slow_t.results[2].error == "timeout"
    # The cartesian product alone would run for minutes; a loaded machine stretches the bounded work.
    assert elapsed < 30.0
