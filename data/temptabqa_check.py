"""Check the TempTabQA-C database builder with the published SQL logic per question type.

``sql_with_types.tsv`` gives one SQL query per question type with
placeholders ``{player}``, ``{tournament}`` and ``{medal}``. For each
question we fill them in (the athlete's name; the longest of the athlete's
tournament names that occurs in the question; the medal named in the
question, ``Gold``/``Silver``/``Bronze`` -> ``'MedalGold'``..., default
``'MedalSilver'``, the slot the published SQL uses it for), run the query on
the athlete's built database with the read-only sandbox, and count the
question reproduced when the result matches the published answer by
denotation (`jaxsql.compare.denotation_match`, exact): either the result's
cells, or each result row's cells joined by a space (answers such as
``European Youth Championships 1993`` are a tournament and a year), against
the answer split on ``", "``.

The fraction reproduced measures the builder and the published SQL together:
some published queries are themselves wrong (types 66, 75, 77 join
``Medal.format_id`` to ``Athlete.athlete_id``).
"""

from __future__ import annotations

import csv
import dataclasses
import re
import sqlite3
import sys
from collections import Counter
from pathlib import Path

from data.readers.common import require_file
from data.readers.temptabqa import read_temptabqa
from jaxsql.errors import JaxsqlError

_MEDAL_WORDS = {"gold": "MedalGold", "silver": "MedalSilver", "bronze": "MedalBronze"}


@dataclasses.dataclass(frozen=True)
class ReproductionReport:
    total: int
    executed: int
    reproduced: int
    by_type: dict[str, tuple[int, int]]  # type -> (reproduced, total)

    @property
    def fraction(self) -> float:
        return self.reproduced / self.total if self.total else 0.0


def load_type_sql(path: str | Path) -> dict[str, str]:
    """Question type -> published SQL template, from ``sql_with_types.tsv``."""
    f = require_file(path, "sql_with_types.tsv")
    csv.field_size_limit(sys.maxsize)
    with f.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = {}
    for i, r in enumerate(rows):
        if not r.get("Types") or not r.get("SQL"):
            raise JaxsqlError(f"{f} row {i + 2}: needs Types and SQL")
        out.setdefault(r["Types"].strip(), r["SQL"].strip())
    return out


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _longest_in(question: str, names: list[str]) -> str:
    q = question.lower()
    found = [n for n in names if n and n.lower() in q]
    return max(found, key=len) if found else ""


def fill_sql(template: str, player: str, question: str, tournaments: list[str], formats: list[str] = ()) -> str:
    """The published template instantiated for one question.

    Placeholders: ``{player}``, ``{tournament}`` (longest athlete tournament
    named in the question), ``{medal}`` (medal named, default silver). The
    published templates also hard-code the values of one example question;
    those literals are re-bound from the question when it names its own:
    a year (``m.year = 2023`` / ``< 2016``), the only medal kind a query
    filters on, the tournament of ``t.name = 'Olympic Games'``, the format of
    ``f.name LIKE '%Team%'``, and the player of ``a.name = 'Dorothee Schneider'``.
    """
    q = question.lower()
    tournament = _longest_in(question, tournaments)
    named = [v for k, v in _MEDAL_WORDS.items() if re.search(rf"\b{k}\b", q)]
    medal = named[0] if named else "MedalSilver"
    sql = (template.replace("{player}", _quote(player)).replace("{tournament}", _quote(tournament))
           .replace("{medal}", _quote(medal)))
    year = re.search(r"\b(1[89]\d\d|20\d\d)\b", question)
    if year:
        sql = re.sub(r"(m2?\.year\s*(?:=|<|>)\s*)\d{4}\b", rf"\g<1>{year.group(1)}", sql)
    literal_medals = set(re.findall(r"'(Medal(?:Gold|Silver|Bronze))'", sql))
    if len(named) == 1 and len(literal_medals) == 1 and "{medal}" not in template:
        sql = sql.replace(f"'{literal_medals.pop()}'", _quote(named[0]))
    if tournament:
        sql = re.sub(r"(t2?\.name\s*=\s*)'[^']*'", lambda m: m.group(1) + _quote(tournament), sql)
    fmt = _longest_in(question, list(formats))
    if fmt:
        sql = re.sub(r"(f2?\.name\s+)LIKE\s+'%Team%'", lambda m: m.group(1) + "= " + _quote(fmt), sql)
    sql = re.sub(r"(a2?\.name\s*=\s*)'Dorothee Schneider'", lambda m: m.group(1) + _quote(player), sql)
    return sql


def _matches(rows: list[tuple], answers: tuple[str, ...]) -> bool:
    from jaxsql.compare import denotation_match

    if any(re.search(r"\b(has not|have not|did not|never)\b", a) for a in answers):
        # A negative published answer is reproduced by "nothing found".
        return all(c is None or c == 0 for r in rows for c in r)
    rows = [tuple(c.removeprefix("Medal") if isinstance(c, str) else c for c in r) for r in rows]
    if denotation_match(rows, answers)[0]:
        return True
    joined = [(" ".join(str(c) for c in r if c is not None),) for r in rows]
    return denotation_match(joined, answers)[0]


def check_reproduction(root: str | Path, db_dir: str | Path, *, split: str = "dev") -> ReproductionReport:
    """Run the published SQL per type on the built databases; count answers reproduced."""
    from jaxsql.sql.sandbox import execute

    root = Path(root)
    templates = load_type_sql(root / "sql_with_types.tsv")
    examples = read_temptabqa(root, split=split, db_dir=db_dir)
    total = executed = reproduced = 0
    per_type: Counter = Counter()
    per_type_ok: Counter = Counter()
    for ex in examples:
        kind = ex.difficulty.removeprefix("type")
        template = templates.get(kind)
        if template is None:
            continue
        conn = sqlite3.connect(f"file:{ex.db_path}?mode=ro", uri=True)
        player = conn.execute("SELECT name FROM Athlete").fetchone()[0]
        tournaments = [r[0] for r in conn.execute("SELECT name FROM Tournament")]
        formats = [r[0] for r in conn.execute("SELECT DISTINCT name FROM Format")]
        conn.close()
        sql = fill_sql(template, player, ex.question, tournaments, formats)
        result = execute(ex.db_path, sql.rstrip().rstrip(";"), timeout_s=5.0, max_rows=10_000)
        total += 1
        per_type[kind] += 1
        if result.ok:
            executed += 1
            if _matches(list(result.rows), ex.gold_answers or ()):
                reproduced += 1
                per_type_ok[kind] += 1
    return ReproductionReport(total, executed, reproduced,
                              {k: (per_type_ok[k], per_type[k]) for k in sorted(per_type, key=int)})

