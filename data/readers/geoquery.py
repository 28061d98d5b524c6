"""text2sql-data (Finegan-Dollak et al. 2018) files such as GeoQuery's ``geography.json``.

Each entry has gold ``sql`` (a list of equivalent queries; the first is
used), ``variables`` and ``sentences`` (each with ``text``, ``variables`` and
``question-split``); the entry itself has ``query-split``. Every sentence is
one example: each variable name (e.g. ``state_name0``) is replaced by its
value in the text and in the SQL (a variable a sentence does not bind takes
the entry's ``example`` value). Double-quoted literals become single-quoted
SQLite strings.

`path` is the JSON file or a directory holding one ``*.json`` with the
database ``<stem>.sqlite`` beside it. Options: ``split_kind`` ``"question"``
(default; ``question-split``) or ``"query"`` (``query-split``); split
``train``/``dev``/``test``/``all``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from data.readers.common import BadRows, require_file
from data.records import Example, MalformedRecord
from jaxsql.errors import JaxsqlError

_DQ = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _substitute(text: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):
        text = text.replace(name, values[name])
    return text


def _sql_literal(value: str) -> str:
    return value.replace("'", "''")


def read_text2sql(path: str | Path, *, split: str = "all", skip_bad: bool = False,
                  split_kind: str = "question", require_databases: bool = True,
                  db_path: str | Path | None = None) -> list[Example]:
    """Examples of a text2sql-data JSON file (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        candidates = sorted(q for q in p.glob("*.json"))
        if len(candidates) != 1:
            raise JaxsqlError(f"{p}: expected exactly one text2sql-data *.json file, found {len(candidates)}")
        p = candidates[0]
    f = require_file(p, "text2sql-data file")
    if split_kind not in ("question", "query"):
        raise JaxsqlError(f"text2sql: split_kind must be 'question' or 'query', got {split_kind!r}")
    if split not in ("train", "dev", "test", "all"):
        raise JaxsqlError(f"text2sql: unknown split {split!r}; expected train, dev, test or all")
    db = Path(db_path) if db_path else f.with_suffix(".sqlite")
    if require_databases:
        if not db.is_file():
            raise JaxsqlError(f"{f}: database not found: {db}")
    source = f.stem
    try:
        entries = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise JaxsqlError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
    bad = BadRows(f)
    out: list[Example] = []
    for i, entry in enumerate(entries):
        where = f"{f} entry {i}"
        try:
            if not isinstance(entry, dict) or not entry.get("sql") or not isinstance(entry.get("sentences"), list):
                raise MalformedRecord(f"{where}: needs a non-empty 'sql' list and 'sentences'")
            defaults = {v["name"]: str(v.get("example", "")) for v in entry.get("variables", [])}
            for j, sent in enumerate(entry["sentences"]):
                which = sent.get("question-split") if split_kind == "question" else entry.get("query-split")
                if split != "all" and which != split:
                    continue
                values = {**defaults, **{k: str(v) for k, v in (sent.get("variables") or {}).items()}}
                text = _substitute(sent["text"], values)
                sql = _DQ.sub(lambda m: "'" + _sql_literal(_substitute(m.group(1), values)) + "'", entry["sql"][0])
                sql = _substitute(sql, values).strip().rstrip(";").strip()
                out.append(Example(id=f"{source}-{i}-{j}", db_path=str(db), question=text, gold_sql=sql,
                                   difficulty=str(which or ""), source=source))
        except (MalformedRecord, KeyError, TypeError) as e:
            err = e if isinstance(e, MalformedRecord) else MalformedRecord(f"{where}: malformed ({e!r})")
            bad.add(err, skip_bad)
    bad.warn()
    return out
