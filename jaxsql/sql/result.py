"""The typed value every query execution returns."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

#: Error kinds, in the order a reader should check them.
ERROR_KINDS = ("syntax", "runtime", "timeout", "too_large", "denied", "db_missing")

#: The sandbox budgets that can end a query, reported in `ExecResult.limit`:
#: ``deadline`` (wall clock, error ``timeout``), ``vm_steps`` (SQLite VM
#: instructions, error ``timeout``, reproducible), ``rows`` and ``bytes``
#: (result size, error ``too_large``).
LIMITS = ("deadline", "vm_steps", "rows", "bytes")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Outcome of running one SQL query in the sandbox.

    Attributes:
      ok: True when the query ran to completion and every row was fetched.
      columns: result column names (empty on error).
      rows: result rows; every value is ``None``, ``int``, ``float`` or ``str``
        (BLOBs become the string ``"x'<hex>'"``, invalid UTF-8 text is decoded
        with U+FFFD replacement characters), so rows are hashable and JSON-ready.
      error: None when ok, else one of `ERROR_KINDS`.
      message: the engine's message for an error, ``""`` when ok.
      elapsed_s: wall-clock seconds spent opening, running and fetching.
      limit: which sandbox budget ended the query (one of `LIMITS`), or None:
        ``"deadline"`` or ``"vm_steps"`` for a ``timeout``, ``"rows"`` or
        ``"bytes"`` for a ``too_large`` result cap; None when ok and for
        every other failure.
      vm_steps: SQLite VM instructions the query executed, counted by the
        progress handler: a multiple of its check interval (10,000, or
        ``max_vm_steps`` when smaller), rounded down, so cheap queries show
        0. It depends only on the query, the database file and the SQLite
        version, never on machine load.
    """

    ok: bool
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()
    error: str | None = None
    message: str = ""
    elapsed_s: float = 0.0
    limit: str | None = None
    vm_steps: int = 0

    def __post_init__(self) -> None:
        if self.ok and self.error is not None:
            raise ValueError("ExecResult: ok result cannot carry an error kind")
        if not self.ok and self.error not in ERROR_KINDS:
            raise ValueError(f"ExecResult: error must be one of {ERROR_KINDS}, got {self.error!r}")
        if self.limit is not None and (self.ok or self.limit not in LIMITS):
            raise ValueError(f"ExecResult: limit must be None or, on a failure, one of {LIMITS}; got {self.limit!r}")

    @classmethod
    def failure(cls, kind: str, message: str, elapsed_s: float = 0.0, *,
                limit: str | None = None, vm_steps: int = 0) -> "ExecResult":
        """An error result of `kind` (one of `ERROR_KINDS`), ended by `limit` (one of `LIMITS`) if any."""
        return cls(ok=False, error=kind, message=message, elapsed_s=elapsed_s, limit=limit, vm_steps=vm_steps)

    def to_json(self) -> dict[str, Any]:
        """``{"ok": true, "columns", "rows", "elapsed_s", "vm_steps"}`` or
        ``{"ok": false, "error", "message", "limit", "elapsed_s", "vm_steps"}``.

        Strict JSON: infinite floats become the strings ``"Infinity"`` / ``"-Infinity"``.
        """
        if self.ok:
            return {
                "ok": True,
                "columns": list(self.columns),
                "rows": [[_json_value(v) for v in r] for r in self.rows],
                "elapsed_s": round(self.elapsed_s, 6),
                "vm_steps": self.vm_steps,
            }
        return {
            "ok": False,
            "error": self.error,
            "message": self.message,
            "limit": self.limit,
            "elapsed_s": round(self.elapsed_s, 6),
            "vm_steps": self.vm_steps,
        }


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v
