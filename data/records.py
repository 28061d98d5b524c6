"""The one record type every dataset reader produces."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxsql.errors import JaxsqlError


class MalformedRecord(JaxsqlError):
    """A dataset row that cannot become an `Example`; the message names file and row."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One text-to-SQL (or table-QA) example.

    Attributes:
      id: unique within its source, e.g. ``"spider-dev-17"``.
      db_path: path of the SQLite database the question is asked against.
      question: the natural-language question.
      evidence: external knowledge (BIRD) or ``""``.
      gold_sql: gold query, or None for question-answer-only data (weak supervision).
      gold_answers: gold answer strings, or None when only gold SQL is known.
      difficulty: difficulty or question type (``"simple"``, ``"temporal"``...), or ``""``.
      source: name of the reader that produced it (``"spider"``, ``"synthetic"``...).
    """

    id: str
    db_path: str
    question: str
    evidence: str = ""
    gold_sql: str | None = None
    gold_answers: tuple[str, ...] | None = None
    difficulty: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("id", "db_path", "question"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise MalformedRecord(f"Example {self.id!r}: field {name!r} must be a non-empty string")
        if self.gold_sql is None and not self.gold_answers:
            raise MalformedRecord(f"Example {self.id!r}: needs gold_sql or gold_answers")
        if self.gold_answers is not None and not isinstance(self.gold_answers, tuple):
            object.__setattr__(self, "gold_answers", tuple(str(a) for a in self.gold_answers))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        d = dataclasses.asdict(self)
        if d["gold_answers"] is not None:
            d["gold_answers"] = list(d["gold_answers"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record") -> "Example":
        """Build from plain data; `where` (file:line) is named in errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MalformedRecord(f"{where}: unknown field(s) {unknown}")
        missing = [k for k in ("id", "db_path", "question") if k not in d]
        if missing:
            raise MalformedRecord(f"{where}: missing field(s) {missing}")
        kwargs = dict(d)
        answers = kwargs.get("gold_answers")
        if answers is not None:
            if isinstance(answers, str) or not isinstance(answers, (list, tuple)):
                raise MalformedRecord(f"{where}: gold_answers must be a list of strings")
            kwargs["gold_answers"] = tuple(str(a) for a in answers)
        try:
            return cls(**kwargs)
        except MalformedRecord as e:
            raise MalformedRecord(f"{where}: {e}") from None
