"""SqlPool: order, caches, counters, deadlines, abandonment."""

import threading
import time

import pytest

from jaxsql.errors import ConfigError
from jaxsql.sql import ExecResult, SqlPool, normalize_sql
from jaxsql.sql.normalize import whitespace_normalize

SLOW = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c"


def test_results_in_input_order(tiny_db):
    db = str(tiny_db)
    jobs = [(db, f"SELECT {i}, count(*) FROM big WHERE x < {i * 7}") for i in range(40)]
    with SqlPool(2) as pool:
        results = pool.execute_batch(jobs)
    assert [r.rows for r in results] == [((i, min(i * 7, 3000)),) for i in range(40)]


def test_cache_hits_duplicates_and_stats(tiny_db):
    db = str(tiny_db)
    with SqlPool(2) as pool:
        a = "SELECT name FROM people WHERE age > 26"
        same_a = "select name\n  from people   where age > 26 ;"
        b = "SELECT count(*) FROM people"
        r1 = pool.execute_batch([(db, a), (db, same_a), (db, b), (db, a)])
        s = pool.stats()
        assert (s["misses"], s["hits"], s["executed"]) == (2, 2, 2)
        assert r1[0] is r1[1] is r1[3]
        r2 = pool.execute_batch([(db, b), (db, "SELEC oops"), (db, "SELEC oops")])
        s = pool.stats()
        assert (s["misses"], s["hits"], s["executed"]) == (3, 4, 3)
        assert s["errors"]["syntax"] == 1
        assert r2[0] is r1[2] and r2[1].error == "syntax"
        pool.clear_cache()
        pool.execute_batch([(db, b)])
        assert pool.stats()["executed"] == 4


def test_same_sql_on_other_database_is_not_a_hit(tiny_db, tmp_path):
    import shutil

    other = tmp_path / "other.sqlite"
    shutil.copy(tiny_db, other)
    with SqlPool(2) as pool:
        pool.execute_batch([(str(tiny_db), "SELECT 1"), (str(other), "SELECT 1")])
        assert pool.stats()["executed"] == 2


def test_cache_off_runs_everything(tiny_db):
    db = str(tiny_db)
    with SqlPool(2, cache_size=0) as pool:
        pool.execute_batch([(db, "SELECT 1")] * 5)
        s = pool.stats()
        assert (s["executed"], s["hits"], s["cached"]) == (5, 0, 0)


def test_lru_bound(tiny_db):
    db = str(tiny_db)
    with SqlPool(1, cache_size=2) as pool:
        pool.execute_batch([(db, f"SELECT {i}") for i in range(5)])
        assert pool.stats()["cached"] == 2


def test_gold_results_cached_per_example(tiny_db):
    db = str(tiny_db)
    with SqlPool(2) as pool:
        g1 = pool.gold_result("ex1", db, "SELECT count(*) FROM people")
        g2 = pool.gold_result("ex1", db, "SELECT count(*) FROM people")
        assert g1 is g2 and g1.rows == ((4,),)
        s = pool.stats()
        assert (s["gold_misses"], s["gold_hits"], s["executed"], s["gold_cached"]) == (1, 1, 1, 1)
        preds, golds = pool.run_batch([(db, "SELECT 1")], [("ex1", db, "SELECT count(*) FROM people"),
                                                           ("ex2", db, "SELECT 2")])
        assert preds[0].rows == ((1,),) and golds[0] is g1 and golds[1].rows == ((2,),)


def test_timeout_does_not_delay_other_jobs(tiny_db):
    db = str(tiny_db)
    with SqlPool(2, timeout_s=1.5, cache_size=0) as pool:
        pool.execute_batch([(db, "SELECT 1"), (db, "SELECT 2")])  # workers started (booting is not the point)
        finished = {}

        def fast_batch():
            start = time.perf_counter()
            out = pool.execute_batch([(db, f"SELECT count(*) FROM big WHERE x > {i}") for i in range(20)])
            finished["fast"] = time.perf_counter() - start
            finished["ok"] = all(r.ok for r in out)

        start = time.perf_counter()
        slow = threading.Thread(target=lambda: finished.setdefault("slow", pool.execute_batch([(db, SLOW)])))
        slow.start()
        time.sleep(0.1)  # the slow query occupies one worker
        fast_batch()
        slow.join()
        total = time.perf_counter() - start
    assert finished["ok"] and finished["fast"] < 1.0, finished
    assert finished["slow"][0].error == "timeout"
    assert total < 1.5 + 0.5


def test_timeouts_are_not_cached(tiny_db):
    with SqlPool(2, timeout_s=0.3) as pool:
        pool.execute_batch([(str(tiny_db), SLOW)])
        pool.execute_batch([(str(tiny_db), SLOW)])
        s = pool.stats()
        assert s["executed"] == 2 and s["errors"]["timeout"] == 2 and s["cached"] == 0


def cte_bomb(levels: int) -> str:
    """Nested NOT MATERIALIZED CTEs: SQLite inlines each twice, so preparing it takes 2**levels work."""
    parts = ["a0 AS NOT MATERIALIZED (SELECT 1 AS x)"]
    parts += [f"a{i} AS NOT MATERIALIZED (SELECT x FROM a{i - 1} UNION ALL SELECT x FROM a{i - 1})"
              for i in range(1, levels + 1)]
    return "WITH " + ", ".join(parts) + f" SELECT count(*) FROM a{levels}"


def test_stuck_job_is_killed_and_pool_keeps_capacity(tiny_db):
    # A statement SQLite spends seconds preparing: no progress handler runs
    # then, so only killing its worker process stops it. (Was: a monkeypatched
    # stuck job abandoned on its thread; the assertions are the same.)
    with SqlPool(2, timeout_s=0.3) as pool:
        pool.execute_batch([(str(tiny_db), "SELECT 0"), (str(tiny_db), "SELECT 1")])  # both workers ready
        start = time.perf_counter()
        results = pool.execute_batch([(str(tiny_db), cte_bomb(20)), (str(tiny_db), "SELECT 7")])
        assert time.perf_counter() - start < 0.3 + 0.5
        assert results[0].error == "timeout" and "killed" in results[0].message
        assert results[0].limit == "deadline"
        assert results[1].rows == ((7,),)
        assert pool.stats()["killed"] == 1
        # two fresh jobs run at once on the two live workers
        r = pool.execute_batch([(str(tiny_db), "SELECT 8"), (str(tiny_db), "SELECT 9")])
        assert [x.rows for x in r] == [((8,),), ((9,),)]
        assert len(pool.worker_pids()) == 2


def test_closed_pool_refuses(tiny_db):
    pool = SqlPool(1)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError):
        pool.execute_batch([(str(tiny_db), "SELECT 1")])


@pytest.mark.parametrize("kwargs", [dict(num_workers=0), dict(timeout_s=0), dict(max_rows=0), dict(cache_size=-1)])
def test_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        SqlPool(**kwargs)


def test_normalize_sql_keys():
    assert normalize_sql("select  a from t;") == normalize_sql("SELECT a FROM t")
    assert normalize_sql("SELECT 'a  b'") != normalize_sql("SELECT 'a b'")
    assert normalize_sql("SELECT Name FROM t") != normalize_sql("SELECT name FROM t")  # column names differ
    # sqlglot cannot parse: whitespace outside quotes collapsed, quotes kept
    assert normalize_sql("SELEC  1 ;") == "w:SELEC 1"
    assert whitespace_normalize("SELEC  'a   b'\n\n  x;;") == "SELEC 'a   b' x"
    deep = "SELECT " + "(" * 5000 + "1" + ")" * 5000
    assert normalize_sql(deep).startswith("w:")


def test_cache_key_never_drops_what_sqlite_would_reject(tiny_db):
    """sqlglot's SQLite writer drops column names in a subquery alias (``AS s(a)``, a syntax error
    in SQLite) with only a warning; as a cache key that made the invalid query share the key of
    the valid one, and the pool served it the valid query's cached rows."""
    valid, invalid = "SELECT * FROM (SELECT 1) AS s", "SELECT * FROM (SELECT 1) AS s(a)"
    assert normalize_sql(valid) != normalize_sql(invalid)
    assert normalize_sql(invalid).startswith("w:")
    with SqlPool(1) as pool:
        first, second = pool.execute_batch([(str(tiny_db), valid)]), pool.execute_batch([(str(tiny_db), invalid)])
    assert first[0].ok and first[0].rows == ((1,),)
    assert not second[0].ok and second[0].error == "syntax"


def test_fresh_connection_per_job_gives_same_results(tiny_db):
    jobs = [(str(tiny_db), "SELECT name FROM people ORDER BY id"), (str(tiny_db), "DROP TABLE people")]
    with SqlPool(2, reuse_connections=False) as fresh, SqlPool(2) as reused:
        a, b = fresh.execute_batch(jobs), reused.execute_batch(jobs)
    assert [(r.ok, r.error, r.rows) for r in a] == [(r.ok, r.error, r.rows) for r in b]
    assert a[0].rows == (("Ann",), ("Bob",), ("Cid",), ("Dee",)) and a[1].error == "denied"


def test_database_removed_while_connection_cached(tiny_db, tmp_path):
    import shutil

    copy = tmp_path / "gone.sqlite"
    shutil.copy(tiny_db, copy)
    with SqlPool(1, cache_size=0) as pool:
        assert pool.execute_batch([(str(copy), "SELECT count(*) FROM people")])[0].rows == ((4,),)
        copy.unlink()
        r = pool.execute_batch([(str(copy), "SELECT count(*) FROM people")])[0]
        assert r.error == "db_missing"
        assert not copy.exists()


def test_vm_step_timeouts_are_cached_deadline_timeouts_are_not(tiny_db):
    db = str(tiny_db)
    with SqlPool(2, timeout_s=600, max_vm_steps=50_000) as pool:
        a = pool.execute_batch([(db, SLOW)])[0]
        b = pool.execute_batch([(db, SLOW)])[0]
        s = pool.stats()
    assert a.error == "timeout" and a.limit == "vm_steps" and b is a
    assert (s["executed"], s["hits"], s["cached"]) == (1, 1, 1)
    with SqlPool(2, timeout_s=0.3, max_vm_steps=10**12) as pool:
        r = pool.execute_batch([(db, SLOW)])[0]
        assert r.limit == "deadline" and pool.stats()["cached"] == 0


@pytest.mark.parametrize("kwargs", [dict(max_vm_steps=0), dict(timeout_s=float("inf")), dict(max_bytes=0)])
def test_bad_budget_settings_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SqlPool(**kwargs)


def test_cache_bytes_bound_evicts_queries_before_gold(tiny_db):
    db = str(tiny_db)
    with SqlPool(2, cache_bytes=20_000) as pool:
        gold = pool.gold_result("ex1", db, "SELECT name FROM people")
        pool.execute_batch([(db, f"SELECT x, {i} FROM big WHERE x < 1000") for i in range(6)])  # ~8 KB each
        s = pool.stats()
        assert s["cached_bytes"] <= 20_000 and s["gold_cached"] == 1 and 0 < s["cached"] < 6
        assert pool.gold_result("ex1", db, "SELECT name FROM people") is gold  # gold kept
        before = pool.stats()
        big = pool.execute_batch([(db, "SELECT x, x, x FROM big")])[0]  # larger than the whole budget
        after = pool.stats()
        assert big.ok and after["cached_bytes"] == before["cached_bytes"]  # not cached, nothing evicted


@pytest.mark.parametrize("kwargs", [dict(max_memory=1 << 20), dict(max_memory=True), dict(cache_bytes=-1)])
def test_bad_memory_settings_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        SqlPool(**kwargs)
