"""WikiTableQuestions with the SQUALL databases (Pasupat & Liang 2015; Shi et al. 2020).

Root layout: ``<split>.tsv`` files with ``id, utterance, context,
targetValue`` (split ``test`` = ``pristine-unseen-tables.tsv``, ``train`` =
``training.tsv``; or pass a ``.tsv`` file name as the split), ``db/`` with one
SQLite database per table (``csv/203-csv/733.csv`` -> ``db/203_733.db``, one
table ``w`` with columns ``c1, c1_number, ...``) and ``json/`` with the
original headers and column types (``json/203_733.json``).

Gold answers are ``targetValue`` split on ``|``, with WikiTQ's escapes
undone (``\\p`` pipe, ``\\n`` newline, ``\\\\`` backslash). There is no gold
SQL: this is question-answer data for the weak-supervision reward.
`wikitq_column_comments` turns the JSON into column comments for
`data.schema.serialize_schema`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from data.readers.common import BadRows, check_database, require_dir, require_file
from data.records import Example, MalformedRecord
from jaxsql.errors import JaxsqlError

_SPLIT_FILES = {"test": "pristine-unseen-tables.tsv", "train": "training.tsv",
                "seen": "pristine-seen-tables.tsv"}
_CONTEXT = re.compile(r"csv/(\d+)-csv/(\d+)\.csv$")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "p": "|", "\\": "\\"}.get(m.group(1), m.group(0)), value)


def table_key(context: str) -> str:
    """``csv/203-csv/733.csv`` -> ``203_733`` (the database and JSON file stem)."""
    m = _CONTEXT.search(context.strip())
    if m is None:
        raise ValueError(f"context {context!r} is not csv/<n>-csv/<m>.csv")
    return f"{m.group(1)}_{m.group(2)}"


def read_wikitq(path: str | Path, *, split: str = "test", skip_bad: bool = False,
                require_databases: bool = True) -> list[Example]:
    """WikiTQ questions of `split` over the SQUALL databases under `path`."""
    root = require_dir(path, "WikiTQ directory")
    name = split if split.endswith(".tsv") else _SPLIT_FILES.get(split)
    if name is None:
        raise JaxsqlError(f"wikitq: unknown split {split!r}; expected one of {sorted(_SPLIT_FILES)} or a .tsv name")
    f = require_file(root / name, "WikiTQ questions file")
    bad = BadRows(f)
    out: list[Example] = []
    with f.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or header[:4] != ["id", "utterance", "context", "targetValue"]:
            raise JaxsqlError(f"{f}: header must start with id, utterance, context, targetValue")
        for lineno, row in enumerate(reader, 2):
            where = f"{f}:{lineno}"
            try:
                if len(row) < 4 or not row[0] or not row[1].strip():
                    raise MalformedRecord(f"{where}: expected id, utterance, context, targetValue")
                try:
                    key = table_key(row[2])
                except ValueError as e:
                    raise MalformedRecord(f"{where}: {e}") from None
                db = root / "db" / f"{key}.db"
                if require_databases:
                    check_database(db, where)
                answers = tuple(_unescape(a) for a in row[3].split("|"))
                out.append(Example(id=row[0], db_path=str(db), question=row[1], gold_answers=answers,
                                   source="wikitq"))
            except MalformedRecord as e:
                bad.add(e, skip_bad)
    bad.warn()
    return out


def wikitq_column_comments(db_path: str | Path) -> dict[str, dict[str, str]]:
    """``{"w": {"c1": "award (text)", "c1_number": "award (number)", ...}}`` from ``json/<key>.json``.

    The JSON beside ``db/`` lists each original header with its type and the
    SQUALL columns derived from it (``c1``, ``c1_number``, ``c1_list``...).
    Returns ``{}`` when the JSON is absent.
    """
    db = Path(db_path)
    f = db.parent.parent / "json" / f"{db.stem}.json"
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
        cols: dict[str, str] = {}
        for header, kind, variants in zip(meta["headers"], meta["types"], meta["contents"]):
            for v in variants:
                if v["col"] in ("id", "agg"):
                    continue
                suffix = v["col"].split("_", 1)[1] if "_" in v["col"] else kind
                cols[v["col"]] = f"{' '.join(str(header).split())} ({suffix})"
    except (KeyError, TypeError, ValueError) as e:
        raise JaxsqlError(f"{f}: malformed SQUALL table description ({e!r})") from None
    return {"w": cols}
