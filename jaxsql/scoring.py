"""Score predictions against examples: every metric per example, summaries, a resumable log.

The scoring path shared by ``jaxsql eval --predictions`` and, through
`rl.evaluate.evaluate`, by ``jaxsql eval --model`` and the demo.
`score_predictions` executes each prediction and its gold SQL through the
host `SqlPool` (plus the rewritten queries the Spider test suite and QATCH
run, on every test-suite database) and computes
`jaxsql.compare.compare_all` with a per-example deadline. Every metric of
`jaxsql.compare.METRICS` is reported per example and as a mean.

Summary keys: ``n`` (examples), ``n_scored``, ``skipped`` (examples whose
gold SQL fails: they cannot be scored and are left out of every mean; the
reasons are counted in `EvalResult.skipped`); means in [0, 1] over the scored
examples of every metric name (SQL metrics over the examples with gold SQL,
answer metrics over those with gold answers, ``tuple_order`` over those whose
gold contains ``order by``); ``error_rate`` (predictions that do not execute,
any error kind, missing predictions included); ``qatch`` (mean of cell
precision, cell recall and tuple cardinality).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from jaxsql.compare import ANSWER_METRICS, METRIC_NAMES, SQL_METRICS, OfficialRuns, compare_all, official_rewrites
from jaxsql.deadline import Deadline, ScoringTimeout
from jaxsql.errors import JaxsqlError
from jaxsql.official import spider as spider_official
from jaxsql.official import wikitq
from jaxsql.sql.result import ExecResult

DEFAULT_SCORE_TIMEOUT_S = 10.0
#: Result cells kept per example (for WikiTQ's prediction file) when the example has gold answers.
MAX_RESULT_VALUES = 1000


class Example(Protocol):
    """What scoring needs of an example (`data.records.Example` has it)."""

    id: str
    db_path: str
    gold_sql: str | None
    gold_answers: tuple[str, ...] | None
    difficulty: str


# ---------------------------------------------------------------------------
# results
@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Summary metrics (see the module docstring), one row per example, and breakdowns.

    `breakdowns`: difficulty (or question type) -> that group's summary.
    `skipped`: reason -> number of examples (not scorable: gold SQL failed).
    """

    summary: dict[str, float]
    rows: tuple[dict[str, Any], ...]
    breakdowns: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


def _applies(row: Mapping[str, Any], name: str) -> bool:
    if name in SQL_METRICS:
        return bool(row.get("has_gold_sql", True))
    return bool(row.get("has_answers", True))


def summarise(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means of per-example metrics (see the module docstring); None counts as 0 except for tuple_order.

    Skipped rows (gold SQL failed) are left out of every mean and counted in
    ``skipped``; a metric is reported when some scored row has a value for it.
    """
    n = len(metrics)
    if n == 0:
        return {"n": 0.0}
    scored = [m for m in metrics if not m.get("skipped")]
    out: dict[str, float] = {"n": float(n), "n_scored": float(len(scored))}
    for name in METRIC_NAMES:
        vals = [m.get(name) for m in scored if _applies(m, name)]
        if not any(v is not None for v in vals):
            continue
        if name == "tuple_order":
            vals = [v for v in vals if v is not None]
        out[name] = float(np.mean([float(v or 0.0) for v in vals]))
    if scored:
        out["error_rate"] = 1.0 - float(np.mean([float(m.get("executed") or 0.0) for m in scored]))
    if all(k in out for k in ("cell_precision", "cell_recall", "tuple_cardinality")):
        out["qatch"] = (out["cell_precision"] + out["cell_recall"] + out["tuple_cardinality"]) / 3.0
    out["skipped"] = float(n - len(scored))
    return out


def breakdown(rows: Sequence[Mapping[str, Any]], key: str = "difficulty") -> dict[str, dict[str, float]]:
    """`summarise` per value of `key` (rows without a value are left out)."""
    groups: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        if r.get(key):
            groups[str(r[key])].append(r)
    return {k: summarise(v) for k, v in sorted(groups.items())}


def result_of(rows: Sequence[dict[str, Any]]) -> EvalResult:
    """The `EvalResult` of finished rows."""
    skipped = collections.Counter(str(r["skipped"]) for r in rows if r.get("skipped"))
    return EvalResult(summary=summarise(rows), rows=tuple(rows), breakdowns=breakdown(rows),
                      skipped=dict(sorted(skipped.items())))


class ResultsLog:
    """Per-example results appended as JSON lines as they finish, read back on a rerun.

    A line cut off by a crash is dropped on open (and cut from the file), so
    appending continues on a clean line. In a bucket (``gs://``, `jaxsql.paths`), where an
    object cannot be appended to, the file is rewritten whole at each `append`
    (`jaxsql.paths.RewrittenFile`).
    """

    def __init__(self, path: Any) -> None:
        from jaxsql.paths import LineAppender, whole_lines

        self.rows: dict[str, dict[str, Any]] = {}
        data = whole_lines(path)
        self._file = LineAppender(path)
        self.path = self._file.path
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.rows[str(row["id"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                raise JaxsqlError(f"{self.path}:{lineno}: not a results line; move the file away "
                                  f"to start over") from None

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write `rows` and flush them to disk (or the bucket)."""
        rows = list(rows)
        if not rows:
            return
        self._file.append("".join(json.dumps(r, ensure_ascii=False, allow_nan=False, default=str) + "\n"
                                  for r in rows))
        for r in rows:
            self.rows[str(r["id"])] = r


# ---------------------------------------------------------------------------
# scoring
@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a system answered for one example: SQL to execute, or answer values (WikiTQ style).

    ``missing``: the system gave nothing for this example (scored as wrong).
    """

    sql: str | None = None
    answer: tuple[str, ...] | None = None
    completion: str | None = None
    missing: bool = False
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
    """How predictions are scored.

    Attributes:
      keep_distinct: the Spider test suite's ``--keep_distinct`` (off by default there).
      test_suite: run Spider's check on every ``*.sqlite`` of the database's
        folder, as the released evaluator does (``jaxsql eval`` turns it on for
        the Spider layout, where such a folder is one database's test suite;
        elsewhere a folder may hold unrelated databases).
      timeout_s: host-side scoring deadline per example; past it the
        prediction counts as failed (``scoring_timeout``).
      answer_canon: example id -> WikiTQ ``targetCanon`` of its gold answers
        (from the release's tagged files); missing ids are canonicalised here.
    """

    keep_distinct: bool = False
    test_suite: bool = False
    timeout_s: float = DEFAULT_SCORE_TIMEOUT_S
    answer_canon: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)


_NO_PREDICTION = ExecResult.failure("syntax", "no prediction for this example")
_NO_STATEMENT = ExecResult.failure("syntax", "no SQL statement after the test suite's rewrite")
_TIMED_OUT = ExecResult.failure("timeout", "host-side scoring passed its deadline")


def score_predictions(pool: Any, examples: Sequence[Example], predictions: Sequence[Prediction],
                      options: ScoringOptions = ScoringOptions()) -> list[dict[str, Any]]:
    """Execute and compare predictions[i] against examples[i]; one result row each (input order).

    All queries of the batch (predictions, gold, the official rewrites on every
    test-suite database) run in one pool batch; gold results are cached per
    example.
    """
    if len(examples) != len(predictions):
        raise JaxsqlError(f"score_predictions: {len(predictions)} predictions but {len(examples)} examples")
    plan = [_plan(ex, p, options) for ex, p in zip(examples, predictions)]
    jobs: list[tuple[str, str]] = []
    gold_items: list[tuple[str, str, str]] = []
    for step in plan:
        for kind, item in step["queries"]:
            (jobs if kind == "job" else gold_items).append(item)
    results, gold_results = pool.run_batch(jobs, gold_items) if (jobs or gold_items) else ([], [])
    it_jobs, it_gold = iter(results), iter(gold_results)
    rows = []
    for ex, pred, step in zip(examples, predictions, plan):
        got = [next(it_jobs) if kind == "job" else next(it_gold) for kind, _ in step["queries"]]
        rows.append(_score_one(ex, pred, step, got, options))
    return rows


def _plan(ex: Example, pred: Prediction, options: ScoringOptions) -> dict[str, Any]:
    """Which queries one example needs: ("job", (db, sql)) or ("gold", (id, db, sql)), in order."""
    queries: list[tuple[str, Any]] = []
    step: dict[str, Any] = {"queries": queries, "rewrites": None, "dbs": [ex.db_path]}
    sql = pred.sql if (pred.sql is not None and not pred.missing) else None
    if sql is not None:
        queries.append(("job", (ex.db_path, sql)))
    if ex.gold_sql is not None:
        queries.append(("gold", (ex.id, ex.db_path, ex.gold_sql)))
        if sql is not None:
            rw = official_rewrites(sql, ex.gold_sql, options.keep_distinct)
            step["rewrites"] = rw
            if not rw["capped"] and rw["spider_gold"] is not None:
                dbs = spider_official.test_suite_databases(ex.db_path) if options.test_suite else [ex.db_path]
                step["dbs"] = dbs
                for db in dbs:
                    if rw["spider_pred"] is not None:
                        queries.append(("job", (db, rw["spider_pred"])))
                    queries.append(("gold", (ex.id, db, rw["spider_gold"])))
            queries.append(("job", (ex.db_path, rw["qatch_pred"])))
            queries.append(("gold", (ex.id, ex.db_path, rw["qatch_gold"])))
    return step


def _score_one(ex: Example, pred: Prediction, step: dict[str, Any], got: list[ExecResult],
               options: ScoringOptions) -> dict[str, Any]:
    row: dict[str, Any] = {"id": ex.id, "difficulty": ex.difficulty, "has_gold_sql": ex.gold_sql is not None,
                           "has_answers": ex.gold_answers is not None}
    if pred.completion is not None:
        row["completion"] = pred.completion
    row.update(pred.extra)
    results = iter(got)
    sql = pred.sql if (pred.sql is not None and not pred.missing) else None
    if sql is not None:
        result = next(results)
    elif pred.answer is not None and not pred.missing:
        result = ExecResult(ok=True, columns=("answer",), rows=tuple((a,) for a in pred.answer))
    else:
        result = _NO_PREDICTION
    gold = next(results) if ex.gold_sql is not None else None
    official = None
    rw = step["rewrites"]
    if rw is not None:
        spider_pairs = None
        if not rw["capped"] and rw["spider_gold"] is not None:
            pairs = []
            for _ in step["dbs"]:
                p = next(results) if rw["spider_pred"] is not None else _NO_STATEMENT
                pairs.append((p, next(results)))
            spider_pairs = tuple(pairs)
        qatch_pair = (next(results), next(results))
        official = OfficialRuns(spider=spider_pairs, spider_order=bool(rw["spider_order"]), qatch=qatch_pair,
                                capped=rw["capped"])
    canon = options.answer_canon.get(ex.id)
    wanted = ANSWER_METRICS if pred.answer is not None else None  # answer values have no SQL to compare
    timed_out = False
    try:
        metrics = compare_all(result, gold, ex.gold_answers, ex.gold_sql, sql, official=official,
                              answer_canon=canon, metrics=wanted, keep_distinct=options.keep_distinct,
                              deadline=Deadline(options.timeout_s))
    except ScoringTimeout:
        timed_out = True
        result = _TIMED_OUT
        metrics = compare_all(result, gold, ex.gold_answers, ex.gold_sql, sql, answer_canon=canon, metrics=wanted)
    row.update({"pred_sql": sql, "answer": list(pred.answer) if pred.answer is not None else None,
                "executed": result.ok and not pred.missing,
                "error": "missing" if pred.missing else result.error,
                "error_message": "" if pred.missing else result.message,
                "limit": result.limit, "vm_steps": result.vm_steps,
                "gold_vm_steps": gold.vm_steps if gold is not None else None,
                "scoring_timeout": timed_out})
    row.update(metrics)
    if gold is not None and not gold.ok:
        row["skipped"] = f"gold_failed:{gold.error}"
        row["gold_error_message"] = gold.message
    else:
        row["skipped"] = None
    if ex.gold_answers is not None and result.ok and pred.answer is None:
        values = wikitq.result_strings(result.rows)
        row["result_values"] = values[:MAX_RESULT_VALUES]
        row["result_values_truncated"] = len(values) > MAX_RESULT_VALUES
    return row


def answer_canon_from_tagged(root: str | Path) -> dict[str, list[str]]:
    """WikiTQ ``targetCanon`` per example id from the release's ``tagged/data/*.tagged`` files ({} if absent)."""
    folder = Path(root) / "tagged" / "data"
    out: dict[str, list[str]] = {}
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.tagged")):
        with f.open(encoding="utf-8") as fh:
            header = fh.readline().rstrip("\n").split("\t")
            if "id" not in header or "targetCanon" not in header:
                continue
            i_id, i_canon = header.index("id"), header.index("targetCanon")
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) > max(i_id, i_canon):
                    out[parts[i_id]] = [_tsv_unescape(x) for x in parts[i_canon].split("|")]
    return out


def _tsv_unescape(x: str) -> str:
    return x.replace(r"\n", "\n").replace(r"\p", "|").replace("\\\\", "\\")




class ScoringRun:
    """The rows of one evaluation: those already in `log`, plus each batch scored now.

    `add` appends a batch's rows to the log as soon as they are scored (so an
    interrupted run loses at most the batch in flight) and advances the
    progress bar; `result` closes the bar and summarises every example.
    Use as a context manager so that the bar is closed on errors too.
    """

    def __init__(self, examples: Sequence[Example], log: ResultsLog | None = None, progress: bool = False) -> None:
        self.examples = examples
        self.log = log
        done = log.rows if log is not None else {}
        self.rows: dict[str, dict[str, Any]] = {e.id: done[e.id] for e in examples if e.id in done}
        self._bar = progress_bar(len(examples), len(self.rows), progress)

    def __enter__(self) -> "ScoringRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def is_done(self, example: Example) -> bool:
        """Whether `example` already has a row."""
        return example.id in self.rows

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record freshly scored rows (log first, then memory and the bar)."""
        if self.log is not None:
            self.log.append(rows)
        for r in rows:
            self.rows[r["id"]] = r
        self._bar.update(len(rows))

    def result(self) -> EvalResult:
        """The `EvalResult` of every example, in input order."""
        self._bar.close()
        return result_of([self.rows[e.id] for e in self.examples])


def score_all(pool: Any, examples: Sequence[Example], predictions: Sequence[Prediction],
              options: ScoringOptions = ScoringOptions(), log: ResultsLog | None = None,
              progress: bool = False, chunk: int = 256) -> EvalResult:
    """`score_predictions` over the whole split in chunks, skipping examples already in `log`
    and appending the new rows to it as each chunk finishes."""
    if len(examples) != len(predictions):
        raise JaxsqlError(f"score_all: {len(predictions)} predictions but {len(examples)} examples")
    with ScoringRun(examples, log, progress) as run:
        todo = [i for i, e in enumerate(examples) if not run.is_done(e)]
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            run.add(score_predictions(pool, [examples[i] for i in idx], [predictions[i] for i in idx], options))
        return run.result()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (or a no-op when not `enabled`)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="eval", unit="ex", dynamic_ncols=True)
