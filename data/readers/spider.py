"""Spider and BIRD in their official layouts.

Spider root: ``dev.json`` (split ``dev``) or ``train_spider.json`` (split
``train``; ``train_others.json`` is appended when present), ``tables.json``,
``database/<db_id>/<db_id>.sqlite``. BIRD root: ``dev.json`` / ``train.json``
with ``question``, ``evidence``, ``SQL``, ``db_id``, ``difficulty``
(``question_id`` when present), databases in
``dev_databases/<db_id>/<db_id>.sqlite`` (``train_databases`` for train) and
column descriptions in ``<db>/database_description/<table>.csv``.

``require_databases=False`` reads questions when the databases are absent
(the Spider copy in the test data has none); ``db_path`` then still names
where the database would be.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from data.readers.common import BadRows, check_database, require_dir, require_file
from data.records import Example, MalformedRecord
from data.schema import Table, spider_tables_schema
from jaxsql.errors import JaxsqlError


def _load_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise JaxsqlError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise JaxsqlError(f"{path}: expected a JSON list of questions")
    return data


def read_spider(path: str | Path, *, split: str = "dev", skip_bad: bool = False,
                require_databases: bool = True) -> list[Example]:
    """Spider questions of `split` (``dev`` or ``train``) under the Spider root `path`."""
    root = require_dir(path, "Spider directory")
    files = {"dev": ["dev.json"], "train": ["train_spider.json", "train_others.json"]}.get(split)
    if files is None:
        raise JaxsqlError(f"spider: unknown split {split!r}; expected 'dev' or 'train'")
    out: list[Example] = []
    for n, name in enumerate(files):
        f = root / name
        if n > 0 and not f.exists():
            continue
        rows = _load_json_list(require_file(f, "Spider questions file"))
        bad = BadRows(f)
        for i, row in enumerate(rows):
            where = f"{f} item {i}"
            try:
                if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("db_id", "question", "query")):
                    raise MalformedRecord(f"{where}: needs string fields db_id, question, query")
                db = root / "database" / row["db_id"] / f"{row['db_id']}.sqlite"
                if require_databases and not db.is_file():
                    raise MalformedRecord(f"{where}: database not found: {db} (read questions only with "
                                          f"require_databases=False, CLI --no-databases)")
                out.append(Example(id=f"spider-{split}-{len(out)}", db_path=str(db), question=row["question"],
                                   gold_sql=row["query"], source="spider"))
            except MalformedRecord as e:
                bad.add(e, skip_bad)
        bad.warn()
    return out


def read_spider_schemas(tables_json: str | Path) -> dict[str, list[Table]]:
    """``db_id`` -> tables, from a Spider/BIRD ``tables.json`` (no databases needed)."""
    f = require_file(tables_json, "tables.json")
    return {entry["db_id"]: spider_tables_schema(entry) for entry in _load_json_list(f)}


def read_bird(path: str | Path, *, split: str = "dev", skip_bad: bool = False,
              require_databases: bool = True) -> list[Example]:
    """BIRD questions of `split` (``dev`` or ``train``) with evidence and difficulty."""
    root = require_dir(path, "BIRD directory")
    if split not in ("dev", "train"):
        raise JaxsqlError(f"bird: unknown split {split!r}; expected 'dev' or 'train'")
    f = require_file(root / f"{split}.json", "BIRD questions file")
    bad = BadRows(f)
    out: list[Example] = []
    for i, row in enumerate(_load_json_list(f)):
        where = f"{f} item {i}"
        try:
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("db_id", "question", "SQL")):
                raise MalformedRecord(f"{where}: needs string fields db_id, question, SQL")
            db = root / f"{split}_databases" / row["db_id"] / f"{row['db_id']}.sqlite"
            if require_databases:
                check_database(db, where)
            qid = row.get("question_id", i)
            out.append(Example(id=f"bird-{split}-{qid}", db_path=str(db), question=row["question"],
                               evidence=str(row.get("evidence") or ""), gold_sql=row["SQL"],
                               difficulty=str(row.get("difficulty") or ""), source="bird"))
        except MalformedRecord as e:
            bad.add(e, skip_bad)
    bad.warn()
    return out


def bird_column_comments(db_path: str | Path) -> dict[str, dict[str, str]]:
    """``{table: {column: description}}`` from BIRD's ``database_description/*.csv`` beside the database."""
    desc_dir = Path(db_path).parent / "database_description"
    out: dict[str, dict[str, str]] = {}
    if not desc_dir.is_dir():
        return out
    for f in sorted(desc_dir.glob("*.csv")):
        cols: dict[str, str] = {}
        # BIRD's CSVs come in several encodings; undecodable bytes must not stop a run.
        with f.open(encoding="utf-8", errors="replace", newline="") as fh:
            for row in csv.DictReader(fh):
                name = (row.get("original_column_name") or "").strip()
                text = " ".join(filter(None, ((row.get("column_description") or "").strip(),
                                              (row.get("value_description") or "").strip())))
                if name and text:
                    cols[name] = " ".join(text.split())[:200]
        out[f.stem] = cols
    return out
