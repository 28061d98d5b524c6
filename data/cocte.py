"""Gold SQL -> an equivalent chain of CTEs: cold-start (SFT) data for Reward-SQL.

Reward-SQL's policy answers as a chain of common table expressions (see
`jaxsql.cocte`). Its authors wrote their cold-start chains with an LLM; here
they are derived from gold SQL by rewriting its syntax tree (sqlglot, SQLite
dialect), bottom-up, one SELECT at a time:

1. **subqueries**: every uncorrelated subquery (scalar, ``IN``, ``EXISTS``,
   a derived table in ``FROM``) is converted first and becomes a step; the
   subquery then reads ``(SELECT * FROM stepN)`` (a derived table becomes
   ``stepN AS <its alias>``). A correlated subquery (one naming a table of an
   enclosing query) stays where it is;
2. **filters**: the ``WHERE`` conjuncts that read one table only move into a
   step ``SELECT * FROM <table> AS <alias> WHERE ...`` that replaces the table
   under the same alias (not for the null-extended side of an outer join,
   where it would change the result);
3. **joins**: with two or more tables left, the join and the rest of the
   ``WHERE`` become one step that projects every column the outer query
   needs under a unique name (``<alias>_<column>``); the outer query reads it;
4. the rest (projection, grouping, ``HAVING``, ordering, ``LIMIT``) is the
   final SELECT. Set operations lift each branch.

A query with nothing to lift is wrapped as ``WITH step1 AS (<sql>) SELECT *
FROM step1`` (reason ``single_step``). `convert_examples` keeps a conversion
only when it executes to the same result as the gold query (the same rows in
the same order when the gold query has a top-level ``ORDER BY``, the same
multiset of rows otherwise) and counts the rest by reason (`REASONS`).
Steps are named ``step1, step2, ...`` as the prompt's instruction asks, and
laid out one per blank-line block (`jaxsql.cocte.format_chain`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

from data.records import Example
from jaxsql.cocte import format_chain, split_steps

#: Outcomes of a conversion, in the order reports list them.
REASONS = ("converted", "single_step", "no_gold_sql", "unparseable", "gold_fails", "conversion_fails",
           "result_differs")
#: Gold SQL longer than this is not parsed (sqlglot's parser is pure Python).
MAX_SQL_CHARS = 20_000


@dataclasses.dataclass(frozen=True)
class Conversion:
    """One gold query's conversion.

    Attributes:
      sql: the gold SQL.
      cocte: the chain in the policy's layout, or None when conversion failed.
      steps: number of steps (CTEs and the final SELECT).
      lifted: what each CTE step holds: ``subquery``, ``derived``, ``filter``, ``join``, ``branch``, ``with``
        (a CTE the gold query already had) or ``whole`` (the single-step wrap).
      reason: one of `REASONS`: ``converted`` (checked, at least one part lifted), ``single_step``
        (checked, nothing to lift), else why the conversion is not kept.
      detail: the error message behind a failure, else "".
    """

    sql: str
    cocte: str | None
    steps: int
    lifted: tuple[str, ...]
    reason: str
    detail: str = ""


class _NotConvertible(Exception):
    pass


def _exp():
    from sqlglot import exp

    return exp


def _lower(name: str | None) -> str:
    return (name or "").lower()


class _Chain:
    """Steps under construction: (name, body) pairs in dependency order."""

    def __init__(self, taken: set[str]) -> None:
        self.steps: list[tuple[str, Any]] = []
        self.kinds: list[str] = []
        self.taken = taken

    def add(self, body, kind: str, name: str | None = None) -> str:
        reuse = _step_alias(body, {n.lower() for n, _ in self.steps})
        if reuse is not None and name is None:
            return reuse  # ``SELECT * FROM stepN``: stepN already is this step
        if name is None:
            k = len(self.steps) + 1
            while f"step{k}" in self.taken:
                k += 1
            name = f"step{k}"
        self.taken.add(name.lower())
        self.steps.append((name, body))
        self.kinds.append(kind)
        return name

    # -- queries ---------------------------------------------------------------------

    def query(self, q):
        """Lift the parts of query `q` into steps; returns what is left of it."""
        exp = _exp()
        if isinstance(q, exp.SetOperation):
            for side in ("this", "expression"):
                branch = q.args.get(side)
                if isinstance(branch, exp.Subquery):
                    branch = branch.this
                if isinstance(branch, exp.Query):
                    name = self.add(self.query(branch), "branch")
                    q.set(side, exp.select("*").from_(name))
            return q
        if isinstance(q, exp.Select):
            return self.select(q)
        return q

    def select(self, sel):
        exp = _exp()
        with_ = sel.args.get("with_")
        if with_ is not None:
            if with_.args.get("recursive"):
                raise _NotConvertible("recursive CTE")
            for cte in with_.expressions:
                self.add(self.query(cte.this), "with", cte.alias)
            sel.set("with_", None)
        self._lift_subqueries(sel)
        self._lift_filters(sel)
        self._lift_join(sel)
        return sel

    # -- 1. subqueries -------------------------------------------------------------------

    def _lift_subqueries(self, sel) -> None:
        exp = _exp()
        found = []
        for node in sel.walk(prune=lambda n: n is not sel and isinstance(n, (exp.Subquery, exp.Exists, exp.Query))):
            if node is sel:
                continue
            if isinstance(node, exp.Subquery) and isinstance(node.this, exp.Query):
                found.append(node)
            elif isinstance(node, exp.Exists) and isinstance(node.this, exp.Query):
                found.append(node)
        for node in found:
            inner = node.this
            if _correlated(inner):
                continue
            name = self.add(self.query(inner), "derived" if _is_derived_table(node) else "subquery")
            if _is_derived_table(node):
                alias = node.alias
                node.replace(exp.to_table(name).as_(alias) if alias else exp.to_table(name))
            else:
                node.set("this", exp.select("*").from_(name))

    # -- 2. filters ------------------------------------------------------------------

    def _lift_filters(self, sel) -> None:
        exp = _exp()
        where = sel.args.get("where")
        sources = _sources(sel)
        if where is None or not sources or _is_plain_filter(sel):
            return
        conjuncts = list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]
        aliases = {_lower(a) for a, _ in sources}
        keep = []
        per_source: dict[str, list] = collections.defaultdict(list)
        for c in conjuncts:
            refs = _referenced_aliases(c, aliases, single=next(iter(aliases)) if len(sources) == 1 else None)
            if refs is not None and len(refs) == 1 and not _has_aggregate(c):
                per_source[next(iter(refs))].append(c)
            else:
                keep.append(c)
        lifted_any = False
        for alias, table in sources:
            conds = per_source.get(_lower(alias))
            if not conds:
                continue
            if not isinstance(table, exp.Table) or not _filter_safe(sel, table):
                keep.extend(conds)
                continue
            body = exp.select("*").from_(table.copy()).where(exp.and_(*[c.copy() for c in conds]))
            name = self.add(body, "filter")
            needs_alias = _qualified_with(sel, alias) or table.alias
            table.replace(exp.to_table(name).as_(alias) if needs_alias else exp.to_table(name))
            lifted_any = True
        if lifted_any:
            sel.set("where", exp.Where(this=exp.and_(*keep)) if keep else None)

    # -- 3. joins --------------------------------------------------------------------

    def _lift_join(self, sel) -> None:
        exp = _exp()
        sources = _sources(sel)
        if len(sources) < 2:
            return
        aliases = {_lower(a) for a, _ in sources}
        outer_parts = list(sel.expressions)
        for key in ("group", "having", "order"):
            if sel.args.get(key) is not None:
                outer_parts.append(sel.args[key])
        output_names = {_lower(e.alias) for e in sel.expressions if e.alias}
        needed: dict[tuple[str, str], tuple[str, str, str]] = {}
        used_names = {_lower(a) for a in output_names}
        for part in outer_parts:
            if any(True for _ in part.find_all(exp.Star)) and not _only_count_star(part):
                return
            for node in part.walk(prune=lambda n: isinstance(n, exp.Query) or isinstance(n, exp.Subquery)):
                if isinstance(node, (exp.Query, exp.Subquery)) and node is not part:
                    if _referenced_aliases(node, aliases, single=None, deep=True):
                        return  # a correlated subquery reads the joined tables: leave the join
                    continue
                if isinstance(node, exp.Column):
                    t = _lower(node.table)
                    if not t:
                        if _lower(node.name) in output_names:
                            continue
                        return  # an unqualified column: which table it reads is not known here
                    if t not in aliases:
                        return
                    key = (t, _lower(node.name))
                    if key not in needed:
                        base = f"{node.table}_{node.name}"
                        name, n = base, 1
                        while _lower(name) in used_names:
                            n += 1
                            name = f"{base}_{n}"
                        used_names.add(_lower(name))
                        needed[key] = (node.table, node.name, name)
        projection = [exp.column(col, table=table).as_(name) for table, col, name in needed.values()]
        body = exp.select(*(projection or [exp.Star()]))
        body.set("from_", sel.args["from_"].copy())
        body.set("joins", [j.copy() for j in sel.args.get("joins") or []])
        if sel.args.get("where") is not None:
            body.set("where", sel.args["where"].copy())
        name = self.add(body, "join")
        for i, e in enumerate(sel.expressions):  # keep the output names a reader of this query sees
            if isinstance(e, exp.Column) and (_lower(e.table), _lower(e.name)) in needed:
                sel.expressions[i] = e.as_(e.name)
                outer_parts[i] = sel.expressions[i]
        for part in outer_parts:
            for col in list(part.find_all(exp.Column)):
                key = (_lower(col.table), _lower(col.name))
                if key in needed:
                    col.replace(exp.column(needed[key][2]))
        sel.set("from_", exp.From(this=exp.to_table(name)))
        sel.set("joins", None)
        sel.set("where", None)


# --- tree helpers -----------------------------------------------------------------------


def _is_derived_table(node) -> bool:
    exp = _exp()
    return isinstance(node, exp.Subquery) and isinstance(node.parent, (exp.From, exp.Join))


def _sources(sel) -> list[tuple[str, Any]]:
    """(alias or name, node) of each FROM / JOIN source of a SELECT."""
    out = []
    from_ = sel.args.get("from_")
    nodes = ([from_.this] if from_ is not None else []) + [j.this for j in sel.args.get("joins") or []]
    for n in nodes:
        out.append((n.alias_or_name, n))
    return out


def _step_alias(body, step_names: set[str]) -> str | None:
    """The step a body only re-reads (``SELECT * FROM stepN``), else None."""
    exp = _exp()
    if not isinstance(body, exp.Select) or not _is_plain(body) or body.args.get("where") is not None:
        return None
    if len(body.expressions) != 1 or not isinstance(body.expressions[0], exp.Star):
        return None
    table = body.args["from_"].this
    if isinstance(table, exp.Table) and not table.alias and _lower(table.name) in step_names:
        return table.name
    return None


def _is_plain(sel) -> bool:
    """One source, no grouping, ordering, limit, distinct or window."""
    if sel.args.get("from_") is None or sel.args.get("joins"):
        return False
    return not any(sel.args.get(k) for k in ("group", "having", "order", "limit", "offset", "distinct", "qualify"))


def _is_plain_filter(sel) -> bool:
    """``SELECT * FROM t WHERE ...`` and nothing else: already a filter step."""
    exp = _exp()
    return (_is_plain(sel) and len(sel.expressions) == 1 and isinstance(sel.expressions[0], exp.Star))


def _defined_names(q) -> set[str]:
    """Every table name, alias and CTE name defined anywhere inside `q`."""
    exp = _exp()
    names = set()
    for t in q.find_all(exp.Table):
        names.add(_lower(t.name))
        names.add(_lower(t.alias_or_name))
    for s in q.find_all(exp.Subquery):
        if s.alias:
            names.add(_lower(s.alias))
    for c in q.find_all(exp.CTE):
        names.add(_lower(c.alias))
    return names


def _correlated(q) -> bool:
    """True when `q` names a table it does not define (it reads an enclosing query)."""
    exp = _exp()
    names = _defined_names(q)
    return any(col.table and _lower(col.table) not in names for col in q.find_all(exp.Column))


def _referenced_aliases(node, aliases: set[str], single: str | None, deep: bool = False) -> set[str] | None:
    """Source aliases a condition reads; None when it reads an unqualified column whose
    table is ambiguous (several sources) at this level."""
    exp = _exp()
    refs: set[str] = set()
    for col in node.find_all(exp.Column):
        t = _lower(col.table)
        nested = any(isinstance(p, (exp.Subquery, exp.Query)) for p in _parents(col, stop=node))
        if t:
            if t in aliases:
                refs.add(t)
        elif not nested and not deep:
            if single is None:
                return None
            refs.add(single)
    return refs


def _parents(node, stop):
    p = node.parent
    while p is not None and p is not stop:
        yield p
        p = p.parent


def _has_aggregate(node) -> bool:
    exp = _exp()
    for n in node.walk(prune=lambda x: isinstance(x, (exp.Subquery, exp.Query))):
        if isinstance(n, (exp.AggFunc, exp.Window)):
            return True
    return False


def _only_count_star(part) -> bool:
    exp = _exp()
    return all(isinstance(s.parent, exp.Count) for s in part.find_all(exp.Star))


def _filter_safe(sel, table) -> bool:
    """Whether pre-filtering `table` equals filtering after the joins (no null-extended side)."""
    exp = _exp()
    joins = sel.args.get("joins") or []
    from_ = sel.args.get("from_")
    if from_ is not None and from_.this is table:
        return all(_lower(j.side) in ("", "left") for j in joins)
    for j in joins:
        if j.this is table:
            return _lower(j.side) == "" and _lower(j.kind) in ("", "inner", "cross")
    return False


def _qualified_with(sel, alias: str) -> bool:
    exp = _exp()
    return any(_lower(c.table) == _lower(alias) for c in sel.find_all(exp.Column))


def _identifiers(tree) -> set[str]:
    exp = _exp()
    return {_lower(i.this) for i in tree.find_all(exp.Identifier)}


# --- conversion -------------------------------------------------------------------------


def lift_to_chain(sql: str) -> tuple[str, tuple[str, ...]]:
    """(CoCTE text, kind of each CTE step) for `sql`; raises ValueError when sqlglot
    cannot parse it. Not checked by execution: see `convert_sql`."""
    import sqlglot

    exp = _exp()
    if len(sql) > MAX_SQL_CHARS:
        raise ValueError(f"longer than {MAX_SQL_CHARS} characters")
    try:
        statements = [s for s in sqlglot.parse(sql, read="sqlite") if s is not None]
    except Exception as e:  # noqa: BLE001 - ParseError, TokenError, RecursionError
        raise ValueError(f"sqlglot cannot parse it: {type(e).__name__}") from None
    if len(statements) != 1 or not isinstance(statements[0], exp.Query):
        raise ValueError("not one query")
    tree = statements[0]
    chain = _Chain(_identifiers(tree))
    try:
        final = chain.query(tree.copy())
    except (_NotConvertible, RecursionError):
        chain = _Chain(_identifiers(tree))
    if not chain.steps:
        name = chain.add(tree, "whole")
        final = exp.select("*").from_(name)
    ctes = [f"{name} AS ({body.sql(dialect='sqlite')})" for name, body in chain.steps]
    return format_chain(ctes, final.sql(dialect="sqlite")), tuple(chain.kinds)


def _same_result(gold, pred, ordered: bool) -> bool:
    if not (gold.ok and pred.ok):
        return False
    if ordered:
        return list(gold.rows) == list(pred.rows)
    return collections.Counter(gold.rows) == collections.Counter(pred.rows)


def convert_sql(sql: str, gold, run) -> Conversion:
    """Convert one gold query and check it by execution.

    Args:
      sql: the gold SQL.
      gold: its `ExecResult`.
      run: ``run(cocte_sql) -> ExecResult`` (the sandbox or a pool).
    """
    from jaxsql.compare import has_top_level_order_by

    if not gold.ok:
        return Conversion(sql, None, 0, (), "gold_fails", gold.message)
    try:
        text, kinds = lift_to_chain(sql)
    except ValueError as e:
        return Conversion(sql, None, 0, (), "unparseable", str(e))
    result = run(text)
    steps = len(split_steps(text).steps)
    if not result.ok:
        return Conversion(sql, text, steps, kinds, "conversion_fails", result.message)
    if not _same_result(gold, result, has_top_level_order_by(sql)):
        return Conversion(sql, text, steps, kinds, "result_differs")
    return Conversion(sql, text, steps, kinds, "single_step" if kinds == ("whole",) else "converted")


def has_subquery_or_join(sql: str) -> bool:
    """Whether the query has a subquery (of any kind) or reads two or more tables in one SELECT."""
    import sqlglot

    exp = _exp()
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:  # noqa: BLE001
        return False
    if any(True for _ in tree.find_all(exp.Subquery)) or any(True for _ in tree.find_all(exp.Exists)):
        return True
    return any(len(s.args.get("joins") or []) > 0 for s in tree.find_all(exp.Select))


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What `convert_examples` did: counts by reason, and for queries with a subquery or join."""

    total: int
    by_reason: dict[str, int]
    nested_total: int
    nested_converted: int
    examples: tuple[tuple[Example, Conversion], ...]

    @property
    def nested_share(self) -> float:
        """Converted share among gold queries (that execute) with a subquery or a join."""
        return self.nested_converted / self.nested_total if self.nested_total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"examples": self.total, "by_reason": {r: self.by_reason.get(r, 0) for r in REASONS},
                "with_subquery_or_join": self.nested_total, "with_subquery_or_join_converted": self.nested_converted,
                "with_subquery_or_join_share": round(self.nested_share, 4)}


def convert_examples(examples: Sequence[Example], pool) -> ConversionReport:
    """Convert every example's gold SQL, checking each conversion on its database.

    `pool` is a `jaxsql.sql.SqlPool`: gold queries run once per example (its
    gold cache), conversions in one batch. Distinct gold queries are converted
    once. Returns the per-example conversions and counts by reason.
    """
    with_sql = [e for e in examples if e.gold_sql]
    golds = pool.gold_batch([(e.id, e.db_path, e.gold_sql) for e in with_sql])
    chains: dict[str, tuple[str, tuple[str, ...]] | str] = {}
    for e in with_sql:
        if e.gold_sql not in chains:
            try:
                chains[e.gold_sql] = lift_to_chain(e.gold_sql)
            except ValueError as err:
                chains[e.gold_sql] = str(err)
    jobs = [(e.db_path, chains[e.gold_sql][0]) for e in with_sql if not isinstance(chains[e.gold_sql], str)]
    results = iter(pool.execute_batch(jobs))
    ran = {}
    for e in with_sql:
        if not isinstance(chains[e.gold_sql], str):
            ran[e.id] = next(results)
    out: list[tuple[Example, Conversion]] = []
    counts: collections.Counter[str] = collections.Counter()
    nested_total = nested_ok = 0
    nested_cache: dict[str, bool] = {}
    by_id = dict(zip([e.id for e in with_sql], golds))
    for e in examples:
        if not e.gold_sql:
            conv = Conversion("", None, 0, (), "no_gold_sql")
        else:
            chain = chains[e.gold_sql]
            if isinstance(chain, str) and by_id[e.id].ok:
                conv = Conversion(e.gold_sql, None, 0, (), "unparseable", chain)
            else:
                result = ran.get(e.id)
                conv = convert_sql(e.gold_sql, by_id[e.id], lambda _text, r=result: r)
            if by_id[e.id].ok:
                if e.gold_sql not in nested_cache:
                    nested_cache[e.gold_sql] = has_subquery_or_join(e.gold_sql)
                if nested_cache[e.gold_sql]:
                    nested_total += 1
                    nested_ok += conv.reason == "converted"
        counts[conv.reason] += 1
        out.append((e, conv))
    return ConversionReport(len(examples), dict(counts), nested_total, nested_ok, tuple(out))


def cocte_examples(report: ConversionReport, keep_single_step: bool = True) -> list[Example]:
    """The examples whose conversion is kept, with the chain as their gold SQL."""
    keep = {"converted", "single_step"} if keep_single_step else {"converted"}
    return [dataclasses.replace(e, gold_sql=c.cocte) for e, c in report.examples if c.reason in keep]


def chain_target(sql: str) -> str | None:
    """The policy-layout text of SQL that already is a CoCTE chain, else None.

    Steps are laid out one per blank-line block (`jaxsql.cocte.format_chain`'s
    layout); whitespace inside a step collapses to single spaces unless the
    step holds a comment (where a newline ends the comment).
    """
    from jaxsql.sql.normalize import whitespace_normalize

    chain = split_steps(sql)
    if not chain.is_cocte:
        return None
    tidy = [s.text if ("--" in s.text or "/*" in s.text) else whitespace_normalize(s.text) for s in chain.steps]
    return "\n\n".join(tidy)


def write_jsonl(examples: Sequence[Example], path, *, relative_to=None) -> int:
    """Write examples as JSONL the ``jsonl`` reader reads (db paths relative to `relative_to`
    when given, else as they are); atomically (a temporary file renamed). Returns the count."""
    import os

    rows = []
    for e in examples:
        d = e.to_dict()
        if relative_to is not None:
            d["db_path"] = os.path.relpath(e.db_path, relative_to)
        rows.append(d)
    return write_json_lines(rows, path)


def write_json_lines(rows: Sequence[dict], path) -> int:
    """Write one JSON object per line (sorted keys), atomically (a temporary file renamed).
    Returns the count."""
    import json
    from pathlib import Path

    path = Path(path)
    lines = [json.dumps(d, sort_keys=True) + "\n" for d in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
    return len(lines)
