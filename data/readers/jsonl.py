"""The generic JSONL format for users' own data.

One JSON object per line, exactly the fields of `data.records.Example`
(``Example.to_dict()``): ``id``, ``db_path``, ``question`` required;
``evidence``, ``gold_sql``, ``gold_answers`` (list of strings), ``difficulty``,
``source`` optional; at least one of ``gold_sql`` / ``gold_answers``. A
relative ``db_path`` is resolved against the JSONL file's directory. Blank
lines are ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

from jaxsql.errors import JaxsqlError

from data.readers.common import BadRows, check_database, require_file
from data.records import Example, MalformedRecord


def read_jsonl(path: str | Path, *, split: str = "", skip_bad: bool = False,
               require_databases: bool = True) -> list[Example]:
    """Read a JSONL file of `Example` records (`split` is ignored: one file is one split).

    The file may be in a bucket (``gs://``, read through `jaxsql.paths`); its databases may not
    (SQLite stays on local disk), so its ``db_path`` values must then be absolute local paths.
    """
    from jaxsql.paths import as_path, is_remote, require_local

    remote = is_remote(path)
    if remote:
        p = as_path(path)
        if not p.is_file():
            raise JaxsqlError(f"file not found: {path}")
        lines = p.read_text().splitlines()
    path = Path(str(path)) if remote else require_file(path)
    base = path.parent
    bad = BadRows(path)
    out: list[Example] = []
    with (contextlib.nullcontext(lines) if remote else path.open(encoding="utf-8")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise MalformedRecord(f"{where}: expected a JSON object")
                ex = Example.from_dict(d, where=where)
                db = require_local(ex.db_path, f"{where}: db_path")
                if not db.is_absolute() and remote:
                    raise MalformedRecord(f"{where}: a relative db_path ({ex.db_path}) in a JSONL file in a bucket "
                                          f"would name a database in the bucket; SQLite databases stay on local "
                                          f"disk (tpu_scripts/stage_data.sh): write absolute local paths")
                if not db.is_absolute():
                    db = (base / db).resolve()
                if require_databases:
                    check_database(db, where)
                out.append(dataclasses.replace(ex, db_path=str(db)))
            except json.JSONDecodeError as e:
                bad.add(MalformedRecord(f"{where}: invalid JSON ({e.msg})"), skip_bad)
            except MalformedRecord as e:
                bad.add(e, skip_bad)
    bad.warn()
    return out
