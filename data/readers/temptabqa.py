"""TempTabQA-C (Kulkarni et al. 2025): one SQLite database per athlete, built from the infobox text.

Source root: ``dev_set.tsv`` (split ``dev``) / ``test_original.tsv`` (split
``test``) with columns ``Types, Questions, Answers, Context`` and (dev) ``PlayerName``
(else the infobox's first line names the athlete) and ``schema.sql`` (MySQL DDL of Athlete,
Tournament, Format, Medal, PersonalInformation). ``Context`` is the
athlete's Wikipedia infobox as text::

    <name>
    Personal Information
    Birth Date
    1995-1-23
    ...
    Country Representing: GER
    <tournament>                                  (a line without a tab)
    <format>\\t<Medal> | <year> | <place>, <Medal> | <year> | <place>, ...

`build_athlete_db` loads that into the published schema (converted to
SQLite by `mysql_to_sqlite`): one Athlete row, its PersonalInformation
(birth year/month/day), one Tournament row per tournament block, one Format
row per format line and one Medal row per medal (``type`` keeps the
infobox spelling, ``MedalGold``/``MedalSilver``/``MedalBronze``, as the
published SQL expects). Databases are written under ``db_dir`` (required;
never the source directory) as ``<athlete-slug>-<hash of context>.sqlite``;
an existing identical database is reused.

Gold answers are the ``Answers`` text split on ``", "`` (the dataset's list
separator). There is no gold SQL per question; `data.temptabqa_check` runs
the published SQL logic per question type against the built databases.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sqlite3
import sys
from pathlib import Path

from data.readers.common import BadRows, require_dir, require_file
from data.records import Example, MalformedRecord
from jaxsql.errors import JaxsqlError

_SPLIT_FILES = {"dev": "dev_set.tsv", "test": "test_original.tsv"}
_MEDAL = re.compile(r"(Medal[A-Za-z]+)\s*\|\s*(\d{4})\s*\|\s*(.*?)\s*(?=,\s*Medal[A-Za-z]+\s*\||$)")
_DATE = re.compile(r"^(\d{3,4})-(\d{1,2})-(\d{1,2})$")
_PERSONAL_KEYS = {"Personal Information", "Birth Date", "Birth Place", "Height", "Weight", "Years Active",
                  "Handedness", "Coach", "Career Record", "Date Of Highest Ranking", "Highest Ranking",
                  "Current Ranking", "Playing Style", "Grip", "Equipment", "Club", "Nickname",
                  "Turned Pro", "Retired", "Plays", "Residence", "Hometown"}


def mysql_to_sqlite(ddl: str) -> str:
    """The CREATE TABLE statements of MySQL DDL, rewritten for SQLite.

    Drops ``USE`` and ``DROP`` statements and comments; ``INT AUTO_INCREMENT
    PRIMARY KEY`` becomes ``INTEGER PRIMARY KEY`` (SQLite's rowid alias);
    ``ENGINE=...``/charset table options are removed. Types such as
    ``VARCHAR(100)`` are kept (SQLite accepts them with TEXT affinity).
    """
    text = re.sub(r"--[^\n]*", "", ddl)
    statements = [s.strip() for s in text.split(";")]
    out = []
    for s in statements:
        if not re.match(r"(?i)create\s+table", s):
            continue
        s = re.sub(r"(?i)\bINT(EGER)?\s+AUTO_INCREMENT\s+PRIMARY\s+KEY", "INTEGER PRIMARY KEY", s)
        s = re.sub(r"(?i)\s+AUTO_INCREMENT\b", "", s)
        s = re.sub(r"(?i)\)\s*(ENGINE|DEFAULT\s+CHARSET|CHARSET|COLLATE)\b[^)]*$", ")", s)
        s = s.replace("`", '"')
        out.append(s + ";")
    if not out:
        raise JaxsqlError("schema has no CREATE TABLE statement")
    return "\n".join(out) + "\n"


def parse_context(context: str) -> dict:
    """``{"name", "birth": (y, m, d) or None, "tournaments": [(name, [(format, [(type, year, place)])])]}``."""
    lines = [ln.rstrip("\r") for ln in context.split("\n")]
    nonblank = [ln for ln in lines if ln.strip()]
    if not nonblank:
        raise ValueError("empty context")
    name = nonblank[0].strip()
    birth = None
    for i, ln in enumerate(lines):
        if ln.strip() == "Birth Date":
            for nxt in lines[i + 1:i + 3]:
                m = _DATE.match(nxt.strip())
                if m:
                    birth = tuple(int(g) for g in m.groups())
                    break
            break
    start = next((i + 1 for i, ln in enumerate(lines) if ln.strip().startswith("Country Representing")), None)
    if start is None:
        # No country line: medals start after the last personal-information value.
        start = 1
    tournaments: list[tuple[str, list]] = []
    current: tuple[str, list] | None = None
    for ln in lines[start:]:
        if not ln.strip():
            current = None
            continue
        if "\t" in ln and _MEDAL.search(ln):
            fmt, _, medals = ln.partition("\t")
            if current is None:
                current = ("", [])
                tournaments.append(current)
            current[1].append((fmt.strip(), [(t, int(y), p.strip()) for t, y, p in _MEDAL.findall(medals.strip())]))
        elif ln.strip() not in _PERSONAL_KEYS and "\t" not in ln:
            current = (ln.strip(), [])
            tournaments.append(current)
    return {"name": name, "birth": birth, "tournaments": [t for t in tournaments if t[1]]}


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    return s[:60] or "athlete"


def build_athlete_db(player: str, context: str, schema_sqlite: str, db_dir: Path) -> Path:
    """Build (or reuse) the database of one athlete; returns its path."""
    parsed = parse_context(context)
    digest = hashlib.sha1((schema_sqlite + "\0" + player + "\0" + context).encode()).hexdigest()[:10]
    path = db_dir / f"{_slug(player)}-{digest}.sqlite"
    if path.is_file():
        return path
    conn = sqlite3.connect(":memory:")
    conn.executescript(schema_sqlite)
    conn.execute("INSERT INTO Athlete (athlete_id, name) VALUES (1, ?)", (player,))
    if parsed["birth"] is not None:
        y, m, d = parsed["birth"]
        conn.execute("INSERT INTO PersonalInformation (info_id, athlete_id, birth_year, birth_month, birth_day) "
                     "VALUES (1, 1, ?, ?, ?)", (y, m, d))
    t_id = f_id = m_id = 0
    for t_name, formats in parsed["tournaments"]:
        t_id += 1
        conn.execute("INSERT INTO Tournament (tournament_id, athlete_id, name) VALUES (?, 1, ?)", (t_id, t_name))
        for f_name, medals in formats:
            f_id += 1
            conn.execute("INSERT INTO Format (format_id, tournament_id, name) VALUES (?, ?, ?)", (f_id, t_id, f_name))
            for kind, year, place in medals:
                m_id += 1
                conn.execute("INSERT INTO Medal (medal_id, format_id, type, year, location) VALUES (?, ?, ?, ?, ?)",
                             (m_id, f_id, kind, year, place))
    conn.commit()
    data = conn.serialize()
    conn.close()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def read_rows(f: Path) -> list[dict[str, str]]:
    """Rows of a TempTabQA-C TSV (fields hold quoted multi-line infobox text)."""
    csv.field_size_limit(sys.maxsize)
    with f.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = {"Types", "Questions", "Answers", "Context"} - set(reader.fieldnames or ())
        if missing:
            raise JaxsqlError(f"{f}: missing column(s) {sorted(missing)}")
        return list(reader)


def read_temptabqa(path: str | Path, *, split: str = "dev", skip_bad: bool = False,
                   db_dir: str | Path | None = None, require_databases: bool = True) -> list[Example]:
    """TempTabQA-C questions of `split`, each over its athlete's built database in `db_dir`.

    ``require_databases=False`` reads the questions without building databases
    (``db_path`` then names the infobox row); `db_dir` is required otherwise.
    """
    root = require_dir(path, "TempTabQA-C directory")
    name = _SPLIT_FILES.get(split, split if split.endswith(".tsv") else None)
    if name is None:
        raise JaxsqlError(f"temptabqa_c: unknown split {split!r}; expected 'dev', 'test' or a .tsv name")
    f = require_file(root / name, "TempTabQA-C questions file")
    schema = mysql_to_sqlite(require_file(root / "schema.sql", "TempTabQA-C schema").read_text(encoding="utf-8"))
    if require_databases:
        if db_dir is None:
            raise JaxsqlError("temptabqa_c: db_dir is required (the databases are built there, "
                              "never in the source directory)")
        out_dir = Path(db_dir)
        if out_dir.resolve() == root.resolve():
            raise JaxsqlError(f"temptabqa_c: db_dir must differ from the source directory {root}")
        out_dir.mkdir(parents=True, exist_ok=True)
    bad = BadRows(f)
    out: list[Example] = []
    for i, row in enumerate(read_rows(f)):
        where = f"{f} row {i + 2}"  # line of the header is 1; rows span several lines, so this is the row number
        try:
            question, player = (row.get("Questions") or "").strip(), (row.get("PlayerName") or "").strip()
            answer, context = (row.get("Answers") or "").strip(), row.get("Context") or ""
            if not player and context.strip():
                player = context.strip().split("\n", 1)[0].strip()  # test_original.tsv has no PlayerName
            if not question or not player or not answer or not context.strip():
                raise MalformedRecord(f"{where}: needs Questions, Answers, PlayerName and Context")
            if require_databases:
                try:
                    db = str(build_athlete_db(player, context, schema, out_dir))
                except ValueError as e:
                    raise MalformedRecord(f"{where}: cannot parse Context ({e})") from None
            else:
                db = f"{f}#row{i + 2}"
            out.append(Example(id=f"temptabqa_c-{split}-{i}", db_path=db, question=question,
                               gold_answers=tuple(a.strip() for a in answer.split(", ")),
                               difficulty=f"type{(row.get('Types') or '').strip()}", source="temptabqa_c"))
        except MalformedRecord as e:
            bad.add(e, skip_bad)
    bad.warn()
    return out
