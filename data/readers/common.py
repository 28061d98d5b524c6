"""Helpers every reader shares: file checks and counting skipped rows."""

from __future__ import annotations

import warnings
from pathlib import Path

from data.records import MalformedRecord
from jaxsql.errors import JaxsqlError


def require_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path, or one clear error when it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise JaxsqlError(f"{what} not found: {p}")
    return p


def require_dir(path: str | Path, what: str = "directory") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise JaxsqlError(f"{what} not found: {p}")
    return p


def check_database(db: Path, where: str) -> None:
    """Raise `MalformedRecord` naming `where` when the database file is missing."""
    if not db.is_file():
        raise MalformedRecord(f"{where}: database not found: {db}")


class BadRows:
    """Either raise on the first bad row, or count them and warn once at the end."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.count = 0
        self.first: str | None = None

    def add(self, error: MalformedRecord, skip_bad: bool) -> None:
        if not skip_bad:
            raise error
        self.count += 1
        if self.first is None:
            self.first = str(error)

    def warn(self) -> None:
        if self.count:
            warnings.warn(f"{self.path}: skipped {self.count} bad row(s); first: {self.first}", stacklevel=3)
