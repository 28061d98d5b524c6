"""Multi-turn SFT traces from gold SQL, and their token encoding with an observation mask.

A trace is what a policy that uses the SQL tool (`jaxsql.tools`) would
write for an example, derived from its gold query and executed for real:

- ``lookup``: the gold query filters a text column on a literal
  (``city = 'cairo'``, ``store != 'river'``): the model first looks up that
  column's distinct values, ``<sql>SELECT DISTINCT city FROM student</sql>``,
  reads the real observation (which shows the literal), then answers;
- ``peek``: no such filter, and the example is one of the ``peek_share``
  chosen by a hash of its id: one exploratory call
  ``<sql>SELECT * FROM <first table> LIMIT 3</sql>``, then the answer;
- ``direct``: the answer right away, ``<solution>GOLD</solution>``.

Each trace is a list of segments ``(text, is_observation)``: the model's
text (targets) and the host's observations (context, masked out of the
loss). The model text after an observation is the answer
``<solution>SQL</solution>`` (the gold SQL, whitespace collapsed). Every
trace is checked: its model segments are read back with
`jaxsql.tools.parse_segment` (each call and the answer parse as meant), and
its final SQL executes to the gold result (`jaxsql.compare.ex_ordered`).
Failures are counted by reason (`REASONS`), like ``jaxsql data cocte``.

`encode_trace` tokenises the segments one by one (as the rollout loop
appends observation tokens to a row) and returns the ids and the loss mask.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import zlib
from typing import Any, Callable, Sequence

from data.records import Example
from jaxsql.sql.result import ExecResult
from jaxsql.tools import ToolConfig, parse_segment, render_observation

#: Outcomes of building a trace, in the order reports list them: the kept kinds, then failures.
REASONS = ("lookup", "peek", "direct", "no_gold_sql", "gold_fails", "call_fails", "answer_differs")
KEPT = ("lookup", "peek", "direct")
#: Share of examples without a filtered text column that get a peek call.
DEFAULT_PEEK_SHARE = 0.5

Segment = tuple[str, bool]


@dataclasses.dataclass(frozen=True)
class Trace:
    """One example's trace.

    Attributes:
      reason: one of `REASONS` (a kept kind, or why no trace is kept).
      segments: ``(text, is_observation)`` in order (empty when not kept).
      calls: the tool calls' SQL.
      final_sql: the answer's SQL.
      detail: the error behind a failure, else "".
    """

    reason: str
    segments: tuple[Segment, ...] = ()
    calls: tuple[str, ...] = ()
    final_sql: str = ""
    detail: str = ""

    @property
    def kept(self) -> bool:
        return self.reason in KEPT

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


def _quote(name: str) -> str:
    from data.schema import _quote_ident

    return _quote_ident(name)


def filtered_text_column(sql: str, columns_of: dict[str, set[str]]) -> tuple[str, str, str] | None:
    """``(table, column, literal)`` of the first ``column = 'text'`` (or ``!=``) filter of `sql`.

    `columns_of` maps each table of the database (lower-cased) to its
    columns; an unqualified column is resolved among the tables the query
    reads and must belong to exactly one. None when there is no such filter
    (or the query does not parse).
    """
    import sqlglot
    from sqlglot import exp

    if len(sql) > 20_000:
        return None
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:  # noqa: BLE001 - unparseable: no look-up
        return None
    if tree is None:
        return None
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    aliases = {t.alias_or_name.lower(): t.name for t in tree.find_all(exp.Table)
               if t.name and t.name.lower() not in ctes}
    read = {t.lower() for t in aliases.values()}
    for node in tree.find_all(exp.EQ, exp.NEQ):
        a, b = node.this, node.expression
        if isinstance(b, exp.Column) and isinstance(a, exp.Literal):
            a, b = b, a
        if not (isinstance(a, exp.Column) and isinstance(b, exp.Literal) and b.is_string):
            continue
        col = a.name
        if a.table:
            table = aliases.get(a.table.lower())
            owners = [table] if table and col.lower() in columns_of.get(table.lower(), set()) else []
        else:
            owners = [t for t in sorted(read) if col.lower() in columns_of.get(t, set())]
        if len(owners) == 1:
            return owners[0], col, b.this
    return None


def _first_table(sql: str) -> str | None:
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:  # noqa: BLE001
        return None
    if tree is None:
        return None
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    for t in tree.find_all(exp.Table):
        if t.name and t.name.lower() not in ctes:
            return t.name
    return None


def plan_calls(example: Example, columns_of: dict[str, set[str]],
               peek_share: float = DEFAULT_PEEK_SHARE) -> tuple[str, tuple[str, ...], str]:
    """``(kind, calls, literal)``: which trace an example gets (``lookup``, ``peek``, ``direct``),
    the calls' SQL and, for a look-up, the literal the observation must show."""
    sql = example.gold_sql or ""
    found = filtered_text_column(sql, columns_of)
    if found is not None:
        table, col, literal = found
        return "lookup", (f"SELECT DISTINCT {_quote(col)} FROM {_quote(table)}",), literal
    table = _first_table(sql)
    if table is not None and zlib.crc32(example.id.encode()) % 1000 < peek_share * 1000:
        return "peek", (f"SELECT * FROM {_quote(table)} LIMIT 3",), ""
    return "direct", (), ""


def _columns_of(db_path: str) -> dict[str, set[str]]:
    from data.schema import read_sqlite_schema

    try:
        return {t.name.lower(): {c.name.lower() for c in t.columns}
                for t in read_sqlite_schema(db_path, sample_values=0)}
    except Exception:  # noqa: BLE001 - a missing or unreadable database: the gold query fails too
        return {}


def _assemble(example: Example, kind: str, calls: Sequence[str], literal: str, results: Sequence[ExecResult],
              gold: ExecResult, final: ExecResult, cfg: ToolConfig) -> Trace:
    from jaxsql.compare import ex_ordered

    gold_sql = " ".join((example.gold_sql or "").split())
    if not gold.ok:
        return Trace("gold_fails", final_sql=gold_sql, detail=f"{gold.error}: {gold.message}")
    segments: list[Segment] = []
    for i, (sql, r) in enumerate(zip(calls, results)):
        if not r.ok:
            return Trace("call_fails", calls=tuple(calls), final_sql=gold_sql, detail=f"{r.error}: {r.message}")
        obs = render_observation(r, cfg, last_call=i + 1 >= cfg.max_turns)
        if kind == "lookup" and f"\n{literal}\n" not in obs:
            # the value is not among the rows shown: a look-up would not help; answer directly
            return dataclasses.replace(
                _assemble(example, "direct", (), "", (), gold, final, cfg), detail="lookup_value_not_shown")
        segments += [(cfg.call(sql), False), (obs, True)]
    segments.append((cfg.answer(gold_sql), False))
    # read the model text back through the protocol
    parsed = [parse_segment(t, cfg) for t, is_obs in segments if not is_obs]
    want = [("call", c) for c in calls] + [("answer", gold_sql)]
    if [(p.status, p.sql) for p in parsed] != want:
        return Trace("answer_differs", calls=tuple(calls), final_sql=gold_sql, detail="trace does not parse back")
    if not (final.ok and ex_ordered(final.rows, gold.rows, example.gold_sql)):
        return Trace("answer_differs", calls=tuple(calls), final_sql=gold_sql,
                     detail=f"{final.error}: {final.message}" if not final.ok else "rows differ")
    return Trace(kind, tuple(segments), tuple(calls), gold_sql)


def build_traces(examples: Sequence[Example], run: Callable[[Sequence[tuple[str, str]]], list[ExecResult]],
                 cfg: ToolConfig = ToolConfig(), peek_share: float = DEFAULT_PEEK_SHARE) -> list[Trace]:
    """One `Trace` per example. `run` executes ``(db_path, sql)`` jobs in order (e.g.
    ``SqlPool.execute_batch``); the gold queries, the calls and the final answers go
    to it as one batch."""
    if cfg.max_turns < 1:
        peek_share = 0.0
    cols: dict[str, dict[str, set[str]]] = {}
    plans = []
    jobs: list[tuple[str, str]] = []
    for e in examples:
        if not e.gold_sql:
            plans.append(None)
            continue
        if e.db_path not in cols:
            cols[e.db_path] = _columns_of(e.db_path)
        kind, calls, literal = plan_calls(e, cols[e.db_path], peek_share)
        if cfg.max_turns < 1:
            kind, calls, literal = "direct", (), ""
        final = " ".join(e.gold_sql.split())
        plans.append((kind, calls, literal, len(jobs)))
        jobs += [(e.db_path, e.gold_sql)] + [(e.db_path, c) for c in calls] + [(e.db_path, final)]
    results = run(jobs) if jobs else []
    out = []
    for e, plan in zip(examples, plans):
        if plan is None:
            out.append(Trace("no_gold_sql"))
            continue
        kind, calls, literal, at = plan
        gold, call_results, final = results[at], results[at + 1: at + 1 + len(calls)], results[at + 1 + len(calls)]
        out.append(_assemble(e, kind, calls, literal, call_results, gold, final, cfg))
    return out


@dataclasses.dataclass(frozen=True)
class TraceReport:
    """Counts of `build_traces` by reason, and the examples with their traces."""

    total: int
    by_reason: dict[str, int]
    lookup_value_not_shown: int
    items: tuple[tuple[Example, Trace], ...]

    def to_json(self) -> dict[str, Any]:
        calls = sum(len(t.calls) for _, t in self.items if t.kept)
        kept = sum(1 for _, t in self.items if t.kept)
        return {"examples": self.total, "kept": kept, "by_reason": {r: self.by_reason.get(r, 0) for r in REASONS},
                "lookup_value_not_shown": self.lookup_value_not_shown, "calls": calls,
                "calls_per_trace": round(calls / kept, 4) if kept else 0.0}


def trace_report(examples: Sequence[Example], traces: Sequence[Trace]) -> TraceReport:
    counts = collections.Counter(t.reason for t in traces)
    hidden = sum(1 for t in traces if t.detail == "lookup_value_not_shown")
    return TraceReport(len(examples), dict(counts), hidden, tuple(zip(examples, traces)))


def write_traces(report: TraceReport, path, *, kept_only: bool = True) -> int:
    """Write JSONL, one object per example: the `Example` fields plus ``trace``
    (``reason``, ``segments`` as ``[text, is_observation]`` pairs, ``calls``, ``final_sql``,
    ``detail``); atomically. Returns the count written."""
    from data.cocte import write_json_lines

    rows = []
    for e, t in report.items:
        if kept_only and not t.kept:
            continue
        d = e.to_dict()
        d["trace"] = {"reason": t.reason, "segments": [[s, o] for s, o in t.segments], "calls": list(t.calls),
                      "final_sql": t.final_sql, "detail": t.detail}
        rows.append(d)
    return write_json_lines(rows, path)


def _sandbox_run(jobs: Sequence[tuple[str, str]]) -> list[ExecResult]:
    from jaxsql.sql.sandbox import execute

    return [execute(db, sql, max_rows=100_000) for db, sql in jobs]


@functools.lru_cache(maxsize=65_536)
def _cached_trace(example: Example) -> Trace:
    return build_traces([example], _sandbox_run)[0]


def example_trace(example: Example) -> Trace:
    """The trace of one example with the default `ToolConfig`, executed in the sandbox
    (cached per example): what the ``tool`` prompt format trains on."""
    return _cached_trace(example)


def trace_segments(example: Example) -> list[Segment]:
    """The segments of `example_trace`. An example whose trace is not kept (its gold query
    fails, a call fails) answers directly, ``<solution>GOLD</solution>``, as the single-turn
    formats train on gold SQL whether it runs or not; ``jaxsql data tooltraces`` writes only
    the examples whose trace is kept."""
    t = example_trace(example)
    if t.kept:
        return list(t.segments)
    return [(ToolConfig().answer(" ".join((example.gold_sql or "").split())), False)]


def encode_trace(tokenizer: Any, segments: Sequence[Segment], max_len: int,
                 eos_id: int) -> tuple[list[int], list[int]]:
    """Token ids of a trace plus EOS, and the loss mask: 1 on the model's tokens and EOS, 0 on
    observation tokens.

    Each segment is tokenised on its own (``add_special_tokens=False``), as the
    rollout loop appends an observation's tokens to a row, so every token
    belongs to exactly one segment and the mask is exact. Over `max_len`, the
    first ``max_len - 1`` tokens are kept, then EOS (like
    `rl.rollout.PromptEncoder.target_ids`).
    """
    if max_len < 1:
        raise ValueError(f"encode_trace: max_len must be >= 1, got {max_len}")
    ids: list[int] = []
    mask: list[int] = []
    for text, is_obs in segments:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        mask += [0 if is_obs else 1] * len(piece)
    return ids[: max_len - 1] + [int(eos_id)], mask[: max_len - 1] + [1]
