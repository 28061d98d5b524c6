"""Sandboxed execution of untrusted SQL against SQLite, one query or a batch.

Public API: `execute`, `ExecResult`, `ERROR_KINDS`, `LIMITS`, `SqlPool`, `normalize_sql`.
See ``docs/sql.md`` for the guarantees.
"""

from jaxsql.sql.normalize import normalize_sql
from jaxsql.sql.pool import SqlPool
from jaxsql.sql.result import ERROR_KINDS, LIMITS, ExecResult
from jaxsql.sql.sandbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, execute

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_ROWS", "DEFAULT_TIMEOUT_S", "ERROR_KINDS", "LIMITS",
    "ExecResult", "SqlPool", "execute", "normalize_sql",
]
