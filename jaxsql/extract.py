"""Find the SQL in a model completion, and check the completion's shape.

Prompt formats (``data/``) and rewards both import these functions, so what a
prompt asks for and what a reward checks cannot drift apart.

Completions are hostile input: every function here runs in linear time (no
regular expression that can backtrack over the completion). Two families:

- ours: `extract_sql`, `format_ok` (strict: each tag exactly once, a non-empty
  answer), `cocte_format_ok`;
- Think2SQL's released rules, reproduced exactly: `extract_sql_think2sql`
  (NL2SQLEvaluator 1.3.4 ``extract_sql_or_same``) and `format_ok_think2sql`
  (Think2SQL ``format_reward``).
"""

from __future__ import annotations

import re

#: Longest SQL text `cocte_format_ok` hands to sqlglot (longer text is not the shape).
COCTE_MAX_CHARS = 20_000

_FENCE_OPEN = re.compile(r"```[ \t]*(?i:sqlite|sql)?[ \t]*\n?")
_FENCE = re.compile(r"```")


def findall_delimited(text: str, open_re: re.Pattern[str], close_re: re.Pattern[str]) -> list[tuple[int, int]]:
    """``(start, end)`` of the contents of ``re.findall(open + "(.*?)" + close, text, DOTALL)``.

    Same matches as the regular expression (leftmost opening, then the first
    closing after it, scanning on after each match), in linear time: the
    opening pattern must always match greedily once it starts (literals,
    optional parts).
    """
    out = []
    pos = 0
    while True:
        o = open_re.search(text, pos)
        if o is None:
            return out
        c = close_re.search(text, o.end())
        if c is None:
            return out  # no closing after this opening, so none after any later one either
        out.append((o.end(), c.start()))
        pos = c.end()


def _literal(tag: str, ignore_case: bool = False) -> re.Pattern[str]:
    return re.compile(re.escape(tag), re.IGNORECASE if ignore_case else 0)


def _last_block(text: str, open_re: re.Pattern[str], close_re: re.Pattern[str]) -> str | None:
    spans = findall_delimited(text, open_re, close_re)
    return text[spans[-1][0]:spans[-1][1]] if spans else None


def _strip_fence(text: str) -> str:
    block = _last_block(text, _FENCE_OPEN, _FENCE)
    return text if block is None else block


def extract_sql(completion: str, answer_tag: str = "answer") -> str:
    """The SQL of a completion, stripped of surrounding whitespace.

    Rule: the last complete ``<answer>...</answer>`` block (a fenced code block
    inside it is unwrapped); else, when the completion was cut off after an
    opening ``<answer>``, the text after the last opening tag; else the last
    fenced code block (```sql, ```sqlite or plain ```); else the whole text.
    """
    opening = f"<{answer_tag}>"
    block = _last_block(completion, _literal(opening), _literal(f"</{answer_tag}>"))
    if block is not None:
        return _strip_fence(block).strip()
    if opening in completion:
        return _strip_fence(completion.rsplit(opening, 1)[1]).strip()
    return _strip_fence(completion).strip()


def format_ok(completion: str, think_tag: str = "think", answer_tag: str = "answer") -> bool:
    """True when the completion is exactly ``<think>...</think><answer>...</answer>``.

    Whitespace may surround and separate the two blocks; each tag appears
    exactly once and the answer is not empty (our strict check).
    """
    tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]
    if any(completion.count(t) != 1 for t in tags):
        return False
    s = completion.strip()
    t_open, t_close, a_open, a_close = (s.find(t) for t in tags)
    if t_open != 0 or not s.endswith(tags[3]) or a_close != len(s) - len(tags[3]):
        return False
    if not (t_open + len(tags[0]) <= t_close and t_close + len(tags[1]) <= a_open
            and a_open + len(tags[2]) <= a_close):
        return False
    if s[t_close + len(tags[1]):a_open].strip():
        return False
    return bool(s[a_open + len(tags[2]):a_close].strip())


def extract_sql_think2sql(completion: str) -> str:
    """Think2SQL's SQL extraction as released (nl2sqlevaluator 1.3.4 ``extract_sql_or_same``).

    Case-insensitive, in this order, each step on the previous step's text:
    the last ``<answer>(.*?)</answer>`` (stripped; a completion cut off inside
    its answer keeps the WHOLE text); the last ````` ```sql(.*?)``` ````` (so a
    ```` ```sqlite ```` fence leaves ``ite`` in front of the query); the last
    ````` ```(.*?)``` `````; then strip whitespace, backticks, whitespace.
    """
    text = completion
    for open_re, close_re in ((_T2S_ANSWER_OPEN, _T2S_ANSWER_CLOSE), (_T2S_SQL_FENCE, _FENCE), (_FENCE, _FENCE)):
        block = _last_block(text, open_re, close_re)
        if block is not None:
            text = block.strip()
    return text.strip().strip("`").strip()


_T2S_ANSWER_OPEN = _literal("<answer>", ignore_case=True)
_T2S_ANSWER_CLOSE = _literal("</answer>", ignore_case=True)
_T2S_SQL_FENCE = _literal("```sql", ignore_case=True)


def format_ok_think2sql(completion: str, think_tag: str = "think", answer_tag: str = "answer") -> bool:
    """Think2SQL's ``format_reward`` as released, without its backtracking regular expression.

    The released check is ``re.fullmatch(r"\\s*<think>\\s*([\\s\\S]*?)\\s*</think>\\s*<answer>\\s*
    ([\\s\\S]*?)\\s*</answer>\\s*\\Z", completion.strip(), IGNORECASE)``: after stripping,
    the text starts with ``<think>``, ends with ``</answer>``, and somewhere
    between them a ``</think>`` is followed (after optional whitespace) by
    ``<answer>``. Tags may repeat inside the blocks and the answer may be empty.
    """
    s = completion.strip()
    t_open, t_close = f"<{think_tag}>", f"</{think_tag}>"
    a_open, a_close = f"<{answer_tag}>", f"</{answer_tag}>"
    if _literal(t_open, True).match(s) is None:
        return False
    end = len(s) - len(a_close)
    if end < len(t_open) or _literal(a_close, True).match(s, end) is None:
        return False
    opener = _literal(a_open, True)
    for m in _literal(t_close, True).finditer(s, len(t_open)):
        j = m.end()
        while j < len(s) and s[j].isspace():
            j += 1
        if j + len(a_open) <= end and opener.match(s, j) is not None:
            return True
    return False


def cocte_format_ok(sql: str) -> bool:
    """True when `sql` is one query shaped ``WITH c1 AS (...), ..., cN AS (...) SELECT ...``.

    The Reward-SQL chain-of-CTE (CoCTE) shape: a single statement whose top
    level is a SELECT (or set operation) with at least one CTE, each CTE body a
    query. Parsed with sqlglot (SQLite dialect); unparseable text, and text
    longer than `COCTE_MAX_CHARS`, is False.
    """
    if len(sql) > COCTE_MAX_CHARS:
        return False
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
