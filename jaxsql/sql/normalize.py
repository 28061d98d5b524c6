"""Cache keys for SQL text: equal keys mean the same query on the same database.

`normalize_sql` re-renders the query with sqlglot (SQLite dialect), which
canonicalises whitespace, keyword case and redundant syntax while keeping
identifiers and literals as written (identifier case is kept because it shows
in the result's column names). When sqlglot cannot parse the text (a syntax
error, a dialect feature it lacks, or pathological nesting), the key is the
text with whitespace collapsed *outside* quoted strings and identifiers and a
trailing semicolon removed; such a query usually fails the same way every
time, so caching it is still correct. This fallback is documented in
``docs/sql.md`` and is never a change of what is executed: the pool always
runs the original text.
"""

from __future__ import annotations

import functools
import re

_QUOTED_OR_SPACE = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]|\s+)""")
#: Longer queries skip sqlglot: its pure-Python parser would hold the GIL for long.
MAX_PARSE_CHARS = 20_000


def whitespace_normalize(sql: str) -> str:
    """Collapse runs of whitespace outside quotes to one space; strip; drop trailing ``;``."""
    parts = _QUOTED_OR_SPACE.split(sql)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 1 and part[:1].isspace():
            out.append(" ")
        else:
            out.append(part)
    text = "".join(out).strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    return text


@functools.lru_cache(maxsize=65_536)
def normalize_sql(sql: str) -> str:
    """Canonical text of `sql` for cache keys (sqlglot, else `whitespace_normalize`)."""
    if len(sql) <= MAX_PARSE_CHARS:
        try:
            import sqlglot

            statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
            if len(statements) == 1:
                return "g:" + statements[0].sql(dialect="sqlite")
        except Exception:  # noqa: BLE001 - any parser failure (incl. RecursionError) means "fall back"
            pass
    return "w:" + whitespace_normalize(sql)
