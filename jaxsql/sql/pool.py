"""A thread pool that runs batches of sandboxed queries, with result caches.

SQLite releases the GIL while it steps a statement, so threads run queries
truly in parallel. Each worker thread keeps its own read-only connection per
database (opening one costs more than a small query). Two caches:

- the query cache, keyed by (absolute database path, `normalize_sql(sql)`),
  LRU-bounded by `cache_size`; duplicate jobs within one batch run once (the
  G samples of a GRPO group often repeat a query). ``cache_size=0`` turns
  both off: every job executes.
- the gold cache, keyed by (example id, database path, gold SQL), unbounded
  (one entry per example), always on.

Results ended by the wall-clock deadline are never cached (they depend on
machine load); every other result is, including a ``timeout`` ended by the
VM-step budget (``max_vm_steps``), which is reproducible. Each job carries its own deadline, so a slow job holds one worker for at
most ``timeout_s`` and never delays jobs on other workers. As a backstop for
work SQLite cannot interrupt (one long-running built-in function call), a job
still running `ABANDON_GRACE_S` after its deadline is answered ``timeout``
and abandoned: its thread finishes it in the background and exits, and a
fresh worker thread takes its place, so the pool keeps its capacity.
"""

from __future__ import annotations

import collections
import os
import threading
import queue
import time
from typing import Any, Hashable, Sequence

from jaxsql.errors import ConfigError
from jaxsql.sql import sandbox
from jaxsql.sql.normalize import normalize_sql
from jaxsql.sql.result import ERROR_KINDS, ExecResult

_CONNECTIONS_PER_THREAD = 32
ABANDON_GRACE_S = 0.3
_POLL_S = 0.02
_LAZY = object()


class _Job:
    __slots__ = ("db_path", "sql", "started", "result", "done", "abandoned")

    def __init__(self, db_path: str, sql: str) -> None:
        self.db_path, self.sql = db_path, sql
        self.started: float | None = None
        self.result: ExecResult | None = None
        self.done = threading.Event()
        self.abandoned = False


def default_num_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class SqlPool:
    """Run (database, SQL) jobs concurrently in the sandbox; results in input order.

    Use as a context manager (or call `close`). Thread-safe: several callers
    may submit batches at once. With one worker a slow job delays the jobs
    queued behind it; use two or more.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout_s: float = sandbox.DEFAULT_TIMEOUT_S,
        max_rows: int = sandbox.DEFAULT_MAX_ROWS,
        max_bytes: int = sandbox.DEFAULT_MAX_BYTES,
        cache_size: int = 100_000,
        reuse_connections: bool = True,
        max_vm_steps: int | None = None,
    ) -> None:
        """Start `num_workers` workers.

        Args:
          num_workers: worker count (default: the CPU cores this process may use).
          timeout_s: wall-clock deadline per job, seconds (finite, > 0).
          max_rows: row cap per result (``too_large`` beyond, ``limit="rows"``).
          max_bytes: value-byte cap per result (``too_large`` beyond, ``limit="bytes"``).
          cache_size: query-cache entries (LRU); 0 turns caching and de-duplication off.
          reuse_connections: keep one connection per database per worker (False: one per job).
          max_vm_steps: None, or the SQLite VM-instruction budget of every job
            (see `jaxsql.sql.execute`): a job that uses it up is ``timeout``
            with ``limit="vm_steps"``, on any machine at any load, and that
            answer is cached like any other. The deadline still applies.

        Raises:
          ConfigError: a setting is out of range (the message names it).
        """
        if num_workers is not None and num_workers < 1:
            raise ConfigError(f"SqlPool.num_workers: must be >= 1, got {num_workers}")
        if cache_size < 0:
            raise ConfigError(f"SqlPool.cache_size: must be >= 0, got {cache_size}")
        try:
            sandbox.check_limits(timeout_s, max_rows, max_bytes, max_vm_steps)
        except ValueError as e:
            raise ConfigError(f"SqlPool.{e}") from None
        self.num_workers = num_workers or default_num_workers()
        self.timeout_s = float(timeout_s)
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        self.max_vm_steps = max_vm_steps
        self.cache_size = int(cache_size)
        self.reuse_connections = reuse_connections
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._cache: collections.OrderedDict[Hashable, ExecResult] = collections.OrderedDict()
        self._gold: dict[Hashable, ExecResult] = {}
        self._local = threading.local()
        self._all_connections: list[Any] = []
        self._counts: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._threads: list[threading.Thread] = []
        self._closed = False
        for _ in range(self.num_workers):
            self._spawn_worker()

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "SqlPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads and close their connections (abandoned jobs are not waited for)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            live = [t for t in self._threads if t.is_alive()]
        for _ in live:
            self._queue.put(None)
        for t in live:
            t.join(timeout=self.timeout_s + ABANDON_GRACE_S)

    # -- public API ----------------------------------------------------------
    def execute_batch(self, jobs: Sequence[tuple[str, str]]) -> list[ExecResult]:
        """Run every ``(db_path, sql)`` job; the i-th result belongs to the i-th job."""
        return self._resolve([self._query_entry(db, sql) for db, sql in jobs])

    def gold_result(self, example_id: str, db_path: str, sql: str) -> ExecResult:
        """The result of an example's gold SQL, executed once per example."""
        return self.gold_batch([(example_id, db_path, sql)])[0]

    def gold_batch(self, items: Sequence[tuple[str, str, str]]) -> list[ExecResult]:
        """`gold_result` for many ``(example_id, db_path, gold_sql)`` items, run concurrently."""
        return self._resolve([self._gold_entry(*item) for item in items])

    def run_batch(
        self, jobs: Sequence[tuple[str, str]], gold_items: Sequence[tuple[str, str, str]]
    ) -> tuple[list[ExecResult], list[ExecResult]]:
        """`execute_batch(jobs)` and `gold_batch(gold_items)` sharing the workers at once."""
        entries = [self._query_entry(db, sql) for db, sql in jobs]
        entries += [self._gold_entry(*item) for item in gold_items]
        results = self._resolve(entries)
        return results[: len(jobs)], results[len(jobs):]

    def stats(self) -> dict[str, Any]:
        """Counters since creation: hits, misses, executed, gold_hits, gold_misses, abandoned, errors by kind."""
        with self._lock:
            out: dict[str, Any] = {k: self._counts.get(k, 0) for k in ("hits", "misses", "executed", "gold_hits", "gold_misses", "abandoned")}
            out["errors"] = {k: self._errors.get(k, 0) for k in ERROR_KINDS}
            out["cached"] = len(self._cache)
            out["gold_cached"] = len(self._gold)
        return out

    def clear_cache(self) -> None:
        """Forget cached query results (gold results are kept)."""
        with self._lock:
            self._cache.clear()

    # -- internals ---------------------------------------------------------
    def _query_entry(self, db_path: str, sql: str) -> tuple[str, Any, str, str]:
        # The key is computed lazily in `_resolve`, so that workers start on
        # the first jobs while the caller still normalises the later ones.
        return ("query", None if self.cache_size == 0 else _LAZY, db_path, sql)

    def _gold_entry(self, example_id: str, db_path: str, sql: str) -> tuple[str, Hashable, str, str]:
        return ("gold", (example_id, os.path.abspath(db_path), sql), db_path, sql)

    def _submit(self, db_path: str, sql: str) -> _Job:
        job = _Job(db_path, sql)
        self._queue.put(job)
        return job

    def _resolve(self, entries: list[tuple[str, Any, str, str]]) -> list[ExecResult]:
        if self._closed:
            raise RuntimeError("SqlPool is closed")
        results: list[ExecResult | None] = [None] * len(entries)
        pending: dict[Hashable, tuple[str, Hashable | None, _Job, list[int]]] = {}
        for i, (store, key, db, sql) in enumerate(entries):
            if key is _LAZY:
                key = (os.path.abspath(db), normalize_sql(sql))
            with self._lock:
                if key is None:
                    pending[("uncached", i)] = (store, None, self._submit(db, sql), [i])
                    self._counts["misses"] += 1
                    continue
                cache = self._gold if store == "gold" else self._cache
                prefix = "gold_" if store == "gold" else ""
                hit = cache.get(key)
                if hit is not None:
                    results[i] = hit
                    if store == "query":
                        cache.move_to_end(key)
                    self._counts[prefix + "hits"] += 1
                elif (store, key) in pending:
                    pending[(store, key)][3].append(i)
                    self._counts[prefix + "hits"] += 1
                else:
                    pending[(store, key)] = (store, key, self._submit(db, sql), [i])
                    self._counts[prefix + "misses"] += 1
        for store, key, job, idxs in pending.values():
            result = self._account(self._wait(job))
            if key is not None and result.limit != "deadline":
                self._store(store, key, result)
            for i in idxs:
                results[i] = result
        return results  # type: ignore[return-value]

    def _wait(self, job: _Job) -> ExecResult:
        """The job's result, or ``timeout`` once it overran its deadline by `ABANDON_GRACE_S`."""
        while not job.done.wait(_POLL_S):
            started = job.started
            if started is None or time.perf_counter() < started + self.timeout_s + ABANDON_GRACE_S:
                continue
            with self._lock:
                if job.done.is_set():
                    break
                job.abandoned = True
                self._counts["abandoned"] += 1
            self._spawn_worker()
            return ExecResult.failure(
                "timeout", "the query did not stop at its deadline; its worker was abandoned",
                time.perf_counter() - started, limit="deadline",
            )
        assert job.result is not None
        return job.result

    def _spawn_worker(self) -> None:
        t = threading.Thread(target=self._worker, name="jaxsql-sql", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _worker(self) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                job.started = time.perf_counter()
                result = self._run(job.db_path, job.sql)
                with self._lock:
                    job.result = result
                    job.done.set()
                    if job.abandoned:  # a replacement thread already took this one's place
                        return
        finally:
            self._close_thread_connections()

    def _close_thread_connections(self) -> None:
        conns = getattr(self._local, "connections", None) or {}
        for con in conns.values():
            self._forget(con)
        conns.clear()

    def _account(self, result: ExecResult) -> ExecResult:
        with self._lock:
            self._counts["executed"] += 1
            if not result.ok:
                self._errors[result.error] += 1
        return result

    def _store(self, store: str, key: Hashable, result: ExecResult) -> None:
        with self._lock:
            if store == "gold":
                self._gold[key] = result
                return
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _run(self, db_path: str, sql: str) -> ExecResult:
        """Worker body: never raises, whatever the query does."""
        try:
            if not self.reuse_connections:
                return sandbox.execute(db_path, sql, timeout_s=self.timeout_s, max_rows=self.max_rows,
                                       max_bytes=self.max_bytes, max_vm_steps=self.max_vm_steps)
            try:
                con = self._connection(db_path)
            except sandbox.DatabaseMissing as e:
                return ExecResult.failure("db_missing", str(e))
            return sandbox.run_query(con, sql, timeout_s=self.timeout_s, max_rows=self.max_rows,
                                     max_bytes=self.max_bytes, max_vm_steps=self.max_vm_steps)
        except Exception as e:  # noqa: BLE001 - a job must not kill its worker
            return ExecResult.failure("runtime", f"internal error: {type(e).__name__}: {e}")

    def _connection(self, db_path: str):
        conns = getattr(self._local, "connections", None)
        if conns is None:
            conns = self._local.connections = collections.OrderedDict()
        key = os.path.abspath(db_path)
        con = conns.get(key)
        if con is not None and os.path.isfile(key):
            conns.move_to_end(key)
            return con
        if con is not None:  # the file went away: report it as missing from now on
            conns.pop(key)
            self._forget(con)
        con = sandbox.open_readonly(db_path, self.max_bytes)
        conns[key] = con
        with self._lock:
            self._all_connections.append(con)
        while len(conns) > _CONNECTIONS_PER_THREAD:
            _, old = conns.popitem(last=False)
            self._forget(old)
        return con

    def _forget(self, con) -> None:
        with self._lock:
            if con in self._all_connections:
                self._all_connections.remove(con)
        con.close()
