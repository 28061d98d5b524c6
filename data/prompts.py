"""Prompt formats: what the model is asked to write, and the SFT target in that shape.

Registry `PROMPT_FORMATS` (config string -> `PromptFormat`):

* ``"plain"``: the model writes one SQLite query and nothing else.
* ``"think"`` (Think2SQL, Papicchio et al. 2025): reasoning in
  ``<think>...</think>`` then the query in ``<answer>...</answer>``.
* ``"cocte"`` (Reward-SQL): the query is a chain of common table
  expressions, ``WITH step1 AS (...), step2 AS (...) SELECT ...``, each CTE
  one reasoning step that can be executed on its own; no tags.

What each format asks for is what `jaxsql.extract.extract_sql` reads back:
the last ``<answer>`` block (think), else the whole text (plain, cocte).

`render_prompt` puts the instruction in a system message and the schema and
question in a user message, rendered with the tokenizer's chat template
(``add_generation_prompt=True``) when it has one; otherwise the plain
template is::

    {instruction}

    {schema}

    Question: {question}
    Response:
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any, Callable

from data.records import Example
from jaxsql.errors import JaxsqlError


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """A format's name, the instruction the model sees, and its SFT target builder."""

    name: str
    instruction: str
    target: Callable[[Example], str]


def _gold(example: Example) -> str:
    if not example.gold_sql:
        raise JaxsqlError(f"example {example.id!r} has no gold SQL; an SFT target needs one")
    return " ".join(example.gold_sql.split())


def _plain_target(example: Example) -> str:
    return _gold(example)


def _think_target(example: Example) -> str:
    from data.schema import tables_in_sql

    sql = _gold(example)
    tables = sorted(tables_in_sql(sql))
    # A short, derivable reasoning: gold reasoning traces are not available for
    # templated data, and a tiny model should spend its tokens on the SQL.
    reasoning = f"Use table {', '.join(tables)}." if tables else "Compute the answer."
    return f"<think>{reasoning}</think><answer>{sql}</answer>"


def _same_result(db_path: str, a: str, b: str) -> bool:
    if not Path(db_path).is_file():
        return False
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            ra = conn.execute(a).fetchall()
            rb = conn.execute(b).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return ra == rb


def to_cocte(sql: str) -> str:
    """Rewrite a query as a chain of CTEs (Reward-SQL shape).

    A single-table SELECT with a WHERE clause becomes two steps: the filtered
    rows, then the projection/grouping/ordering over them::

        WITH step1 AS (SELECT * FROM t WHERE w) SELECT cols FROM step1 ...

    Anything else (joins, qualified columns, no WHERE) is one step:
    ``WITH step1 AS (<sql>) SELECT * FROM step1``.
    """
    import sqlglot
    from sqlglot import exp

    sql = " ".join(sql.split()).rstrip(";")
    wrapped = f"WITH step1 AS ({sql}) SELECT * FROM step1"
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:  # noqa: BLE001 - unparseable gold: keep the safe form
        return wrapped
    if not isinstance(tree, exp.Select) or tree.args.get("with_") or tree.args.get("joins"):
        return wrapped
    from_, where = tree.args.get("from_"), tree.args.get("where")
    if from_ is None or where is None or not isinstance(from_.this, exp.Table):
        return wrapped
    outer_cols = [c for e in tree.expressions for c in e.find_all(exp.Column)]
    if any(c.table for c in outer_cols):
        return wrapped
    inner = exp.select("*").from_(from_.this.copy()).where(where.this.copy())
    outer = tree.copy()
    outer.set("where", None)
    outer.set("from_", exp.From(this=exp.to_table("step1")))
    return f"WITH step1 AS ({inner.sql(dialect='sqlite')}) {outer.sql(dialect='sqlite')}"


def _cocte_target(example: Example) -> str:
    sql = _gold(example)
    chain = to_cocte(sql)
    if chain.startswith("WITH step1 AS (SELECT * FROM") and not _same_result(example.db_path, sql, chain):
        return f"WITH step1 AS ({sql}) SELECT * FROM step1"
    return chain


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "plain": PromptFormat(
        "plain",
        "Write one SQLite query that answers the question. Reply with the SQL only.",
        _plain_target,
    ),
    "think": PromptFormat(
        "think",
        "Think briefly inside <think></think>, then write one SQLite query that answers the question "
        "inside <answer></answer>.",
        _think_target,
    ),
    "cocte": PromptFormat(
        "cocte",
        "Write one SQLite query that answers the question as a chain of common table expressions: "
        "WITH step1 AS (...), step2 AS (...) SELECT ... where each step is one CTE. Reply with the SQL only.",
        _cocte_target,
    ),
}


def get_format(fmt: str) -> PromptFormat:
    try:
        return PROMPT_FORMATS[fmt]
    except KeyError:
        raise JaxsqlError(f"unknown prompt format {fmt!r}; expected one of {sorted(PROMPT_FORMATS)}") from None


def prompt_messages(example: Example, schema_text: str, fmt: str) -> list[dict[str, str]]:
    """System (instruction) and user (schema, evidence if not already in it, question) messages."""
    f = get_format(fmt)
    user = schema_text.strip()
    if example.evidence.strip() and example.evidence.strip() not in schema_text:
        user += "\n-- Evidence: " + " ".join(example.evidence.split())
    user += f"\n\nQuestion: {example.question.strip()}"
    return [{"role": "system", "content": f.instruction}, {"role": "user", "content": user}]


def render_prompt(example: Example, schema_text: str, fmt: str, tokenizer: Any = None) -> str:
    """The prompt text, ready to tokenize; the model's completion follows it directly."""
    messages = prompt_messages(example, schema_text, fmt)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{messages[0]['content']}\n\n{messages[1]['content']}\nResponse:\n"


def render_target(example: Example, fmt: str) -> str:
    """The gold completion in format `fmt` (no end-of-sequence token: the trainer appends it)."""
    return get_format(fmt).target(example)
