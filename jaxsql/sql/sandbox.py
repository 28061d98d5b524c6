"""Run one untrusted SQL query against a SQLite database, read-only and bounded.

Guarantees of `execute` (each tested in ``tests/sql/test_hostile.py``):

- the database is opened read-only through a ``file:...?mode=ro`` URI, so a
  missing path is reported as ``db_missing`` and no file is ever created;
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
  expression depth, and rows and bytes fetched are capped (``too_large``);
- invalid UTF-8 text is decoded with replacement characters instead of failing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from jaxsql.sql.result import ExecResult

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BYTES = 64 << 20

#: VM instructions between two deadline checks. Each check takes the GIL, so a
#: small value costs concurrency; 10k instructions are ~0.1 ms of SQLite work.
PROGRESS_EVERY = 10_000
_FETCH_CHUNK = 64
_MAX_SQL_LENGTH = 1_000_000
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


_PRINTF_SPEC = re.compile(r"%[-+ 0#,!]*(\d+|\*)?(?:\.(\d+|\*))?(?:ll|l)?([a-zA-Z%])")


def _guarded_printf(helper: sqlite3.Connection) -> Any:
    """SQLite's printf/format, but NULL when a width or precision exceeds `MAX_VALUE_BYTES`.

    The built-in pads in a single VM instruction (``printf('%.1000000000c', 'x')``
    spins for seconds, beyond the progress handler's reach) and already answers
    NULL for results over the length limit; this checks the sizes first, then
    lets the built-in (on a private in-memory connection) do the formatting.
    """

    def printf(*args: Any) -> Any:
        if not args or not isinstance(args[0], str):
            return None if not args else helper.execute("SELECT printf(?)", args[:1]).fetchone()[0]
        rest = iter(args[1:])
        for width, precision, conv in _PRINTF_SPEC.findall(args[0]):
            for part in (width, precision):
                if part == "*":
                    value = next(rest, 0)
                    if isinstance(value, (int, float)) and abs(value) > MAX_VALUE_BYTES:
                        return None
                elif part and int(part) > MAX_VALUE_BYTES:
                    return None
            if conv != "%":
                next(rest, None)
        marks = ",".join("?" * len(args))
        return helper.execute(f"SELECT printf({marks})", args).fetchone()[0]

    return printf


class DatabaseMissing(Exception):
    """The database path does not name a readable SQLite file."""


#: Largest string/BLOB any query may build. It also bounds the worst case of
#: functions that run inside one VM instruction, where the progress handler
#: cannot interrupt (``instr`` of two such strings is quadratic).
MAX_VALUE_BYTES = 256 << 10


def value_cap_bytes(max_bytes: int) -> int:
    """Largest single string/BLOB SQLite may build: a fetched chunk stays within `max_bytes`."""
    return max(4096, min(MAX_VALUE_BYTES, max_bytes // _FETCH_CHUNK))


def open_readonly(db_path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> sqlite3.Connection:
    """Open `db_path` read-only with the sandbox's authorizer and limits.

    Raises `DatabaseMissing` when the path is not an existing file (nothing is created).
    """
    path = Path(db_path)
    if not path.is_file():
        raise DatabaseMissing(f"database {str(db_path)!r} does not exist")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        # cached_statements=0: every query is prepared afresh, so its VM-step
        # count starts at zero (see `_Budget`).
        con = sqlite3.connect(uri, uri=True, timeout=0.25, isolation_level=None, check_same_thread=False,
                              cached_statements=0)
    except sqlite3.Error as e:
        raise DatabaseMissing(f"cannot open database {str(db_path)!r}: {e}") from None
    try:
        if hasattr(con, "enable_load_extension"):
            con.enable_load_extension(False)
        con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, value_cap_bytes(max_bytes))
        con.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, _MAX_SQL_LENGTH)
        con.setlimit(sqlite3.SQLITE_LIMIT_EXPR_DEPTH, _MAX_EXPR_DEPTH)
        con.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        con.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1_000)
        guard = _guarded_printf(sqlite3.connect(":memory:", check_same_thread=False))
        con.create_function("printf", -1, guard)
        con.create_function("format", -1, guard)
        con.execute("PRAGMA query_only = ON")
        con.execute("PRAGMA trusted_schema = OFF")
        # Read pages through a memory map: no copy into a per-connection page
        # cache, and the OS page cache is shared by all worker threads.
        con.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
        # Reading the schema once here turns "not a database" into db_missing.
        con.execute("SELECT count(*) FROM sqlite_master").fetchall()
        con.set_authorizer(_authorize)
    except sqlite3.Error as e:
        con.close()
        raise DatabaseMissing(f"cannot read database {str(db_path)!r}: {e}") from None
    return con


_SYNTAX_MARKERS = (
    "syntax error", "incomplete input", "unrecognized token", "no such ", "ambiguous column",
    "wrong number of arguments", "misuse of", "no tables specified", "has no column named",
    "selects to the left and right", "circular reference", "not allowed", "unknown ", "row value misused",
    "is not a function", "sub-select returns",
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?(\*/|$)", re.DOTALL)
_TOO_LARGE_MARKERS = ("too big", "too large", "too many", "stack overflow", "out of memory")
_DENIED_MARKERS = ("not authorized", "readonly", "read-only", "prohibited")


def classify_error(exc: BaseException, timed_out: bool) -> str:
    """Map a sqlite3 exception to an `ExecResult` error kind."""
    if timed_out:
        return "timeout"
    if isinstance(exc, MemoryError):
        return "too_large"
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


def _decode_replacing(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


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


def check_limits(timeout_s: float, max_rows: int, max_bytes: int, max_vm_steps: int | None) -> None:
    """Raise ValueError naming the bad value unless every budget is usable."""
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
    """Run `sql` on a connection made by `open_readonly` (see `execute`)."""
    start = time.perf_counter()
    if not isinstance(sql, str) or not sql.strip():
        return ExecResult.failure("syntax", "empty query", time.perf_counter() - start)
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError:
        return ExecResult.failure("syntax", "query is not valid UTF-8 text", time.perf_counter() - start)
    if "\x00" in sql:
        return ExecResult.failure("syntax", "query contains a NUL character", time.perf_counter() - start)
    if len(sql) > _MAX_SQL_LENGTH:
        return ExecResult.failure("too_large", f"query longer than {_MAX_SQL_LENGTH} characters", time.perf_counter() - start)
    # One budget for both runs below: a retry does not get a second allowance.
    budget = _Budget(start + timeout_s, max_vm_steps)
    result = _run_once(con, sql, budget, max_rows, max_bytes, str)
    if result is None:  # invalid UTF-8 in a text value: decode it leniently and run again
        result = _run_once(con, sql, budget, max_rows, max_bytes, _decode_replacing)
    ok, payload, limit = result
    elapsed = time.perf_counter() - start
    if ok:
        columns, rows = payload
        return ExecResult(ok=True, columns=columns, rows=rows, elapsed_s=elapsed, vm_steps=budget.vm_steps)
    kind, message = payload
    return ExecResult.failure(kind, message, elapsed, limit=limit, vm_steps=budget.vm_steps)


def _run_once(
    con: sqlite3.Connection, sql: str, budget: _Budget, max_rows: int, max_bytes: int,
    text_factory: Callable[[bytes], str] | type[str],
) -> tuple[bool, tuple[Any, Any], str | None] | None:
    """``(True, (columns, rows), None)``, ``(False, (kind, message), limit)``, or None to retry with lenient text decoding."""
    con.text_factory = text_factory
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
        nbytes = 0
        while True:
            chunk = cur.fetchmany(_FETCH_CHUNK)
            if not chunk:
                break
            for row in chunk:
                has_blob = False
                for v in row:
                    t = type(v)
                    if t is str:
                        nbytes += len(v)
                    elif t is bytes:
                        has_blob = True
                        nbytes += 2 * len(v) + 3
                    else:
                        nbytes += 8
                if has_blob:
                    row = tuple(_blob_text(v) if type(v) is bytes else v for v in row)
                rows.append(row)
            if len(rows) > max_rows:
                return False, ("too_large", f"more than {max_rows} rows"), "rows"
            if nbytes > max_bytes:
                return False, ("too_large", f"result larger than {max_bytes} bytes"), "bytes"
            if time.perf_counter() > budget.deadline:
                return False, ("timeout", "deadline passed while fetching rows"), "deadline"
        return True, (columns, tuple(rows)), None
    except sqlite3.ProgrammingError as e:
        if "one statement" in str(e):
            return False, ("denied", "only one statement per query is allowed"), None
        return _failure(e, budget)
    except sqlite3.OperationalError as e:
        if "could not decode to utf-8" in str(e).lower() and text_factory is str:
            return None
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
    return False, (classify_error(exc, False), str(exc) or type(exc).__name__), None


def execute(
    db_path: str | os.PathLike,
    sql: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_vm_steps: int | None = None,
) -> ExecResult:
    """Run one untrusted query read-only against the SQLite file `db_path`.

    Never raises for a bad query or database: every failure is an `ExecResult`
    with ``ok=False`` and an error kind (``syntax``, ``runtime``, ``timeout``,
    ``too_large``, ``denied``, ``db_missing``). More than `max_rows` rows or
    more than `max_bytes` bytes of values is ``too_large`` (no truncated result).

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

    Raises:
      ValueError: a budget is not usable (`timeout_s` not a finite number > 0,
        `max_rows` / `max_bytes` < 1, `max_vm_steps` not None or an int >= 1).
    """
    check_limits(timeout_s, max_rows, max_bytes, max_vm_steps)
    start = time.perf_counter()
    try:
        con = open_readonly(db_path, max_bytes)
    except DatabaseMissing as e:
        return ExecResult.failure("db_missing", str(e), time.perf_counter() - start)
    try:
        result = run_query(con, sql, timeout_s=timeout_s, max_rows=max_rows, max_bytes=max_bytes,
                           max_vm_steps=max_vm_steps)
    finally:
        con.close()
    return dataclasses.replace(result, elapsed_s=time.perf_counter() - start)
