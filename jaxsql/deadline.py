"""A wall-clock budget for host-side work on model output (scoring, answer matching).

Everything that runs on model-controlled text is written in linear or
``n log n`` time; the loops that are not (the Spider column-permutation
search) and the batch as a whole also check a `Deadline`, so a policy cannot
stall the trainer by finding a slow input.
"""

from __future__ import annotations

import time


class ScoringTimeout(Exception):
    """Host-side scoring ran past its deadline."""


class Deadline:
    """A point in time after which `check` raises `ScoringTimeout` (``seconds=None``: never)."""

    __slots__ = ("at",)

    def __init__(self, seconds: float | None = None) -> None:
        self.at = None if seconds is None else time.monotonic() + float(seconds)

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.at is not None and time.monotonic() > self.at

    def check(self) -> None:
        """Raise `ScoringTimeout` when the deadline has passed."""
        if self.at is not None and time.monotonic() > self.at:
            raise ScoringTimeout("host-side scoring deadline passed")

    def sooner(self, seconds: float | None) -> "Deadline":
        """A deadline at the earlier of this one and `seconds` from now."""
        other = Deadline(seconds)
        if other.at is None or (self.at is not None and self.at <= other.at):
            return self
        return other


NEVER = Deadline(None)
