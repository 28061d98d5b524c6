"""A pool of worker processes that run batches of sandboxed queries, with result caches.

Each of the pool's threads drives one worker process (`jaxsql.sql.worker`):
it hands the process a job, waits for the answer, and kills the process if
the job is still running `KILL_GRACE_S` after its deadline (SQLite preparing
a pathological statement, or inside one function call, where nothing else
can stop it), answering ``timeout`` and starting a fresh worker. Each worker
keeps its own read-only connection per database (opening one costs more
than a small query) and lives under a memory budget (``max_memory``), so
the queries' memory is never the trainer's, and nothing of a query keeps
running after its answer is given. Two caches, in this process:

- the query cache, keyed by (absolute database path, `normalize_sql(sql)`),
  LRU-bounded by `cache_size` entries; duplicate jobs within one batch run
  once (the G samples of a GRPO group often repeat a query). ``cache_size=0``
  turns both off: every job executes.
- the gold cache, keyed by (example id, database path, gold SQL), one entry
  per example, evicted only when the caches together pass `cache_bytes`
  (after every query entry), always on.

Results ended by the wall-clock deadline are never cached (they depend on
machine load), nor ``busy`` ones (a writer held a lock: transient); every
other result is, including a ``timeout`` ended by the VM-step budget
(``max_vm_steps``), which is reproducible. Each job carries its own
deadline, so a slow job holds one worker for at most ``timeout_s`` +
`KILL_GRACE_S` and never delays jobs on other workers.
"""

from __future__ import annotations

import collections
import os
import threading
import queue
import time
from typing import Any, Hashable, Sequence

from jaxsql.errors import ConfigError
from jaxsql.sql import sandbox, worker as workers
from jaxsql.sql.normalize import normalize_sql
from jaxsql.sql.result import ERROR_KINDS, ExecResult
from jaxsql.sql.worker import KILL_GRACE_S

_LAZY = object()
DEFAULT_CACHE_BYTES = 1 << 30
#: Results never cached: they may differ if the same job runs again.
_TRANSIENT = ("deadline",)


class _Job:
    __slots__ = ("db_path", "sql", "result", "size", "done")

    def __init__(self, db_path: str, sql: str) -> None:
        self.db_path, self.sql = db_path, sql
        self.result: ExecResult | None = None
        self.size = 0
        self.done = threading.Event()


def default_num_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class SqlPool:
    """Run (database, SQL) jobs concurrently in the sandbox's worker processes; results in input order.

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
        max_memory: int = sandbox.DEFAULT_MAX_MEMORY,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        """Start `num_workers` worker processes (each ready ~0.1 s later; jobs queue meanwhile).

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
          max_memory: private memory of each worker process, bytes (>= 128
            MiB); a job that needs more is ``too_large`` with ``limit="memory"``.
            The pool's queries use at most ``num_workers * max_memory`` outside
            this process.
          cache_bytes: bound on the encoded size of all cached results (query
            and gold); least recently used query entries go first.

        Raises:
          ConfigError: a setting is out of range (the message names it).
        """
        if num_workers is not None and num_workers < 1:
            raise ConfigError(f"SqlPool.num_workers: must be >= 1, got {num_workers}")
        if cache_size < 0:
            raise ConfigError(f"SqlPool.cache_size: must be >= 0, got {cache_size}")
        if cache_bytes < 0:
            raise ConfigError(f"SqlPool.cache_bytes: must be >= 0, got {cache_bytes}")
        try:
            sandbox.check_limits(timeout_s, max_rows, max_bytes, max_vm_steps, max_memory)
        except ValueError as e:
            raise ConfigError(f"SqlPool.{e}") from None
        self.num_workers = num_workers or default_num_workers()
        self.timeout_s = float(timeout_s)
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        self.max_vm_steps = max_vm_steps
        self.max_memory = int(max_memory)
        self.cache_size = int(cache_size)
        self.cache_bytes = int(cache_bytes)
        self.reuse_connections = reuse_connections
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # key -> (result, encoded size)
        self._cache: collections.OrderedDict[Hashable, tuple[ExecResult, int]] = collections.OrderedDict()
        self._gold: collections.OrderedDict[Hashable, tuple[ExecResult, int]] = collections.OrderedDict()
        self._cached_bytes = 0
        self._counts: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._meter = {"worker_wall_s": 0.0, "worker_cpu_s": 0.0}
        self._peak_rss = 0
        self._workers: dict[int, workers.Worker] = {}  # thread ident -> its current worker
        self._threads: list[threading.Thread] = []
        self._closed = False
        for _ in range(self.num_workers):
            # Started here so that they boot while the caller prepares its first batch.
            t = threading.Thread(target=self._dispatch, args=(workers.Worker(self.max_memory),),
                                 name="jaxsql-sql", daemon=True)
            self._threads.append(t)
            t.start()

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "SqlPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the jobs in flight, then stop the threads and their worker processes."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=self.timeout_s + KILL_GRACE_S + 5.0)
        workers.reap_killed(block=True)

    def worker_pids(self) -> list[int]:
        """Process ids of the live worker processes (for monitoring)."""
        with self._lock:
            return [w.pid for w in self._workers.values() if w.alive]

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
        """Counters since creation.

        ``hits``, ``misses``, ``executed``, ``gold_hits``, ``gold_misses``;
        ``killed`` (workers killed at a job's deadline), ``worker_starts``;
        ``errors`` by kind; ``cached`` / ``gold_cached`` entries and
        ``cached_bytes``; ``worker_peak_rss`` (bytes, the largest any worker
        reached); ``worker_wall_s`` (seconds the pool's threads waited for
        jobs) and ``worker_cpu_s`` (CPU seconds the workers spent on jobs).
        """
        with self._lock:
            keys = ("hits", "misses", "executed", "gold_hits", "gold_misses", "killed", "worker_starts")
            out: dict[str, Any] = {k: self._counts.get(k, 0) for k in keys}
            out["errors"] = {k: self._errors.get(k, 0) for k in ERROR_KINDS}
            out["cached"] = len(self._cache)
            out["gold_cached"] = len(self._gold)
            out["cached_bytes"] = self._cached_bytes
            out["worker_peak_rss"] = max([self._peak_rss] + [w.peak_rss for w in self._workers.values()])
            out.update({k: round(v, 6) for k, v in self._meter.items()})
        return out

    def clear_cache(self) -> None:
        """Forget cached query results (gold results are kept)."""
        with self._lock:
            self._cached_bytes -= sum(size for _, size in self._cache.values())
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
                    results[i] = hit[0]
                    cache.move_to_end(key)
                    self._counts[prefix + "hits"] += 1
                elif (store, key) in pending:
                    pending[(store, key)][3].append(i)
                    self._counts[prefix + "hits"] += 1
                else:
                    pending[(store, key)] = (store, key, self._submit(db, sql), [i])
                    self._counts[prefix + "misses"] += 1
        for store, key, job, idxs in pending.values():
            job.done.wait()
            result = self._account(job.result)
            if key is not None and result.limit not in _TRANSIENT and result.error != "busy":
                self._store(store, key, result, job.size)
            for i in idxs:
                results[i] = result
        return results  # type: ignore[return-value]

    def _dispatch(self, worker: workers.Worker | None) -> None:
        """Thread body: feed jobs to this thread's worker process, replacing it when it dies."""
        me = threading.get_ident()
        with self._lock:
            self._workers[me] = worker
            self._counts["worker_starts"] += 1
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                request = (job.db_path, job.sql, self.timeout_s, self.max_rows, self.max_bytes,
                           self.max_vm_steps, self.reuse_connections)
                start = time.perf_counter()
                try:
                    result, info, worker, started = workers.run_on(worker, request, self.timeout_s,
                                                                   self.max_memory)
                except Exception as e:  # noqa: BLE001 - a job must not kill its thread
                    result, info, started = ExecResult.failure(
                        "runtime", f"internal error: {type(e).__name__}: {e}"), workers._NO_TELEMETRY, 0
                    worker = None
                wall = time.perf_counter() - start
                with self._lock:
                    if worker is not None:
                        self._workers[me] = worker
                    self._counts["worker_starts"] += started
                    self._counts["killed"] += info.killed
                    self._meter["worker_wall_s"] += wall
                    self._meter["worker_cpu_s"] += info.cpu_s
                    self._peak_rss = max(self._peak_rss, info.peak_rss)
                job.result, job.size = result, info.reply_bytes
                job.done.set()
        finally:
            if worker is not None:
                worker.close()
                with self._lock:
                    self._peak_rss = max(self._peak_rss, worker.peak_rss)

    def _account(self, result: ExecResult) -> ExecResult:
        with self._lock:
            self._counts["executed"] += 1
            if not result.ok:
                self._errors[result.error] += 1
        return result

    def _store(self, store: str, key: Hashable, result: ExecResult, size: int) -> None:
        if size > self.cache_bytes:
            return  # would evict everything else and then itself
        with self._lock:
            cache = self._gold if store == "gold" else self._cache
            old = cache.pop(key, None)
            if old is not None:
                self._cached_bytes -= old[1]
            cache[key] = (result, size)
            self._cached_bytes += size
            while len(self._cache) > self.cache_size:
                self._cached_bytes -= self._cache.popitem(last=False)[1][1]
            while self._cached_bytes > self.cache_bytes and (self._cache or self._gold):
                evict = self._cache if self._cache else self._gold
                self._cached_bytes -= evict.popitem(last=False)[1][1]
