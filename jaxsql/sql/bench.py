"""Throughput of `SqlPool` against serial execution on a generated, CPU-bound database.

Serial is `sandbox.run_query` on one connection in the calling thread (no
isolation: the engine's own speed); the pool runs the same queries in its
worker processes, so the comparison includes everything isolation costs
(the pipe round trip, encoding the result, the dispatcher threads).
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxsql.sql import sandbox
from jaxsql.sql.pool import SqlPool, default_num_workers


def make_bench_db(path: str | Path, rows: int, seed: int = 0) -> None:
    """A table ``t(id, a, b, c, d)`` of `rows` seeded random rows and a small ``u(k, name)``."""
    rng = random.Random(seed)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b REAL, c TEXT, d INTEGER)")
    con.execute("CREATE TABLE u (k INTEGER PRIMARY KEY, name TEXT)")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    con.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?, ?)",
        ((i, rng.randrange(1000), rng.random() * 100, rng.choice(words) + str(rng.randrange(100)), rng.randrange(50))
         for i in range(rows)),
    )
    con.executemany("INSERT INTO u VALUES (?, ?)", ((k, f"name{k}") for k in range(50)))
    con.commit()
    con.close()


def bench_queries(n: int, seed: int = 0) -> list[str]:
    """`n` distinct queries of mixed cost (full scans, GROUP BY, LIKE, join, sort with LIMIT)."""
    rng = random.Random(seed)
    templates = [
        "SELECT count(*), avg(b) FROM t WHERE a > {x}",
        "SELECT d, count(*), sum(b) FROM t WHERE a < {x} GROUP BY d",
        "SELECT count(*) FROM t WHERE c LIKE '%{y}%' AND a <> {x}",
        "SELECT u.name, max(t.b) FROM t JOIN u ON t.d = u.k WHERE t.a BETWEEN {x} AND {x} + 100 GROUP BY u.name",
        "SELECT id, b FROM t WHERE a = {x} ORDER BY b DESC LIMIT 5",
        "SELECT count(DISTINCT c) FROM t WHERE d = {z}",
    ]
    out = []
    for i in range(n):
        t = templates[i % len(templates)]
        out.append(t.format(x=rng.randrange(1000), y=rng.randrange(100), z=rng.randrange(50)) + f" /* q{i} */")
    return out


def _sched(path: str = "/proc/thread-self/schedstat") -> tuple[float, float]:
    """(CPU seconds, seconds waiting for a CPU) from a schedstat file (Linux), else zeros.

    The default is the calling thread's; ``/proc/<pid>/schedstat`` is a
    process's main thread (a worker's only busy thread).
    """
    try:
        with open(path) as f:
            cpu_ns, wait_ns, _ = f.read().split()
        return int(cpu_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def _workers_sched(pids: list[int]) -> tuple[float, float]:
    stats = [_sched(f"/proc/{pid}/schedstat") for pid in pids]
    return sum(c for c, _ in stats), sum(w for _, w in stats)


def _qps(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def run_bench(queries: int = 512, workers: int | None = None, rows: int = 200_000, seed: int = 0,
              rounds: int = 4) -> dict[str, Any]:
    """Run the benchmark; returns queries/s for serial, pool (cache off) and pool with duplicates + cache.

    Every query runs once serially (one connection, calling thread) and once
    through the pool with the cache off; the two alternate over `rounds`
    slices of the query list.
    """
    workers = workers or default_num_workers()
    with tempfile.TemporaryDirectory(prefix="jaxsql-bench-") as tmp:
        db = str(Path(tmp) / "bench.sqlite")
        make_bench_db(db, rows, seed)
        sqls = bench_queries(queries, seed)
        jobs = [(db, s) for s in sqls]

        # Serial and pool runs alternate over `rounds` slices of the queries, so
        # that load from other processes drifting over time hits both alike.
        con = sandbox.open_readonly(db)
        serial: list = []
        pooled: list = []
        serial_s = pool_s = serial_cpu = serial_wait = pool_tree_cpu = pool_wait = 0.0
        with SqlPool(workers, cache_size=0) as pool:
            # start the workers and open each one's connection outside the timing
            pool.execute_batch([(db, f"SELECT count(*) FROM u /* warm {i} */") for i in range(4 * workers)])
            warm = pool.stats()
            sandbox.run_query(con, sqls[0])
            step = -(-queries // rounds)
            for lo in range(0, queries, step):
                a, start = _sched(), time.perf_counter()
                serial += [sandbox.run_query(con, s) for s in sqls[lo:lo + step]]
                serial_s += time.perf_counter() - start
                b = _sched()
                serial_cpu += b[0] - a[0]
                serial_wait += b[1] - a[1]
                pids = pool.worker_pids()
                (wcpu, wwait), cpu, start = _workers_sched(pids), time.process_time(), time.perf_counter()
                pooled += pool.execute_batch(jobs[lo:lo + step])
                pool_s += time.perf_counter() - start
                wcpu2, wwait2 = _workers_sched(pids)
                pool_tree_cpu += time.process_time() - cpu + wcpu2 - wcpu
                pool_wait += wwait2 - wwait
            done = pool.stats()
        con.close()
        meter = {k: done[k] - warm[k] for k in ("worker_wall_s", "worker_cpu_s")}

        # GRPO-like: groups of 8 samples that repeat a query, cache on.
        rng = random.Random(seed + 1)
        dup_jobs = [jobs[rng.randrange(max(1, queries // 8))] for _ in range(queries)]
        with SqlPool(workers, cache_size=100_000) as pool:
            start = time.perf_counter()
            pool.execute_batch(dup_jobs)
            cached_s = time.perf_counter() - start
            stats = pool.stats()

    pool_cpu = meter["worker_cpu_s"]
    pool_blocked = max(0.0, meter["worker_wall_s"] - pool_cpu - pool_wait)
    # CPU the pool spent beyond running the queries: dispatch, pipes, encoding.
    overhead = max(0.0, pool_tree_cpu - pool_cpu) if pool_tree_cpu > 0 else 0.0
    errors = sum(not r.ok for r in serial) + sum(not r.ok for r in pooled)
    same = all(a.rows == b.rows for a, b in zip(serial, pooled))
    return {
        "queries": queries,
        "workers": workers,
        "table_rows": rows,
        "rounds": rounds,
        "serial_qps": _qps(queries, serial_s),
        "pool_qps": _qps(queries, pool_s),
        "speedup": round(serial_s / pool_s, 2) if pool_s > 0 else float("inf"),
        # Where the time went (Linux schedstat and /proc; zeros elsewhere).
        # CPU-wait is time spent ready to run while other processes held the
        # cores. pool_cpu_s is the worker processes' CPU running the queries;
        # pool_overhead_cpu_s all other CPU of this process and its workers
        # during the pool runs (dispatch, pipes, encoding results);
        # pool_blocked_s the rest of the time a job took, seen from its
        # thread (pipe round trips, and waking the worker, which grows with
        # load from other processes).
        "serial_cpu_s": round(serial_cpu, 3),
        "serial_cpu_wait_s": round(serial_wait, 3),
        "pool_cpu_s": round(pool_cpu, 3),
        "pool_cpu_wait_s": round(pool_wait, 3),
        "pool_overhead_cpu_s": round(overhead, 3),
        "pool_blocked_s": round(pool_blocked, 3),
        # serial CPU / (all the pool's CPU / workers): the speedup if no other
        # process competed for the cores (an estimate, not a measurement).
        "speedup_est_idle": round(serial_cpu / ((pool_cpu + overhead) / workers), 2) if pool_cpu > 0 else None,
        "cached_dup_qps": _qps(queries, cached_s),
        "cache_hits": stats["hits"],
        "cache_executed": stats["executed"],
        "errors": errors,
        "pool_matches_serial": same,
    }
