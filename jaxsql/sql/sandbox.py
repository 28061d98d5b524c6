"""The query engine of the sandbox: open a SQLite file read-only and run one untrusted query on it.

`execute` is the public entry point: it runs the query in a worker process
(`jaxsql.sql.worker`) that can be killed, so the deadline and the memory
budget hold from the first byte, preparation included. `open_readonly` and
`run_query` are the engine that worker runs (and that ``bench sql`` times in
process as the serial baseline); called directly they bound the query only
once SQLite's virtual machine runs.

Guarantees (the numbers are in ``docs/sql.md``; each is tested):

- the database is opened without ever creating a file beside it: a
  ``file:...?mode=ro`` URI, or ``immutable=1`` for a WAL database that
  nobody has open (a WAL reader would otherwise create ``-wal``/``-shm``
  files, and could not read from a read-only folder);
- an authorizer allows only reads (SELECT, reading columns, recursive CTEs,
  functions other than ``load_extension``, a few schema-reading PRAGMAs);
  every write, DDL, ATTACH/DETACH, transaction, VACUUM, ANALYZE and any other
  PRAGMA is ``denied``; ``PRAGMA query_only`` is on as a second lock;
- exactly one statement per call (several statements are ``denied``);
- a progress handler checks the deadline every `PROGRESS_EVERY` virtual
  machine instructions and interrupts the query (``timeout``); it also
  counts the instructions, and an optional budget `max_vm_steps` stops the
  query reproducibly (``timeout`` with ``limit="vm_steps"``);
- SQLite limits bound any single string or BLOB, SQL text length and
  expression depth; temporary tables and sorts stay in memory (never in temp
  files); rows and bytes are counted as they are fetched, each text value
  before the next is read, and a result over its cap is ``too_large``;
- a database locked by a writer is retried for `BUSY_RETRY_S`, then answered
  ``busy`` (transient: the pool never caches it);
- ``printf``/``format`` answer NULL when their widths and precisions add up
  to more than `MAX_VALUE_BYTES`, whatever the type of the arguments or of
  the format (`printf_size_bound` reads the format as SQLite does);
- invalid UTF-8 text is decoded with replacement characters instead of failing.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

from jaxsql.sql.result import ExecResult

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BYTES = 64 << 20
#: Private memory of one worker process, SQLite's heap included (see `jaxsql.sql.worker`).
DEFAULT_MAX_MEMORY = 512 << 20

#: VM instructions between two deadline checks. Each check calls into Python, so a
#: small value costs time; 10k instructions are ~0.25 ms of SQLite work.
PROGRESS_EVERY = 10_000
#: Longest query text, in UTF-8 bytes (SQLite's own limit is 1 GB).
MAX_SQL_BYTES = 4 << 20
#: How long SQLite retries a database locked by a writer before ``busy``.
BUSY_RETRY_S = 0.5
_MAX_EXPR_DEPTH = 1_000
_MMAP_BYTES = 256 << 20

_READ_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})
_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})


def _authorize(action: int, arg1: str | None, arg2: str | None, dbname: str | None, source: str | None) -> int:
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


#: Conversions of SQLite's printf that take an argument, and those that take none; any
#: other character ends the formatting (SQLite stops at an unknown conversion).
_PRINTF_ARG_CONVERSIONS = frozenset("dsgzqQwcouxXfeEGipr")
_PRINTF_NO_ARG_CONVERSIONS = frozenset("n%")
_PRINTF_FLAGS = frozenset("-+ #!0,")
_ASCII_DIGITS = frozenset("0123456789")


def printf_size_bound(fmt: str, args: tuple, magnitude: Any) -> float:
    """Sum of the widths and precisions that SQLite's printf would use for `fmt` with `args`.

    Walks the format exactly as SQLite's ``sqlite3_str_vappendf`` does for the
    SQL function (``%[flags][width|*][.[precision|*]][l|ll]conversion``, flags
    ``-+ #!0,``, a precision of no digits is 0, ``%n`` and ``%%`` take no
    argument, an unknown conversion or a NUL ends the formatting), so the
    arguments read for ``*`` are the ones SQLite reads. `magnitude` gives the
    size of a ``*`` argument. A digit run too long to be a size counts as
    infinite. Stops adding once the sum passes `MAX_VALUE_BYTES`.
    """
    end = fmt.find("\x00")
    n = len(fmt) if end < 0 else end
    i = arg = 0
    total = 0.0

    def size() -> float:
        """The width or precision at `i`: a ``*`` argument's magnitude, or a digit run (none: 0)."""
        nonlocal i, arg
        if i < n and fmt[i] == "*":
            i += 1
            arg += 1
            return magnitude(args[arg - 1] if arg <= len(args) else 0)
        j = i
        while i < n and fmt[i] in _ASCII_DIGITS:
            i += 1
        if i - j > 12:
            return math.inf
        return float(fmt[j:i]) if i > j else 0.0

    while total <= MAX_VALUE_BYTES:
        i = fmt.find("%", i, n)
        if i < 0 or i + 1 >= n:
            break
        i += 1
        while i < n and fmt[i] in _PRINTF_FLAGS:
            i += 1
        total += size()  # the width
        if i < n and fmt[i] == ".":
            i += 1
            total += size()  # the precision
        if i < n and fmt[i] == "l":
            i += 2 if fmt.startswith("ll", i) else 1
        if i >= n:
            break
        conv = fmt[i]
        i += 1
        if conv in _PRINTF_ARG_CONVERSIONS:
            arg += 1
        elif conv not in _PRINTF_NO_ARG_CONVERSIONS:
            break
    return total


def _guarded_printf(helper: sqlite3.Connection) -> Any:
    """SQLite's printf/format, but NULL when its widths and precisions add up to more than `MAX_VALUE_BYTES`.

    The built-in pads in a single VM instruction (``printf('%.1000000000c', 'x')``
    spins for seconds, beyond the progress handler's reach), and keeps doing
    the padding work of every conversion even after its result has passed
    the length limit (4,000 times ``%.200000c``: 6 s for a NULL). So this
    adds up every width and precision first (`printf_size_bound`), answers
    NULL (SQLite's own answer for an over-long result) when the sum is over
    the cap, and otherwise lets the built-in format on a private in-memory
    connection whose length limit is `MAX_VALUE_BYTES`.

    Type-robust: the format is read as SQLite reads it (a BLOB or a number as
    its text), and a ``*`` width or precision of any type is converted the
    way SQLite converts it, taking the larger of its integer and real readings
    (``'1000000000'``, ``x'31303030'``, ``1e9`` and ``'1e9'`` are all caught).
    """
    helper.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)

    def magnitude(value: Any) -> float:
        if isinstance(value, bool) or value is None:
            return 0.0
        if isinstance(value, (int, float)):
            return abs(float(value))
        a, b = helper.execute("SELECT abs(CAST(?1 AS INTEGER)), abs(CAST(?1 AS REAL))", (value,)).fetchone()
        return max(float(a or 0), float(b or 0))

    def printf(*args: Any) -> Any:
        if not args:
            return None
        fmt = args[0]
        if isinstance(fmt, bytes):
            fmt = fmt.decode("utf-8", "replace")
        if isinstance(fmt, str) and printf_size_bound(fmt, args[1:], magnitude) > MAX_VALUE_BYTES:
            return None
        marks = ",".join("?" * len(args))
        return helper.execute(f"SELECT printf({marks})", args).fetchone()[0]

    return printf


class DatabaseMissing(Exception):
    """The database path does not name a readable SQLite file."""


class DatabaseBusy(Exception):
    """The database is locked by a writer (transient: try again later)."""


#: Largest string/BLOB any query may build. It also bounds the worst case of
#: functions that run inside one VM instruction, where the progress handler
#: cannot interrupt (``instr`` of two such strings is quadratic).
MAX_VALUE_BYTES = 256 << 10


def value_cap_bytes(max_bytes: int) -> int:
    """Largest single string/BLOB SQLite may build for a query with byte cap `max_bytes`."""
    return max(4096, min(MAX_VALUE_BYTES, max_bytes))


def _is_wal(path: Path) -> bool:
    """True when the file's header says WAL mode (read and write version bytes 18, 19 are 2)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02"


def wants_immutable(path: str | os.PathLike) -> bool:
    """True for a WAL database without a ``-wal`` file: `open_readonly` opens it ``immutable=1``."""
    return _is_wal(Path(path)) and not os.path.exists(f"{path}-wal")


def file_signature(path: str | os.PathLike) -> tuple[int, int, int, bool] | None:
    """(inode, size, mtime_ns, has a ``-wal`` file) of a database, or None when it is not a file.

    A connection opened ``immutable`` is only valid while this stays the same.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, os.path.exists(f"{path}-wal")


def open_readonly(db_path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> sqlite3.Connection:
    """Open `db_path` read-only with the sandbox's authorizer and limits, creating no file.

    A database in rollback-journal mode, or in WAL mode with a ``-wal`` file
    (a writer has it open), is opened ``mode=ro``: SQLite takes its usual
    shared locks and sees every committed write. A WAL database without a
    ``-wal`` file is opened ``immutable=1``: no locks and no ``-wal``/``-shm``
    files, so it is readable from a read-only folder; the connection is valid
    only while `file_signature` of the path is unchanged (the worker reopens
    it when a ``-wal`` file appears or the file is replaced).

    Raises `DatabaseMissing` when the path is not a readable SQLite file, and
    `DatabaseBusy` when a writer holds a lock for longer than `BUSY_RETRY_S`.
    """
    path = Path(db_path)
    if not path.is_file():
        raise DatabaseMissing(f"database {str(db_path)!r} does not exist")
    resolved = path.resolve()
    uri = resolved.as_uri() + ("?immutable=1" if wants_immutable(resolved) else "?mode=ro")
    try:
        # cached_statements=0: every query is prepared afresh, so its VM-step
        # count starts at zero (see `_Budget`).
        con = sqlite3.connect(uri, uri=True, timeout=BUSY_RETRY_S, isolation_level=None,
                              check_same_thread=False, cached_statements=0)
    except sqlite3.Error as e:
        raise DatabaseMissing(f"cannot open database {str(db_path)!r}: {e}{_wal_hint(resolved)}") from None
    try:
        if hasattr(con, "enable_load_extension"):
            con.enable_load_extension(False)
        con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, value_cap_bytes(max_bytes))
        con.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES)
        con.setlimit(sqlite3.SQLITE_LIMIT_EXPR_DEPTH, _MAX_EXPR_DEPTH)
        con.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        con.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1_000)
        guard = _guarded_printf(sqlite3.connect(":memory:", check_same_thread=False))
        con.create_function("printf", -1, guard)
        con.create_function("format", -1, guard)
        con.execute("PRAGMA query_only = ON")
        con.execute("PRAGMA trusted_schema = OFF")
        # Sorts, DISTINCT, GROUP BY and materialised subqueries spill to temp
        # files by default (1 GB written in one 5 s query): keep them in
        # memory, where the worker's heap limit bounds them.
        con.execute("PRAGMA temp_store = MEMORY")
        # Read pages through a memory map: no copy into a per-connection page
        # cache, and the OS page cache is shared by all worker threads.
        con.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
        # Reading the schema once here turns "not a database" into db_missing.
        con.execute("SELECT count(*) FROM sqlite_master").fetchall()
        con.set_authorizer(_authorize)
    except sqlite3.Error as e:
        con.close()
        if is_busy(e):
            raise DatabaseBusy(f"database {str(db_path)!r} is locked by a writer: {e}") from None
        raise DatabaseMissing(f"cannot read database {str(db_path)!r}: {e}{_wal_hint(resolved)}") from None
    return con


def _wal_hint(path: Path) -> str:
    """Why a WAL database with a ``-wal`` file may not open: SQLite needs a ``-shm`` file beside it."""
    if not _is_wal(path) or not os.path.exists(f"{path}-wal") or os.path.exists(f"{path}-shm") \
            or os.access(path.parent, os.W_OK):
        return ""
    return (" (a WAL database with a -wal file, in a folder where SQLite cannot create the -shm file it needs "
            "to read the -wal: checkpoint it where it was written, PRAGMA wal_checkpoint(TRUNCATE), or copy "
            "it to a writable folder)")


def is_busy(exc: BaseException) -> bool:
    """True for SQLITE_BUSY / SQLITE_LOCKED: a writer holds a lock, try again later."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "is locked" in str(exc).lower()


_SYNTAX_MARKERS = (
    "syntax error", "incomplete input", "unrecognized token", "no such ", "ambiguous column",
    "wrong number of arguments", "misuse of", "no tables specified", "has no column named",
    "selects to the left and right", "circular reference", "not allowed", "unknown ", "row value misused",
    "is not a function", "sub-select returns",
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?(\*/|$)", re.DOTALL)
_TOO_LARGE_MARKERS = ("too big", "too large", "too many", "stack overflow", "out of memory")
_DENIED_MARKERS = ("not authorized", "readonly", "read-only", "prohibited")


def classify_error(exc: BaseException) -> str:
    """Map a sqlite3 exception to an `ExecResult` error kind."""
    if isinstance(exc, MemoryError):
        return "too_large"
    if is_busy(exc):
        return "busy"
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name in ("SQLITE_AUTH", "SQLITE_READONLY"):
        return "denied"
    if name in ("SQLITE_TOOBIG", "SQLITE_NOMEM"):
        return "too_large"
    msg = str(exc).lower()
    if any(m in msg for m in _DENIED_MARKERS):
        return "denied"
    if any(m in msg for m in _TOO_LARGE_MARKERS):
        return "too_large"
    if any(m in msg for m in _SYNTAX_MARKERS):
        return "syntax"
    return "runtime"


def _blob_text(raw: bytes) -> str:
    return "x'" + raw.hex() + "'"


class _Budget:
    """The progress handler of one query: wall-clock deadline and VM-step budget.

    SQLite calls `check` every `every` VM instructions (it catches up when an
    instruction jumps past several intervals), so ``calls * every`` counts the
    instructions executed, rounded down. The statement is prepared fresh for
    every query (``cached_statements=0``): a reused statement would carry its
    previous run's count modulo `every`, making the count depend on history.
    """

    __slots__ = ("deadline", "max_vm_steps", "every", "calls", "stopped_by")

    def __init__(self, deadline: float, max_vm_steps: int | None) -> None:
        self.deadline = deadline
        self.max_vm_steps = max_vm_steps
        self.every = PROGRESS_EVERY if max_vm_steps is None else min(PROGRESS_EVERY, max_vm_steps)
        self.calls = 0
        self.stopped_by: str | None = None

    @property
    def vm_steps(self) -> int:
        return self.calls * self.every

    def check(self) -> int:
        self.calls += 1
        if self.max_vm_steps is not None and self.calls * self.every >= self.max_vm_steps:
            self.stopped_by = "vm_steps"
            return 1
        if time.perf_counter() > self.deadline:
            self.stopped_by = "deadline"
            return 1
        return 0


def check_limits(timeout_s: float, max_rows: int, max_bytes: int, max_vm_steps: int | None,
                 max_memory: int = DEFAULT_MAX_MEMORY) -> None:
    """Raise ValueError naming the bad value unless every budget is usable."""
    from jaxsql.sql.worker import MIN_MAX_MEMORY

    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < MIN_MAX_MEMORY:
        raise ValueError(f"max_memory must be an int >= {MIN_MAX_MEMORY} bytes, got {max_memory!r}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows!r}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes!r}")
    if max_vm_steps is not None and (isinstance(max_vm_steps, bool) or not isinstance(max_vm_steps, int)
                                     or max_vm_steps < 1):
        raise ValueError(f"max_vm_steps must be None or an int >= 1, got {max_vm_steps!r}")


def run_query(
    con: sqlite3.Connection,
    sql: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_vm_steps: int | None = None,
) -> ExecResult:
    """Run `sql` on a connection made by `open_readonly`, in this process.

    Same budgets and answers as `execute`, except that nothing here can stop
    SQLite while it prepares the statement or inside one function call:
    `execute` runs this in a worker process that is killed at the deadline.
    """
    start = time.perf_counter()
    if not isinstance(sql, str) or not sql.strip():
        return ExecResult.failure("syntax", "empty query", time.perf_counter() - start)
    try:
        n_bytes = len(sql.encode("utf-8"))
    except UnicodeEncodeError:
        return ExecResult.failure("syntax", "query is not valid UTF-8 text", time.perf_counter() - start)
    if "\x00" in sql:
        return ExecResult.failure("syntax", "query contains a NUL character", time.perf_counter() - start)
    if n_bytes > MAX_SQL_BYTES:
        return ExecResult.failure("too_large", f"query longer than {MAX_SQL_BYTES} bytes", time.perf_counter() - start)
    budget = _Budget(start + timeout_s, max_vm_steps)
    con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, value_cap_bytes(max_bytes))
    ok, payload, limit = _fetch_all(con, sql, budget, max_rows, max_bytes)
    elapsed = time.perf_counter() - start
    if ok:
        columns, rows = payload
        return ExecResult(ok=True, columns=columns, rows=rows, elapsed_s=elapsed, vm_steps=budget.vm_steps)
    kind, message = payload
    return ExecResult.failure(kind, message, elapsed, limit=limit, vm_steps=budget.vm_steps)


class _ResultTooLarge(Exception):
    """Raised from inside the fetch (by the text factory) the moment the byte cap is passed."""


def _fetch_all(
    con: sqlite3.Connection, sql: str, budget: _Budget, max_rows: int, max_bytes: int,
) -> tuple[bool, tuple[Any, Any], str | None]:
    """``(True, (columns, rows), None)`` or ``(False, (kind, message), limit)``.

    Memory is counted before more is spent: every text value passes through
    the text factory, which adds its size and stops the fetch as soon as the
    total passes `max_bytes`; BLOBs, numbers and the row count are added
    after each row. So a refused result never holds more than `max_bytes`
    plus one text value (at most `MAX_VALUE_BYTES`) or one row's BLOBs.
    """
    nbytes = 0

    def text(raw: bytes) -> str:
        nonlocal nbytes
        nbytes += len(raw)
        if nbytes > max_bytes:
            raise _ResultTooLarge
        # Valid UTF-8 decodes as with `str`; invalid bytes become U+FFFD.
        return raw.decode("utf-8", "replace")

    con.text_factory = text
    con.set_progress_handler(budget.check, budget.every)
    cur = None
    try:
        cur = con.execute(sql)
        if cur.description is None:
            if not _COMMENTS.sub("", sql).strip(" \t\r\n\f;"):
                return False, ("syntax", "empty query (only comments)"), None
            return False, ("denied", "not a query: only statements that return rows may run"), None
        columns = tuple(d[0] for d in cur.description)
        rows: list[tuple[Any, ...]] = []
        for row in cur:
            has_blob = False
            for v in row:
                t = type(v)
                if t is bytes:
                    has_blob = True
                    nbytes += 2 * len(v) + 3
                elif t is not str:  # text was counted by the text factory
                    nbytes += 8
            if has_blob:
                row = tuple(_blob_text(v) if type(v) is bytes else v for v in row)
            rows.append(row)
            if len(rows) > max_rows:
                return False, ("too_large", f"more than {max_rows} rows"), "rows"
            if nbytes > max_bytes:
                raise _ResultTooLarge
            if not len(rows) & 63 and time.perf_counter() > budget.deadline:
                return False, ("timeout", "deadline passed while fetching rows"), "deadline"
        return True, (columns, tuple(rows)), None
    except _ResultTooLarge:
        return False, ("too_large", f"result larger than {max_bytes} bytes"), "bytes"
    except sqlite3.ProgrammingError as e:
        if "one statement" in str(e):
            return False, ("denied", "only one statement per query is allowed"), None
        return _failure(e, budget)
    except (sqlite3.Error, MemoryError, OverflowError, ValueError) as e:
        return _failure(e, budget)
    finally:
        if cur is not None:
            cur.close()
        con.set_progress_handler(None, 0)


def _failure(exc: BaseException, budget: _Budget) -> tuple[bool, tuple[str, str], str | None]:
    if budget.stopped_by is not None:
        what = (f"VM-step budget of {budget.max_vm_steps} instructions used up"
                if budget.stopped_by == "vm_steps" else "deadline passed")
        return False, ("timeout", f"{what} ({exc})"), budget.stopped_by
    kind = classify_error(exc)
    limit = "memory" if kind == "too_large" and _is_out_of_memory(exc) else None
    return False, (kind, str(exc) or type(exc).__name__), limit


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or getattr(exc, "sqlite_errorname", "") == "SQLITE_NOMEM" \
        or "out of memory" in str(exc).lower()


def execute(
    db_path: str | os.PathLike,
    sql: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_vm_steps: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> ExecResult:
    """Run one untrusted query read-only against the SQLite file `db_path`, in a worker process.

    Never raises for a bad query or database: every failure is an `ExecResult`
    with ``ok=False`` and an error kind (``syntax``, ``runtime``, ``timeout``,
    ``too_large``, ``denied``, ``busy``, ``db_missing``). More than `max_rows`
    rows or more than `max_bytes` bytes of values is ``too_large`` (no
    truncated result).

    The query runs in one of this process's idle worker processes (one is
    started when none is idle, ~0.1 s; see `jaxsql.sql.worker`), so it is
    bounded from the first byte: a query still running `KILL_GRACE_S` after
    its deadline (SQLite preparing a pathological statement, or inside one
    function call) has its worker killed and is answered ``timeout``, and
    the worker's memory, SQLite's included, stays within `max_memory`.

    Args:
      db_path: the SQLite file (opened read-only; never created).
      sql: one untrusted statement.
      timeout_s: wall-clock deadline in seconds (finite, > 0). Whether a slow
        query passes it depends on the machine and its load.
      max_rows: more rows than this is ``too_large`` (``limit="rows"``).
      max_bytes: more bytes of values than this is ``too_large`` (``limit="bytes"``).
      max_vm_steps: None, or a budget of SQLite virtual-machine instructions:
        a query that executes that many is stopped with error ``timeout`` and
        ``limit="vm_steps"``. The count depends only on the query, the
        database and the SQLite version, so unlike the deadline it gives the
        same answer on every machine at any load. Checked every
        `PROGRESS_EVERY` (10,000) instructions, or every `max_vm_steps` when
        smaller: the query stops at the first check at or past the budget.
        The deadline still applies; whichever budget runs out first ends the
        query and is named in `ExecResult.limit`.
      max_memory: the worker process's private memory in bytes (at least
        128 MiB): a query that needs more is ``too_large`` with
        ``limit="memory"``.

    ``elapsed_s`` of the result is the query's own time (opening the
    database, running, fetching), not the start of a worker.

    Raises:
      ValueError: a budget is not usable (`timeout_s` not a finite number > 0,
        `max_rows` / `max_bytes` < 1, `max_vm_steps` not None or an int >= 1,
        `max_memory` below 128 MiB).
    """
    check_limits(timeout_s, max_rows, max_bytes, max_vm_steps, max_memory)
    from jaxsql.sql.worker import run_isolated

    if not isinstance(sql, str):
        return ExecResult.failure("syntax", f"the query must be text, got {type(sql).__name__}")
    return run_isolated((os.fspath(db_path), sql, float(timeout_s), int(max_rows), int(max_bytes), max_vm_steps,
                         False), float(timeout_s), int(max_memory))
