"""Chain-of-CTE (CoCTE) completions step by step: split, execute every prefix, render for the PRM.

Reward-SQL (Zhang et al. 2025) has the policy write its query as a chain of
common table expressions, one reasoning step per CTE, steps separated by a
blank line, ending in a final SELECT::

    WITH step1 AS (SELECT * FROM city WHERE state = 'texas'),

    step2 AS (SELECT MAX(population) AS p FROM step1)

    SELECT name FROM step1 WHERE population = (SELECT p FROM step2)

Each step can be executed on its own: step k runs as
``WITH <steps 1..k> SELECT * FROM <name of step k> LIMIT 50`` (the final
step runs as the whole query, exactly the text the outcome reward runs, so
the pool's cache serves both). The process reward model (PRM) reads the
steps each followed by its result and a step tag, in the released code's
layout (`render_trajectory`)::

    step1<result>{('a', 1): 2, ...}</result> и step2<result>...</result> и ...

Splitting (`split_steps`) walks sqlglot's tokens (SQLite dialect), which
gives exact character spans: step k's text runs from the end of step k-1 to
the end of its own CTE (its trailing comma included); the final step is
whatever follows the last CTE. When sqlglot cannot tokenize the text (an
unterminated string, say) or the text after ``WITH`` does not have the shape
``name [(cols)] AS [NOT] [MATERIALIZED] (...)``, the released code's rule
takes over: steps are the blank-line separated chunks.

Broken chains are values, never exceptions: an unterminated CTE is a step
that cannot run (problem ``unterminated``), a step that names a later step
fails in SQLite (``no such table``), a chain that ends after its CTEs has
no final step (problem ``final_missing``), a query that is not a chain is
one final step (problem ``not_cocte``). Everything is bounded: text longer
than `MAX_CHARS` is not split (problem ``too_long``, no steps), at most
`MAX_STEPS` steps are kept (problem ``too_many_steps``), each query runs in
the sandbox under the pool's deadline, and each rendered result is cut to
`MAX_RESULT_CHARS` characters.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

from jaxsql.extract import extract_sql
from jaxsql.sql.result import ExecResult

#: The released PRM's step tag (Math-Shepherd style): the score is read where it ends.
STEP_TAG = " и"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
#: Rows shown per intermediate step (the released executor's ``LIMIT 50``).
PREFIX_LIMIT = 50
#: Longest SQL text that is split at all; longer text has no steps.
MAX_CHARS = 16_000
#: Most steps kept per chain; prefix queries grow with the step count.
MAX_STEPS = 32
#: Characters of a rendered result (the released executor's 500).
MAX_RESULT_CHARS = 500

STEP_KINDS = ("cte", "final")
PROBLEMS = ("empty", "too_long", "not_cocte", "unterminated", "final_missing", "too_many_steps", "no_cte_name")

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_CTE_HEAD = re.compile(
    r"^\s*(?:WITH\s+(?:RECURSIVE\s+)?)?(\"[^\"]+\"|`[^`]+`|\[[^\]]+\]|(?!(?:WITH|AS|SELECT)\b)\w+)\s*"
    r"(?:\([^()]*\)\s*)?AS\s+"
    r"(?:NOT\s+)?(?:MATERIALIZED\s+)?\(", re.IGNORECASE)
_WITH_HEAD = re.compile(r"^\s*WITH\s+(RECURSIVE\s+)?", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a chain.

    Attributes:
      text: the step as written, stripped (``"WITH a AS (...),"``, ``"b AS (...)"``, ``"SELECT ..."``).
      start, end: its span in the split SQL text (end exclusive), after stripping.
      kind: ``"cte"`` or ``"final"``.
      name: the CTE's name as written (quotes kept), None for the final step.
      query: the SQL that shows this step's result, None when it cannot run.
      problem: why it cannot run (one of `PROBLEMS`), else None.
    """

    text: str
    start: int
    end: int
    kind: str
    name: str | None = None
    query: str | None = None
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class Chain:
    """A SQL text split into steps.

    Attributes:
      sql: the text that was split.
      steps: the steps in order (possibly none).
      method: ``"sqlglot"``, ``"blank_line"`` (fallback), ``"single"`` (not a chain: one
        final step) or ``"none"`` (no steps: empty or too long).
      problems: what is wrong with the chain, from `PROBLEMS` (empty when well formed).
    """

    sql: str
    steps: tuple[Step, ...]
    method: str
    problems: tuple[str, ...] = ()

    @property
    def has_final(self) -> bool:
        return bool(self.steps) and self.steps[-1].kind == "final"

    @property
    def is_cocte(self) -> bool:
        """Well formed: at least one CTE, every step runnable, a final SELECT, nothing cut."""
        return (not self.problems and self.has_final and len(self.steps) >= 2
                and all(s.query is not None for s in self.steps))


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A completion's chain with every step's execution result.

    Attributes:
      completion: the model's text.
      offset: where the split SQL starts in `completion` (step spans are relative to it).
      chain: the split SQL.
      results: one `ExecResult` per step.
    """

    completion: str
    offset: int
    chain: Chain
    results: tuple[ExecResult, ...]

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.chain.steps

    @property
    def executable(self) -> bool:
        """Every step runs (what best-of-N filters on) and there is a final step."""
        return self.chain.has_final and all(r.ok for r in self.results)

    def step_spans(self) -> list[tuple[int, int]]:
        """Each step's (start, end) character span in `completion`."""
        return [(self.offset + s.start, self.offset + s.end) for s in self.steps]


# --- splitting -----------------------------------------------------------------------


def _tokens(sql: str):
    import sqlglot

    try:
        return sqlglot.Dialect.get_or_raise("sqlite").tokenize(sql)
    except Exception:  # noqa: BLE001 - TokenError, RecursionError: "cannot tokenize"
        return None


def _matching_parens(tokens) -> list[int]:
    """For each token index, the index of its matching parenthesis (-1 when none). Linear."""
    from sqlglot.tokens import TokenType

    match = [-1] * len(tokens)
    stack: list[int] = []
    for i, t in enumerate(tokens):
        if t.token_type == TokenType.L_PAREN:
            stack.append(i)
        elif t.token_type == TokenType.R_PAREN and stack:
            j = stack.pop()
            match[i], match[j] = j, i
    return match


def _stripped(sql: str, start: int, end: int) -> tuple[int, int]:
    while start < end and sql[start].isspace():
        start += 1
    while end > start and sql[end - 1].isspace():
        end -= 1
    return start, end


def _prefix_query(head: str, ctes: Sequence[str], name: str) -> str:
    return f"{head}{', '.join(ctes)} SELECT * FROM {name} LIMIT {PREFIX_LIMIT}"


def _split_sqlglot(sql: str, tokens) -> tuple[list[Step], list[str]] | None:
    """Steps by the CTE grammar over sqlglot tokens, or None when the text does not follow it."""
    from sqlglot.tokens import TokenType

    n = len(tokens)
    i = 1
    head = "WITH "
    if i < n and tokens[i].token_type == TokenType.RECURSIVE:
        head, i = "WITH RECURSIVE ", i + 1
    match = _matching_parens(tokens)
    punctuation = (TokenType.L_PAREN, TokenType.R_PAREN, TokenType.COMMA, TokenType.SEMICOLON)
    steps: list[Step] = []
    problems: list[str] = []
    ctes: list[str] = []
    step_start = 0
    while True:
        if i >= n:  # nothing after a comma: no final query
            break
        name_tok = tokens[i]
        j = i + 1
        if name_tok.token_type in punctuation:
            j = -1
        elif j < n and tokens[j].token_type == TokenType.L_PAREN:  # a column list
            j = match[j] + 1 if match[j] > j else -1
        if j > 0 and j < n and tokens[j].token_type == TokenType.ALIAS:
            j += 1
            if j < n and tokens[j].token_type == TokenType.NOT:
                j += 1
            if j < n and tokens[j].text.upper() == "MATERIALIZED":
                j += 1
        else:
            j = -1
        if j < 0 or j >= n or tokens[j].token_type != TokenType.L_PAREN:
            if not steps:
                return None  # not the CTE grammar at all: the blank-line rule decides
            break  # the rest is the final query
        name = sql[name_tok.start:name_tok.end + 1]
        close = match[j]
        if close < j:
            s, e = _stripped(sql, step_start, len(sql))
            steps.append(Step(sql[s:e], s, e, "cte", name, None, "unterminated"))
            problems.append("unterminated")
            return steps, problems
        ctes.append(sql[name_tok.start:tokens[close].end + 1])
        k = close + 1
        has_comma = k < n and tokens[k].token_type == TokenType.COMMA
        end = tokens[k].end + 1 if has_comma else tokens[close].end + 1
        s, e = _stripped(sql, step_start, end)
        steps.append(Step(sql[s:e], s, e, "cte", name, _prefix_query(head, ctes, name)))
        step_start = end
        i = k + 1 if has_comma else k
        if not has_comma:
            break
    if all(t.token_type == TokenType.SEMICOLON for t in tokens[i:]):
        problems.append("final_missing")
    else:
        s, e = _stripped(sql, step_start, len(sql))
        steps.append(Step(sql[s:e], s, e, "final", None, sql[_stripped(sql, 0, len(sql))[0]:e]))
    return steps, problems


def _split_blank_lines(sql: str) -> tuple[list[Step], list[str]]:
    """The released rule: steps are blank-line separated chunks; a chunk that opens a CTE
    runs as the text so far (trailing comma dropped) + ``SELECT * FROM <its name> LIMIT 50``."""
    bounds = []
    pos = 0
    for m in _BLANK_LINE.finditer(sql):
        bounds.append((pos, m.start()))
        pos = m.end()
    bounds.append((pos, len(sql)))
    steps: list[Step] = []
    problems: list[str] = []
    first = _stripped(sql, 0, len(sql))[0]
    chunks = [(s, e) for s, e in (_stripped(sql, a, b) for a, b in bounds) if e > s]
    for idx, (s, e) in enumerate(chunks):
        text = sql[s:e]
        head = _CTE_HEAD.match(text)
        last = idx == len(chunks) - 1
        if head is not None:
            so_far = sql[first:e].rstrip().rstrip(",")
            query = f"{so_far} SELECT * FROM {head.group(1)} LIMIT {PREFIX_LIMIT}"
            steps.append(Step(text, s, e, "cte", head.group(1), query))
            if last:
                problems.append("final_missing")
        elif last:
            steps.append(Step(text, s, e, "final", None, sql[first:e]))
        else:
            steps.append(Step(text, s, e, "cte", None, None, "no_cte_name"))
            if "no_cte_name" not in problems:
                problems.append("no_cte_name")
    return steps, problems


def split_steps(sql: str, *, max_chars: int = MAX_CHARS, max_steps: int = MAX_STEPS) -> Chain:
    """Split SQL text into CoCTE steps (see the module docstring); never raises.

    Args:
      sql: the query text (for a model completion use `split_completion`).
      max_chars: longer text gets no steps (problem ``too_long``).
      max_steps: steps beyond this many are dropped (problem ``too_many_steps``).
    """
    if not isinstance(sql, str) or not sql.strip():
        return Chain(sql if isinstance(sql, str) else "", (), "none", ("empty",))
    if len(sql) > max_chars:
        return Chain(sql, (), "none", ("too_long",))
    from sqlglot.tokens import TokenType

    tokens = _tokens(sql)
    starts_with = tokens[0].token_type == TokenType.WITH if tokens else _WITH_HEAD.match(sql) is not None
    if not starts_with:  # comments before WITH are fine: the tokenizer skips them
        s, e = _stripped(sql, 0, len(sql))
        return Chain(sql, (Step(sql[s:e], s, e, "final", None, sql[s:e]),), "single", ("not_cocte",))
    split = _split_sqlglot(sql, tokens) if tokens else None
    method = "sqlglot"
    if split is None:
        split, method = _split_blank_lines(sql), "blank_line"
    steps, problems = split
    if len(steps) > max_steps:
        steps = steps[:max_steps]
        problems = [p for p in problems if p != "final_missing"] + ["too_many_steps"]
    return Chain(sql, tuple(steps), method, tuple(problems))


def split_completion(completion: str, **limits: int) -> tuple[int, Chain]:
    """(offset, chain) of a completion's SQL (`jaxsql.extract.extract_sql`'s rule: the
    last answer block or code fence, else the whole text); `offset` is where it starts."""
    sql = extract_sql(completion)
    offset = completion.rfind(sql) if sql else 0
    return max(offset, 0), split_steps(sql, **limits)


# --- execution ------------------------------------------------------------------------


def _unrunnable(step: Step) -> ExecResult:
    why = {"unterminated": "the step's CTE is never closed",
           "no_cte_name": "the step does not define a named CTE"}.get(step.problem or "", "the step cannot run")
    return ExecResult.failure("syntax", why)


def execute_completions(pool, items: Sequence[tuple[str, str]], **limits: int) -> list[Trajectory]:
    """Split each ``(db_path, completion)`` and execute every step's query in ONE pool call.

    The pool's cache serves repeated prefixes (the G samples of a group often
    share their first steps) and the final step's query is the completion's
    SQL itself, which the outcome reward runs too. Returns one `Trajectory`
    per item, in order.
    """
    split = [split_completion(c, **limits) for _, c in items]
    jobs: list[tuple[str, str]] = []
    for (db, _), (_, chain) in zip(items, split):
        jobs += [(db, s.query) for s in chain.steps if s.query is not None]
    results = iter(pool.execute_batch(jobs) if jobs else [])
    out = []
    for (_, completion), (offset, chain) in zip(items, split):
        res = tuple(next(results) if s.query is not None else _unrunnable(s) for s in chain.steps)
        out.append(Trajectory(completion, offset, chain, res))
    return out


# --- rendering for the PRM ---------------------------------------------------------------


def _row_text(row: tuple) -> str:
    return repr(tuple(row))


def render_result(result: ExecResult, max_chars: int = MAX_RESULT_CHARS) -> str:
    """A step's result as the released PRM saw it.

    Rows: the multiset of rows as a dict from row tuple to count, in first
    appearance order (``{('texas', 5): 1, ('ohio', 3): 2}``), cut after
    `max_chars` characters with ``...}``. An error: ``Execution error: <message>``.
    """
    if not result.ok:
        text = f"Execution error: {result.message or result.error}"
        return text if len(text) <= max_chars else text[:max_chars] + "..."
    counts: collections.Counter = collections.Counter()
    parts: list[str] = []
    size = 2
    rows = result.rows
    for row in rows:  # a counter in first-appearance order, built until it is long enough
        counts[row] += 1
    for row, count in counts.items():
        part = f"{_row_text(row)}: {count}"
        parts.append(part)
        size += len(part) + 2
        if size > max_chars + 2:
            break
    text = "{" + ", ".join(parts) + "}"
    if len(text) > max_chars:
        text = text[:max_chars] + "...}"
    return text


def prm_segments(step_texts: Sequence[str], rendered_results: Sequence[str], tag: str = STEP_TAG
                 ) -> list[tuple[str, bool]]:
    """The PRM text of steps and their rendered results as ``(text, is_tag)`` pieces, in order.

    Step k is ``[" " if k > 0] + step_text + "<result>" + rendered result +
    "</result>"``, then the tag; the PRM's score for step k is read at the
    last token of its tag. Tokenize piece by piece so each tag's position is
    exact whatever the tokenizer merges.
    """
    out: list[tuple[str, bool]] = []
    for k, (text, rendered) in enumerate(zip(step_texts, rendered_results)):
        out.append((("" if k == 0 else " ") + text + RESULT_OPEN + rendered + RESULT_CLOSE, False))
        out.append((tag, True))
    return out


def trajectory_segments(traj: Trajectory, *, tag: str = STEP_TAG,
                        max_result_chars: int = MAX_RESULT_CHARS) -> list[tuple[str, bool]]:
    """`prm_segments` of an executed trajectory (results rendered by `render_result`)."""
    return prm_segments([s.text for s in traj.steps], [render_result(r, max_result_chars) for r in traj.results],
                        tag)


def render_trajectory(traj: Trajectory, *, tag: str = STEP_TAG, max_result_chars: int = MAX_RESULT_CHARS) -> str:
    """`trajectory_segments` joined into one string."""
    return "".join(t for t, _ in trajectory_segments(traj, tag=tag, max_result_chars=max_result_chars))


def format_chain(ctes: Sequence[str], final: str, recursive: bool = False) -> str:
    """CoCTE text in the policy's layout: ``WITH c1,\\n\\nc2\\n\\nfinal`` (one step per blank-line block)."""
    head = "WITH RECURSIVE " if recursive else "WITH "
    if not ctes:
        return final
    return head + ",\n\n".join(ctes) + "\n\n" + final
