"""Dataset readers: one registry from source name to reader, all producing `data.records.Example`.

Every reader is ``reader(path, *, split, skip_bad=False, **options) -> list[Example]``.
Bad input (missing file or database, malformed row) raises one `JaxsqlError`
naming the file and line/row; ``skip_bad=True`` skips malformed rows instead
and warns once with their count. Readers never write into the source
directory; TempTabQA-C writes its built databases under ``db_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from data.readers.geoquery import read_text2sql
from data.readers.jsonl import read_jsonl
from data.readers.spider import read_bird, read_spider
from data.readers.temptabqa import read_temptabqa
from data.readers.wikitq import read_wikitq
from data.records import Example
from jaxsql.errors import JaxsqlError

Reader = Callable[..., list[Example]]

READERS: dict[str, Reader] = {
    "spider": read_spider,
    "bird": read_bird,
    "geoquery": read_text2sql,
    "text2sql": read_text2sql,
    "wikitq": read_wikitq,
    "temptabqa_c": read_temptabqa,
    "jsonl": read_jsonl,
}

#: The split a reader reads when none is given.
DEFAULT_SPLITS: dict[str, str] = {"spider": "dev", "bird": "dev", "geoquery": "all", "text2sql": "all",
                                  "wikitq": "test", "temptabqa_c": "dev", "jsonl": ""}


def get_reader(source: str) -> Reader:
    try:
        return READERS[source]
    except KeyError:
        raise JaxsqlError(f"unknown data source {source!r}; expected one of {sorted(READERS)}") from None


def read_examples(source: str, path: str | Path, *, split: str | None = None, skip_bad: bool = False,
                  **options: Any) -> list[Example]:
    """Read `source` data at `path` (see each reader's docstring for the layout and options)."""
    reader = get_reader(source)
    if source != "jsonl":  # every other layout keeps its SQLite databases inside `path`
        from jaxsql.paths import require_local

        require_local(path, f"DataSection.path ({source} data)")
    return reader(path, split=DEFAULT_SPLITS[source] if split is None else split, skip_bad=skip_bad, **options)
