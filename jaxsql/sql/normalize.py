"""Cache keys for SQL text: equal keys mean the same query on the same database.

`normalize_sql` re-renders the query with sqlglot (SQLite dialect), which
canonicalises whitespace, keyword case and redundant syntax while keeping
identifiers and literals as written (identifier case is kept because it shows
in the result's column names). When sqlglot cannot parse the text (a syntax
error, a dialect feature it lacks, or pathological nesting), the key is the
text with whitespace collapsed *outside* quoted strings and identifiers and a
trailing semicolon removed; such a query usually fails the same way every
time, so caching it is still correct. The same fallback covers text that
sqlglot parses but cannot write back in the SQLite dialect without dropping
something (for example column names in a subquery alias, ``AS s(a)``, a
syntax error in SQLite): a lossy key could equal a valid query's key. This fallback is documented in
``docs/sql.md`` and is never a change of what is executed: the pool always
runs the original text.
"""

from __future__ import annotations

import functools
import re
from typing import Iterator

_OPENERS = "'\"`["
_SPACES = re.compile(r"\s+")


@functools.lru_cache(maxsize=16)
def _any_of(openers: str) -> re.Pattern | None:
    """A pattern finding the next of `openers` (quotes, ``[``); None for none."""
    return re.compile("[" + re.escape(openers) + "]") if openers else None


#: Longer queries skip sqlglot: its pure-Python parser would hold the GIL for long.
MAX_PARSE_CHARS = 20_000


def _closing(sql: str, start: int, opener: str, missing: set[str]) -> int:
    """Index of the character closing the quote or bracket opened at `start`, or -1.

    Quotes ``'`` and ``"`` may hold doubled quotes; when the text ends inside
    a run of them, the quote before the last pair closes (what a greedy
    regular expression would match after backtracking). `missing` remembers
    closers that do not occur after some position, hence not after any later
    one: an unclosed ``[`` repeated n times is scanned once, not n times.
    """
    close = "]" if opener == "[" else opener
    if close in missing:
        return -1
    j = sql.find(close, start + 1)
    if j < 0:
        missing.add(close)
        return -1
    if opener in "'\"":
        while j + 1 < len(sql) and sql[j + 1] == opener:
            k = sql.find(opener, j + 2)
            if k < 0:
                return j
            j = k
    return j


def split_quoted(sql: str) -> Iterator[tuple[bool, str]]:
    """The pieces of `sql` in order, as ``(quoted, text)``: quoted strings and identifiers, and the rest.

    Quoted means ``'...'`` with ``''``, ``"..."`` with ``""``, backticks or
    ``[...]``; an opener that is never closed is an ordinary character.
    Linear time in the length of `sql` (queries up to 4 MiB reach it): an
    unclosed opener is looked for once, not from every later position.
    """
    missing: set[str] = set()
    pattern = _any_of(_OPENERS)
    pos = 0
    while True:
        m = pattern.search(sql, pos) if pattern is not None else None
        if m is None:
            break
        start = m.start()
        end = _closing(sql, start, m.group(), missing)
        if end < 0:
            # its closer occurs nowhere after here: from now on the opener is ordinary text
            pattern = _any_of("".join(c for c in _OPENERS if ("]" if c == "[" else c) not in missing))
            continue
        if start > pos:
            yield False, sql[pos:start]
        yield True, sql[start:end + 1]
        pos = end + 1
    if pos < len(sql):
        yield False, sql[pos:]


def whitespace_normalize(sql: str) -> str:
    """Collapse runs of whitespace outside quotes to one space; strip; drop trailing ``;``."""
    text = "".join(part if quoted else _SPACES.sub(" ", part) for quoted, part in split_quoted(sql)).strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    return text


@functools.lru_cache(maxsize=65_536)
def normalize_sql(sql: str) -> str:
    """Canonical text of `sql` for cache keys (sqlglot, else `whitespace_normalize`)."""
    if len(sql) <= MAX_PARSE_CHARS:
        try:
            import sqlglot
            from sqlglot.errors import ErrorLevel

            statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
            if len(statements) == 1:
                # RAISE: a construct the SQLite writer cannot express (and would drop with a
                # warning) must not make this key equal to another query's
                return "g:" + statements[0].sql(dialect="sqlite", unsupported_level=ErrorLevel.RAISE)
        except Exception:  # noqa: BLE001 - any parser failure (incl. RecursionError) means "fall back"
            pass
    return "w:" + whitespace_normalize(sql)
