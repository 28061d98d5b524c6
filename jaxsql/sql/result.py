"""The typed value every query execution returns."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

#: Error kinds, in the order a reader should check them.
ERROR_KINDS = ("syntax", "runtime", "timeout", "too_large", "denied", "db_missing")


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
    """

    ok: bool
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()
    error: str | None = None
    message: str = ""
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        if self.ok and self.error is not None:
            raise ValueError("ExecResult: ok result cannot carry an error kind")
        if not self.ok and self.error not in ERROR_KINDS:
            raise ValueError(f"ExecResult: error must be one of {ERROR_KINDS}, got {self.error!r}")

    @classmethod
    def failure(cls, kind: str, message: str, elapsed_s: float = 0.0) -> "ExecResult":
        """An error result of `kind` (one of `ERROR_KINDS`)."""
        return cls(ok=False, error=kind, message=message, elapsed_s=elapsed_s)

    def to_json(self) -> dict[str, Any]:
        """``{"ok": true, "columns", "rows", "elapsed_s"}`` or ``{"ok": false, "error", "message", "elapsed_s"}``.

        Strict JSON: infinite floats become the strings ``"Infinity"`` / ``"-Infinity"``.
        """
        if self.ok:
            return {
                "ok": True,
                "columns": list(self.columns),
                "rows": [[_json_value(v) for v in r] for r in self.rows],
                "elapsed_s": round(self.elapsed_s, 6),
            }
        return {
            "ok": False,
            "error": self.error,
            "message": self.message,
            "elapsed_s": round(self.elapsed_s, 6),
        }


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v
