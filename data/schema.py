"""Schema serialisation for prompts.

Two styles:

* ``"ddl"``: one ``CREATE TABLE`` per table with column types, primary and
  foreign keys, and a comment per column holding its description (when the
  source has one) and a few distinct sample values::

      CREATE TABLE product (
        id INTEGER PRIMARY KEY,  -- e.g. 1, 2, 3
        name TEXT,  -- e.g. 'Kalo', 'Mira'
        FOREIGN KEY (...) REFERENCES ...
      );

* ``"compact"``: one line per table, ``product(id int, name text, ...)``,
  for tiny models with short contexts (sample values, when asked for, follow
  as ``-- name: 'Kalo', 'Mira'`` lines).

BIRD evidence, when given, is appended as ``-- Evidence: ...``.

Truncation to ``max_tokens`` (counted by ``count_tokens``, default: a regex
word/punctuation count) proceeds in steps until the text fits: drop sample
values of tables outside ``keep_tables``; drop those tables (last first);
drop the remaining sample values and comments. ``keep_tables`` is typically
`tables_in_sql(gold_sql)`. If even the last step does not fit, the smallest
text is returned (the caller decides whether to skip the example).
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from jaxsql.errors import JaxsqlError

STYLES = ("ddl", "compact")


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str = ""
    primary_key: bool = False
    comment: str = ""
    samples: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ForeignKey:
    column: str
    ref_table: str
    ref_column: str


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    foreign_keys: tuple[ForeignKey, ...] = ()


_SQLITE_KEYWORDS = frozenset("""
ABORT ACTION ADD AFTER ALL ALTER ALWAYS ANALYZE AND AS ASC ATTACH AUTOINCREMENT BEFORE BEGIN BETWEEN BY
CASCADE CASE CAST CHECK COLLATE COLUMN COMMIT CONFLICT CONSTRAINT CREATE CROSS CURRENT CURRENT_DATE
CURRENT_TIME CURRENT_TIMESTAMP DATABASE DEFAULT DEFERRABLE DEFERRED DELETE DESC DETACH DISTINCT DO DROP
EACH ELSE END ESCAPE EXCEPT EXCLUDE EXCLUSIVE EXISTS EXPLAIN FAIL FILTER FIRST FOLLOWING FOR FOREIGN FROM
FULL GENERATED GLOB GROUP GROUPS HAVING IF IGNORE IMMEDIATE IN INDEX INDEXED INITIALLY INNER INSERT INSTEAD
INTERSECT INTO IS ISNULL JOIN KEY LAST LEFT LIKE LIMIT MATCH MATERIALIZED NATURAL NO NOT NOTHING NOTNULL
NULL NULLS OF OFFSET ON OR ORDER OTHERS OUTER OVER PARTITION PLAN PRAGMA PRECEDING PRIMARY QUERY RAISE
RANGE RECURSIVE REFERENCES REGEXP REINDEX RELEASE RENAME REPLACE RESTRICT RETURNING RIGHT ROLLBACK ROW ROWS
SAVEPOINT SELECT SET TABLE TEMP TEMPORARY THEN TIES TO TRANSACTION TRIGGER UNBOUNDED UNION UNIQUE UPDATE
USING VACUUM VALUES VIEW VIRTUAL WHEN WHERE WINDOW WITH WITHOUT""".split())


def _quote_ident(name: str) -> str:
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name.upper() not in _SQLITE_KEYWORDS
    return name if plain else '"' + name.replace('"', '""') + '"'


def _render_value(v: object, max_chars: int = 30) -> str:
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, bytes):
        return "<blob>"
    s = str(v).replace("\n", " ")
    if len(s) > max_chars:
        s = s[: max_chars - 3] + "..."
    return "'" + s.replace("'", "''") + "'"


def read_sqlite_schema(db_path: str | Path, *, sample_values: int = 3) -> list[Table]:
    """Tables, columns, keys and up to `sample_values` distinct non-null values per column."""
    path = Path(db_path)
    if not path.is_file():
        raise JaxsqlError(f"database not found: {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise JaxsqlError(f"cannot open database {path}: {e}") from None
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
        tables = []
        for t in names:
            qt = _quote_ident(t)
            cols = []
            for _, cname, ctype, _, _, pk in conn.execute(f"PRAGMA table_info({qt})"):
                samples: tuple[str, ...] = ()
                if sample_values > 0:
                    qc = _quote_ident(cname)
                    try:
                        rows = conn.execute(f"SELECT DISTINCT {qc} FROM {qt} WHERE {qc} IS NOT NULL "
                                            f"LIMIT {int(sample_values)}").fetchall()
                        samples = tuple(_render_value(r[0]) for r in rows)
                    except sqlite3.Error:
                        samples = ()
                cols.append(Column(cname, ctype or "", bool(pk), "", samples))
            fks = tuple(ForeignKey(r[3], r[2], r[4] or "") for r in conn.execute(f"PRAGMA foreign_key_list({qt})"))
            tables.append(Table(t, tuple(cols), fks))
        return tables
    except sqlite3.DatabaseError as e:
        raise JaxsqlError(f"cannot read schema of {path}: {e}") from None
    finally:
        conn.close()


def spider_tables_schema(entry: Mapping) -> list[Table]:
    """Tables from one Spider/BIRD ``tables.json`` entry (no database needed, no sample values)."""
    try:
        table_names = entry["table_names_original"]
        col_names = entry["column_names_original"]
        col_types = entry["column_types"]
        pks = set()
        for pk in entry.get("primary_keys", []):
            pks.update(pk if isinstance(pk, list) else [pk])
        cols: list[list[Column]] = [[] for _ in table_names]
        for i, ((ti, cname), ctype) in enumerate(zip(col_names, col_types)):
            if ti >= 0:
                cols[ti].append(Column(cname, ctype.upper(), i in pks))
        fks: list[list[ForeignKey]] = [[] for _ in table_names]
        for a, b in entry.get("foreign_keys", []):
            ta, ca = col_names[a]
            tb, cb = col_names[b]
            fks[ta].append(ForeignKey(ca, table_names[tb], cb))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise JaxsqlError(f"tables.json entry {entry.get('db_id', '?')!r} is malformed: {e!r}") from None
    # SQLite's internal tables (sqlite_sequence) are not part of the user's schema.
    return [Table(n, tuple(c), tuple(f)) for n, c, f in zip(table_names, cols, fks)
            if not n.lower().startswith("sqlite_")]


def tables_in_sql(sql: str) -> set[str]:
    """Lower-cased names of the base tables a query reads (CTE names excluded); empty if it does not parse."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:  # noqa: BLE001 - any parse failure means "unknown"
        return set()
    if tree is None:
        return set()
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    return {t.name.lower() for t in tree.find_all(exp.Table) if t.name and t.name.lower() not in ctes}


def default_count_tokens(text: str) -> int:
    """A tokenizer-free estimate: words, numbers and single punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def _with_comments(tables: Sequence[Table], comments: Mapping[str, Mapping[str, str]] | None) -> list[Table]:
    if not comments:
        return list(tables)
    lower = {t.lower(): {c.lower(): v for c, v in cols.items()} for t, cols in comments.items()}
    out = []
    for t in tables:
        tc = lower.get(t.name.lower(), {})
        out.append(dataclasses.replace(t, columns=tuple(
            dataclasses.replace(c, comment=tc.get(c.name.lower(), c.comment)) for c in t.columns)))
    return out


def _ddl_table(t: Table, samples: bool, comments: bool) -> str:
    entries: list[tuple[str, str]] = []  # (definition, comment)
    for c in t.columns:
        parts = [_quote_ident(c.name)] + ([c.type.upper()] if c.type else []) + (["PRIMARY KEY"] if c.primary_key else [])
        note = ([c.comment] if comments and c.comment else []) + (
            ["e.g. " + ", ".join(c.samples)] if samples and c.samples else [])
        entries.append((" ".join(parts), "; ".join(note)))
    for fk in t.foreign_keys:
        ref = _quote_ident(fk.ref_table) + (f"({_quote_ident(fk.ref_column)})" if fk.ref_column else "")
        entries.append((f"FOREIGN KEY ({_quote_ident(fk.column)}) REFERENCES {ref}", ""))
    lines = [f"  {d}{',' if i < len(entries) - 1 else ''}" + (f"  -- {n}" if n else "")
             for i, (d, n) in enumerate(entries)]
    return f"CREATE TABLE {_quote_ident(t.name)} (\n" + "\n".join(lines) + "\n);"


_SHORT_TYPES = {"INTEGER": "int", "TEXT": "text", "REAL": "real", "NUMBER": "num"}


def _compact_table(t: Table, samples: bool, comments: bool) -> str:
    cols = ", ".join(f"{c.name} {_SHORT_TYPES.get(c.type.upper(), c.type.lower())}".strip() for c in t.columns)
    lines = [f"{t.name}({cols})"]
    for fk in t.foreign_keys:
        lines.append(f"-- {t.name}.{fk.column} -> {fk.ref_table}.{fk.ref_column}".rstrip("."))
    for c in t.columns:
        note = []
        if comments and c.comment:
            note.append(c.comment)
        if samples and c.samples:
            note.append(", ".join(c.samples))
        if note:
            lines.append(f"-- {t.name}.{c.name}: " + "; ".join(note))
    return "\n".join(lines)


def _render(tables: Sequence[Table], style: str, samples_for: set[str], comments: bool, evidence: str) -> str:
    fn = _ddl_table if style == "ddl" else _compact_table
    parts = [fn(t, t.name.lower() in samples_for, comments) for t in tables]
    if evidence.strip():
        parts.append("-- Evidence: " + " ".join(evidence.split()))
    return ("\n\n" if style == "ddl" else "\n").join(parts)


def serialize_schema(
    db: str | Path | Sequence[Table],
    *,
    style: str = "ddl",
    sample_values: int = 3,
    column_comments: Mapping[str, Mapping[str, str]] | None = None,
    evidence: str = "",
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    keep_tables: Iterable[str] | None = None,
) -> str:
    """Serialise a database schema for a prompt (see the module docstring for the format).

    Args:
      db: a SQLite path, or tables from `read_sqlite_schema` / `spider_tables_schema`.
      style: ``"ddl"`` or ``"compact"``.
      sample_values: distinct values shown per column (0: none).
      column_comments: ``{table: {column: description}}`` (e.g. WikiTQ original headers).
      evidence: BIRD external knowledge, appended as a comment.
      max_tokens: token budget; None means no truncation.
      count_tokens: token counter for the budget (default `default_count_tokens`).
      keep_tables: tables never dropped by truncation (e.g. `tables_in_sql(gold_sql)`).
    """
    if style not in STYLES:
        raise JaxsqlError(f"unknown schema style {style!r}; expected one of {STYLES}")
    if isinstance(db, (str, Path)):
        tables = read_sqlite_schema(db, sample_values=sample_values)
    else:
        tables = [dataclasses.replace(t, columns=tuple(dataclasses.replace(c, samples=c.samples[:sample_values])
                                                       for c in t.columns)) for t in db]
    tables = _with_comments(tables, column_comments)
    all_names = {t.name.lower() for t in tables}
    text = _render(tables, style, all_names, True, evidence)
    if max_tokens is None:
        return text
    count = count_tokens or default_count_tokens
    if count(text) <= max_tokens:
        return text
    keep = {k.lower() for k in (keep_tables or ())}
    text = _render(tables, style, keep, True, evidence)
    if count(text) <= max_tokens:
        return text
    kept = list(tables)
    for t in reversed(tables):
        if t.name.lower() in keep:
            continue
        kept.remove(t)
        text = _render(kept, style, keep, True, evidence)
        if count(text) <= max_tokens:
            return text
    return _render(kept, style, set(), False, evidence)
