"""Worker processes that run sandboxed queries, so that every query can be stopped for good.

Why processes: SQLite's progress handler, which enforces the deadline, runs
only between virtual-machine instructions. Nothing can stop SQLite while it
*prepares* a statement (a 1.4 KB query of nested ``NOT MATERIALIZED`` CTEs
spends 9 s and 670 MB there, a longer one minutes and all the memory there
is) or inside one call of a built-in function; ``sqlite3_interrupt`` is not
checked there either. A thread doing that cannot be stopped, and it allocates
inside the trainer's process. So each query runs in a worker process that

- runs one query at a time, keeping a read-only connection per database
  (`sandbox.open_readonly`, at most `CONNECTIONS_PER_WORKER`);
- lives under a memory budget ``max_memory``: ``RLIMIT_DATA`` (all its
  private memory: Python objects, SQLite's heap, malloc arenas, stacks; not
  the read-only memory map of the database file, which is shared page
  cache) and SQLite's hard heap limit at half of it, so SQLite fails cleanly
  (``too_large``, ``limit="memory"``) before Python runs out;
- is killed (SIGKILL) by the caller when a query is still running
  `KILL_GRACE_S` after its deadline; the caller answers ``timeout``
  (``limit="deadline"``) and starts a fresh worker. Nothing of the query
  keeps running after its answer is given;
- exits on its own when its parent process is gone.

Parent side: `Worker` (one process; `SqlPool` gives each of its threads one)
and `run_isolated` (the process-wide idle workers behind `sandbox.execute`).
Child side: `serve`, started as ``python -I -c ...`` through `posix_spawn`
(safe in a multi-threaded parent, unlike ``fork``), in its own session so
that a Ctrl-C in the terminal reaches only the parent.

Messages are `marshal`-encoded tuples of plain values, framed by an 8-byte
length.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import marshal
import os
import resource
import select
import signal
import struct
import sys
import threading
import time
from typing import Any, NamedTuple

from jaxsql.sql import sandbox
from jaxsql.sql.result import ExecResult

#: A query still running this long after its deadline gets its worker killed.
KILL_GRACE_S = 0.3
#: How long a fresh worker may take to start (interpreter + imports) before it counts as broken.
START_TIMEOUT_S = 60.0
#: Extra time to read a finished query's reply (a result of up to ``max_bytes``).
_TRANSFER_GRACE_S = 30.0
CONNECTIONS_PER_WORKER = 32
#: Smallest ``max_memory``: the interpreter and the sandbox need about 40 MiB of it.
MIN_MAX_MEMORY = 128 << 20
#: A worker still holding this fraction of its budget after a job is replaced (fragmented heap).
_RECYCLE_FRACTION = 0.5
#: Exit status of a worker that could not even report running out of memory.
_EXIT_OUT_OF_MEMORY = 3
_HEADER = struct.Struct("<Q")


class Telemetry(NamedTuple):
    """What a worker reports with each result."""

    cpu_s: float  # CPU seconds the job took in the worker
    peak_rss: int  # the worker's peak resident memory so far (VmHWM), bytes
    reply_bytes: int  # size of the encoded result: what holding it costs, roughly
    killed: bool = False  # the worker was killed at the job's deadline


_NO_TELEMETRY = Telemetry(0.0, 0, 0)


def memory_status(pid: int | str = "self") -> tuple[int, int]:
    """(peak RSS, current anonymous RSS) of a process in bytes, from ``/proc/<pid>/status`` (Linux; else zeros).

    Not ``getrusage``: its ``ru_maxrss`` keeps the peak of the process that
    spawned this one (Linux carries it across ``exec``), so a worker started
    by a 3 GB trainer would report 3 GB.
    """
    peak = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return peak, anon


# -- framing ------------------------------------------------------------------------------------

def _write_frame(fd: int, payload: bytes) -> None:
    view = memoryview(_HEADER.pack(len(payload)) + payload)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int, poller: Any = None, deadline: float | None = None) -> bytes | None:
    """`n` bytes from `fd`; None at end of file, or (with `poller`) when `deadline` passes first."""
    buf = bytearray()
    while len(buf) < n:
        if poller is not None:
            left = deadline - time.perf_counter()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                if time.perf_counter() >= deadline:
                    return None
                continue
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int, poller: Any = None, deadline: float | None = None) -> bytes | None:
    header = _read_exact(fd, _HEADER.size, poller, deadline)
    if header is None:
        return None
    return _read_exact(fd, _HEADER.unpack(header)[0], poller, deadline)


# -- the child ----------------------------------------------------------------------------------

def _apply_memory_budget(max_memory: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = max_memory if hard == resource.RLIM_INFINITY else min(max_memory, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    set_sqlite_heap_limit(max_memory // 2)


def set_sqlite_heap_limit(n_bytes: int) -> bool:
    """``sqlite3_hard_heap_limit64(n_bytes)`` on the SQLite library `sqlite3` uses; False if unavailable.

    Process-wide: call it only in a worker process. Needs SQLite >= 3.31.
    """
    import ctypes

    import _sqlite3

    try:
        fn = ctypes.CDLL(_sqlite3.__file__).sqlite3_hard_heap_limit64
    except (OSError, AttributeError):
        return False
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64]
    fn(n_bytes)
    return fn(-1) == n_bytes


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


class _Connections:
    """The worker's open connections, LRU, reopened when the file changes."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[str, tuple[Any, tuple, bool]] = collections.OrderedDict()

    def get(self, db_path: str, max_bytes: int):
        key = os.path.abspath(db_path)
        sig = sandbox.file_signature(key)
        entry = self._open.get(key)
        if entry is not None:
            con, old_sig, immutable = entry
            # An immutable connection is valid only for the exact file it
            # opened; a mode=ro one follows writes but not a replaced file.
            if sig is not None and (sig == old_sig if immutable else sig[0] == old_sig[0]):
                self._open.move_to_end(key)
                return con
            del self._open[key]
            con.close()
        if sig is None:
            raise sandbox.DatabaseMissing(f"database {db_path!r} does not exist")
        immutable = sandbox.wants_immutable(key)
        con = sandbox.open_readonly(db_path, max_bytes)
        self._open[key] = (con, sig, immutable)
        while len(self._open) > CONNECTIONS_PER_WORKER:
            self._open.popitem(last=False)[1][0].close()
        return con

    def close_all(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()


def _run_job(conns: _Connections, request: tuple) -> ExecResult:
    db_path, sql, timeout_s, max_rows, max_bytes, max_vm_steps, reuse = request
    limits = dict(timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes, max_vm_steps=max_vm_steps)
    start = time.perf_counter()
    try:
        if reuse:
            result = sandbox.run_query(conns.get(db_path, max_bytes), sql, **limits)
        else:
            con = sandbox.open_readonly(db_path, max_bytes)
            try:
                result = sandbox.run_query(con, sql, **limits)
            finally:
                con.close()
        # elapsed_s covers opening the connection too
        return dataclasses.replace(result, elapsed_s=time.perf_counter() - start)
    except sandbox.DatabaseMissing as e:
        return ExecResult.failure("db_missing", str(e), time.perf_counter() - start)
    except sandbox.DatabaseBusy as e:
        return ExecResult.failure("busy", str(e), time.perf_counter() - start)


def _encode(result: ExecResult, cpu_s: float) -> bytes:
    peak, anon = memory_status()
    return marshal.dumps((result.ok, result.columns, result.rows, result.error, result.message,
                          result.elapsed_s, result.limit, result.vm_steps, cpu_s, peak, anon))


def serve(parent_pid: int, max_memory: int) -> None:
    """Child main loop: read a job, run it, write its result; exit at end of input or when orphaned."""
    req_fd, rep_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print must not corrupt the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _apply_memory_budget(max_memory)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    conns = _Connections()
    try:
        _write_frame(rep_fd, marshal.dumps("ready"))
        while True:
            frame = _read_frame(req_fd)
            if frame is None:
                return
            cpu = time.thread_time()
            try:
                result = _run_job(conns, marshal.loads(frame))
            except MemoryError:
                conns.close_all()
                result = ExecResult.failure("too_large", "the query used up the worker's memory budget",
                                            limit="memory")
            except Exception as e:  # noqa: BLE001 - one job must not end the worker
                conns.close_all()
                result = ExecResult.failure("runtime", f"internal error: {type(e).__name__}: {e}")
            cpu = time.thread_time() - cpu
            try:
                reply = _encode(result, cpu)
            except MemoryError:
                result = None  # free the rows before encoding the failure
                reply = _encode(ExecResult.failure("too_large", "the result did not fit in the worker's memory "
                                                   "budget", limit="memory"), cpu)
            _write_frame(rep_fd, reply)
    except MemoryError:
        os._exit(_EXIT_OUT_OF_MEMORY)
    except OSError:  # the parent closed the pipes
        return


# -- the parent ---------------------------------------------------------------------------------

class WorkerGone(Exception):
    """The worker process was not there to take a job (nothing of the job ran)."""


_killed_lock = threading.Lock()
_killed: list[Worker] = []


def reap_killed(block: bool) -> None:
    """Collect killed workers that have finished exiting (all of them, waiting, if `block`)."""
    with _killed_lock:
        pending = list(_killed)
    done = [w for w in pending if w._reap(block)]
    with _killed_lock:
        for w in done:
            if w in _killed:
                _killed.remove(w)


def _child_command(max_memory: int) -> list[str]:
    import jaxsql

    if not sys.executable:
        raise RuntimeError("cannot start a SQL worker process: sys.executable is not set")
    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxsql.__file__)))
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from jaxsql.sql.worker import serve; serve({os.getpid()}, {int(max_memory)})")
    return [sys.executable, "-I", "-c", code]


class Worker:
    """One worker process, driven by one thread at a time."""

    def __init__(self, max_memory: int) -> None:
        reap_killed(block=False)
        self.max_memory = int(max_memory)
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = os.posix_spawn(
                sys.executable, _child_command(max_memory), dict(os.environ),
                file_actions=[(os.POSIX_SPAWN_DUP2, req_r, 0), (os.POSIX_SPAWN_DUP2, rep_w, 1)],
                setsid=True,
            )
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)
        self._to_child, self._from_child = req_w, rep_r
        self._poller = select.poll()
        self._poller.register(rep_r, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.alive = True
        self.ready = False
        self.peak_rss = 0
        self.exit_status: int | None = None

    def _await_ready(self) -> None:
        frame = _read_frame(self._from_child, self._poller, time.perf_counter() + START_TIMEOUT_S)
        if frame is None or marshal.loads(frame) != "ready":
            self.kill()
            raise WorkerGone(f"the SQL worker process did not start (exit status {self.exit_status})")
        self.ready = True

    def run(self, request: tuple, timeout_s: float) -> tuple[ExecResult, Telemetry]:
        """Run one job (`_run_job`'s request tuple); its result within ``timeout_s + KILL_GRACE_S``.

        Raises `WorkerGone` when the process was dead before the job reached
        it (the caller may retry on a fresh worker). A job still running at
        its deadline plus `KILL_GRACE_S` is answered ``timeout`` and the
        process is killed; a process that dies during a job answers
        ``too_large`` (memory) or ``runtime``. Afterwards check `alive`.
        """
        if not self.alive:
            raise WorkerGone("the SQL worker process has exited")
        if not self.ready:
            self._await_ready()
        sent = time.perf_counter()
        try:
            _write_frame(self._to_child, marshal.dumps(request))
        except OSError:
            self.kill()
            raise WorkerGone("the SQL worker process has exited") from None
        header = _read_exact(self._from_child, _HEADER.size, self._poller, sent + timeout_s + KILL_GRACE_S)
        if header is not None:
            body = _read_exact(self._from_child, _HEADER.unpack(header)[0], self._poller,
                               time.perf_counter() + _TRANSFER_GRACE_S)
            if body is not None:
                return self._decode(body)
        overran = time.perf_counter() >= sent + timeout_s + KILL_GRACE_S
        self.kill()
        elapsed = time.perf_counter() - sent
        if not overran:  # it died on its own: its exit status says how
            self._reap(block=True)
        if overran:
            return ExecResult.failure(
                "timeout", "stopped at the deadline: SQLite was still preparing the statement or inside one "
                "function call, so its worker process was killed", elapsed, limit="deadline"), \
                Telemetry(0.0, self.peak_rss, 0, killed=True)
        if self.exit_status in (_EXIT_OUT_OF_MEMORY, -signal.SIGKILL):
            return ExecResult.failure("too_large", "the worker process ran out of memory", elapsed,
                                      limit="memory"), _NO_TELEMETRY
        return ExecResult.failure("runtime", f"the worker process died (status {self.exit_status})",
                                  elapsed), _NO_TELEMETRY

    def _decode(self, body: bytes) -> tuple[ExecResult, Telemetry]:
        ok, columns, rows, error, message, elapsed_s, limit, vm_steps, cpu_s, peak, anon = marshal.loads(body)
        self.peak_rss = max(self.peak_rss, peak)
        result = ExecResult(ok=ok, columns=columns, rows=rows, error=error, message=message,
                            elapsed_s=elapsed_s, limit=limit, vm_steps=vm_steps)
        if anon > _RECYCLE_FRACTION * self.max_memory:
            self.close()  # it kept the memory of a big job; the next job gets a fresh worker
        return result, Telemetry(cpu_s, peak, len(body))

    def _reap(self, block: bool) -> bool:
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False
        self.exit_status = os.waitstatus_to_exitcode(status)
        return True

    def _close_fds(self) -> None:
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass

    def kill(self) -> None:
        """SIGKILL the process (its peak memory goes to `peak_rss` first).

        Does not wait while the kernel frees a large address space: a
        process not yet reaped is reaped later (`reap_killed`).
        """
        if not self.alive:
            return
        self.alive = False
        self.peak_rss = max(self.peak_rss, memory_status(self.pid)[0])
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._close_fds()
        if not self._reap(block=False):
            with _killed_lock:
                _killed.append(self)
        reap_killed(block=False)

    def close(self, wait_s: float = 1.0) -> None:
        """Let the process exit (end of input), killing it if it has not within `wait_s`."""
        if not self.alive:
            return
        try:
            os.close(self._to_child)
        except OSError:
            pass
        end = time.perf_counter() + wait_s
        while not self._reap(block=False):
            if time.perf_counter() > end:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap(block=True)
                break
            time.sleep(0.005)
        self.alive = False
        try:
            os.close(self._from_child)
        except OSError:
            pass


def run_on(worker: Worker | None, request: tuple, timeout_s: float,
           max_memory: int) -> tuple[ExecResult, Telemetry, Worker, int]:
    """Run `request` on `worker` (or a fresh one); returns the result, its telemetry,
    a live worker for the next job, and how many workers were started."""
    started = 0
    for attempt in range(2):
        if worker is None or not worker.alive:
            worker = Worker(max_memory)
            started += 1
        try:
            result, info = worker.run(request, timeout_s)
            break
        except WorkerGone:
            worker = None
            if attempt:
                raise
    if not worker.alive:
        worker = Worker(max_memory)
        started += 1
    return result, info, worker, started


# -- shared idle workers behind `sandbox.execute` -----------------------------------------------

_shared_lock = threading.Lock()
_shared_idle: dict[int, list[Worker]] = {}
_shared_pid = os.getpid()


def _max_idle() -> int:
    try:
        return max(2, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(2, os.cpu_count() or 1)


def run_isolated(request: tuple, timeout_s: float, max_memory: int) -> ExecResult:
    """Run one job on an idle shared worker (started when none is idle), then put it back.

    Concurrent callers each get their own worker; at most `_max_idle` idle
    ones are kept per memory budget.
    """
    global _shared_pid
    with _shared_lock:
        if _shared_pid != os.getpid():  # a forked child: the pipes belong to the parent
            _shared_idle.clear()
            _shared_pid = os.getpid()
        idle = _shared_idle.setdefault(max_memory, [])
        worker = idle.pop() if idle else None
    try:
        result, _, worker, _ = run_on(worker, request, timeout_s, max_memory)
    except WorkerGone as e:
        return ExecResult.failure("runtime", str(e))
    with _shared_lock:
        idle = _shared_idle.setdefault(max_memory, [])
        if worker.alive and len(idle) < _max_idle() and _shared_pid == os.getpid():
            idle.append(worker)
            worker = None
    if worker is not None:
        worker.close()
    return result


def close_shared_workers() -> None:
    """Stop the idle workers of `run_isolated` and reap killed ones (at exit; tests measuring their memory)."""
    with _shared_lock:
        workers = [w for ws in _shared_idle.values() for w in ws] if _shared_pid == os.getpid() else []
        _shared_idle.clear()
    for w in workers:
        w.close()
    reap_killed(block=True)


atexit.register(close_shared_workers)
