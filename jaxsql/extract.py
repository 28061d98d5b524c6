"""Find the SQL in a model completion, and check the completion's shape.

Prompt formats (``data/``) and rewards both import these functions, so what a
prompt asks for and what a reward checks cannot drift apart.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[ \t]*(?i:sqlite|sql)?[ \t]*\n?(.*?)```", re.DOTALL)


def _tag_blocks(text: str, tag: str) -> list[str]:
    return re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)


def _strip_fence(text: str) -> str:
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def extract_sql(completion: str, answer_tag: str = "answer") -> str:
    """The SQL of a completion, stripped of surrounding whitespace.

    Rule: the last complete ``<answer>...</answer>`` block (a fenced code block
    inside it is unwrapped); else, when the completion was cut off after an
    opening ``<answer>``, the text after the last opening tag; else the last
    fenced code block (```sql, ```sqlite or plain ```); else the whole text.
    """
    blocks = _tag_blocks(completion, answer_tag)
    if blocks:
        return _strip_fence(blocks[-1]).strip()
    opening = f"<{answer_tag}>"
    if opening in completion:
        return _strip_fence(completion.rsplit(opening, 1)[1]).strip()
    return _strip_fence(completion).strip()


def format_ok(completion: str, think_tag: str = "think", answer_tag: str = "answer") -> bool:
    """True when the completion is exactly ``<think>...</think><answer>...</answer>``.

    Whitespace may surround and separate the two blocks; each tag appears
    exactly once and the answer is not empty (the Think2SQL format reward).
    """
    t, a = re.escape(think_tag), re.escape(answer_tag)
    m = re.fullmatch(rf"\s*<{t}>(.*?)</{t}>\s*<{a}>(.*?)</{a}>\s*", completion, flags=re.DOTALL)
    if m is None:
        return False
    for tag in (think_tag, answer_tag):
        if completion.count(f"<{tag}>") != 1 or completion.count(f"</{tag}>") != 1:
            return False
    return bool(m.group(2).strip())


def cocte_format_ok(sql: str) -> bool:
    """True when `sql` is one query shaped ``WITH c1 AS (...), ..., cN AS (...) SELECT ...``.

    The Reward-SQL chain-of-CTE (CoCTE) shape: a single statement whose top
    level is a SELECT (or set operation) with at least one CTE, each CTE body a
    query. Parsed with sqlglot (SQLite dialect); unparseable text is False.
    """
    try:
        import sqlglot
        from sqlglot import exp

        statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
    except Exception:  # noqa: BLE001 - any parser failure means "not the shape"
        return False
    if len(statements) != 1:
        return False
    root = statements[0]
    if not isinstance(root, exp.Query):
        return False
    with_ = root.args.get("with_") or root.args.get("with")
    if with_ is None or not with_.expressions:
        return False
    return all(isinstance(cte.this, exp.Query) for cte in with_.expressions)
