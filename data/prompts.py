"""Prompt formats: what the model is asked to write, and the SFT target in that shape.

Registry `PROMPT_FORMATS` (config string -> `PromptFormat`):

* ``"plain"``: the model writes one SQLite query and nothing else.
* ``"think"`` (Think2SQL, Papicchio et al. 2025): reasoning in
  ``<think>...</think>`` then the query in ``<answer>...</answer>``.
* ``"cocte"`` (Reward-SQL): the query is a chain of common table
  expressions, ``WITH step1 AS (...), step2 AS (...) SELECT ...``, each CTE
  one reasoning step that can be executed on its own; no tags. The SFT
  target puts one step per blank-line block, the layout `jaxsql.cocte`
  splits and the released Reward-SQL policy writes.
* ``"tool"`` (multi-turn SQL tool use, `jaxsql.tools`): the model may run
  queries ``<sql>...</sql>`` and read their results in
  ``<observation>...</observation>`` before it answers
  ``<solution>SQL</solution>``. Its SFT target is a trace
  (`data.multiturn`): segments of model text and observations, the latter
  masked out of the loss (`PromptFormat.segments`).

What each format asks for is what `jaxsql.extract.extract_sql` reads back:
the last ``<answer>`` block (think), else the whole text (plain, cocte);
``extract_sql(text, answer_tag="solution")`` for ``tool``.

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
    """A format's name, the instruction the model sees, and its SFT target builder.

    `segments`, for multi-turn formats, gives the target as ``(text,
    is_observation)`` segments (`target` is then their concatenation); SFT
    masks the observation segments out of the loss.
    """

    name: str
    instruction: str
    target: Callable[[Example], str]
    segments: Callable[[Example], list[tuple[str, bool]]] | None = None


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
    """Rewrite a query as a chain of CTEs (Reward-SQL shape), on one line, unchecked.

    Subqueries, single-table filters and joins are lifted into steps by
    `data.cocte.lift_to_chain`; a query with nothing to lift (or that sqlglot
    cannot parse) is one step: ``WITH step1 AS (<sql>) SELECT * FROM step1``.
    """
    from data.cocte import lift_to_chain
    from jaxsql.sql.normalize import whitespace_normalize

    sql = whitespace_normalize(sql)
    try:
        return whitespace_normalize(lift_to_chain(sql)[0])
    except ValueError:
        return f"WITH step1 AS ({sql}) SELECT * FROM step1"


def _cocte_target(example: Example) -> str:
    """Gold SQL that already is a chain keeps its steps (the output of ``jaxsql data cocte``);
    other gold SQL is converted (`data.cocte.lift_to_chain`) and kept when it returns the
    same rows in the same order on the example's database, else wrapped as one step.
    Steps are laid out one per blank-line block, as the policy writes them."""
    from data.cocte import chain_target, lift_to_chain
    from jaxsql.cocte import format_chain

    sql = _gold(example)
    chain = chain_target(example.gold_sql or "")
    if chain is not None:
        return chain
    single = format_chain([f"step1 AS ({sql})"], "SELECT * FROM step1")
    try:
        chain, kinds = lift_to_chain(sql)
    except ValueError:
        return single
    if kinds == ("whole",) or not _same_result(example.db_path, sql, chain):
        return single
    return chain


def _tool_segments(example: Example) -> list[tuple[str, bool]]:
    from data.multiturn import trace_segments

    _gold(example)
    return trace_segments(example)


def _tool_target(example: Example) -> str:
    return "".join(text for text, _ in _tool_segments(example))


def _tool_instruction() -> str:
    from jaxsql.tools import ToolConfig

    cfg = ToolConfig()
    return (
        "Write one SQLite query that answers the question. Before answering you may run read-only queries "
        f"on the database: write one inside <{cfg.call_tag}></{cfg.call_tag}> and stop; its result comes back "
        "inside <observation></observation> (the column names, then at most "
        f"{cfg.max_rows} rows, one per line, cells separated by ' | ', long cells cut), or an error. "
        f"You may run at most {cfg.max_turns} queries. "
        f"Give the final query inside <{cfg.answer_tag}></{cfg.answer_tag}>.")


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
    "tool": PromptFormat("tool", _tool_instruction(), _tool_target, _tool_segments),
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
