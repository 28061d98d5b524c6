"""Prediction files in each benchmark's own layout, and the evaluation outputs.

Readers (``jaxsql eval --predictions FILE``), one `Prediction` per example in
the order of the examples, plus the `Problems` found:

- ``bird``: the JSON object BIRD's ``evaluation.py`` reads,
  ``{"0": "SQL\\t----- bird -----\\tdb_id", ...}``, keyed by the question's
  position in the split's JSON file;
- ``spider``: one SQL per line in the split's order (the test suite's format;
  text after a tab is ignored, blank lines are skipped and reported, since
  the released evaluator treats them as session breaks);
- ``jsonl``: one object per line, ``{"id": ..., "sql": ...}`` or
  ``{"id": ..., "answer": "..." | [...]}`` (answer values, WikiTQ style);
- ``tsv``: WikiTQ's official prediction file, ``id<TAB>value<TAB>value...``.

A file named ``*.jsonl`` is read as JSONL whatever the source.

Missing predictions count as wrong and are listed; entries naming no example,
unparseable entries and a BIRD entry naming another database are listed and
scored as missing. `write_outputs` writes ``metrics.json``, ``metrics.md`` and
the predictions in the source's own layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxsql.compare import METRICS
from jaxsql.errors import JaxsqlError
from jaxsql.official.bird import BIRD_SEPARATOR
from jaxsql.scoring import EvalResult, Prediction

_LIST_AT_MOST = 20
_LAYOUTS = {"bird": "bird", "spider": "spider", "wikitq": "tsv"}


@dataclasses.dataclass
class Problems:
    """What a predictions file got wrong (each entry names the example id, key or line)."""

    missing: list[str] = dataclasses.field(default_factory=list)
    extra: list[str] = dataclasses.field(default_factory=list)
    unparseable: list[str] = dataclasses.field(default_factory=list)
    wrong_database: list[str] = dataclasses.field(default_factory=list)
    duplicates: list[str] = dataclasses.field(default_factory=list)
    blank_lines: list[str] = dataclasses.field(default_factory=list)

    def any(self) -> bool:
        """True when anything is listed."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    def describe(self) -> str:
        """One line naming every problem (the first few entries of each kind)."""
        parts = []
        for f in dataclasses.fields(self):
            items = getattr(self, f.name)
            if items:
                shown = ", ".join(items[:_LIST_AT_MOST]) + (", ..." if len(items) > _LIST_AT_MOST else "")
                parts.append(f"{len(items)} {f.name.replace('_', ' ')} ({shown})")
        return "; ".join(parts) + ("; missing and unusable predictions count as wrong" if parts else "")

    def to_json(self) -> dict[str, list[str]]:
        """Every list, in full."""
        return dataclasses.asdict(self)


def layout_for(source: str, fmt: str = "auto", path: str | Path | None = None) -> str:
    """The prediction layout (``bird``, ``spider``, ``tsv`` or ``jsonl``): `fmt` unless ``auto``;
    then JSONL for a ``.jsonl`` file, else the source's own layout."""
    if fmt != "auto":
        return fmt
    if path is not None and Path(path).suffix == ".jsonl":
        return "jsonl"
    return _LAYOUTS.get(source, "jsonl")


def db_id(example: Any) -> str:
    """The database id of a Spider/BIRD example (its database file's stem)."""
    return Path(example.db_path).stem


def read_predictions(path: str | Path, source: str, examples: Sequence[Any],
                     fmt: str = "auto") -> tuple[list[Prediction], Problems]:
    """Predictions aligned with `examples` and the problems of the file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise JaxsqlError(f"--predictions {p}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JaxsqlError(f"--predictions {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    layout = layout_for(source, fmt, p)
    problems = Problems()
    found: dict[int, Prediction] = {}
    if layout == "bird":
        _read_bird(p, text, examples, found, problems)
    elif layout == "spider":
        _read_spider(text, examples, found, problems)
    elif layout == "tsv":
        _read_by_id(_tsv_entries(text, problems), examples, found, problems)
    elif layout == "jsonl":
        _read_by_id(_jsonl_entries(text, problems), examples, found, problems)
    else:
        raise JaxsqlError(f"--format: unknown layout {fmt!r}")
    out = []
    for i, ex in enumerate(examples):
        if i in found:
            out.append(found[i])
        else:
            problems.missing.append(ex.id)
            out.append(Prediction(missing=True))
    return out, problems


def _read_bird(path: Path, text: str, examples: Sequence[Any], found: dict[int, Prediction],
               problems: Problems) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise JaxsqlError(f"--predictions {path}: not BIRD's JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise JaxsqlError(f"--predictions {path}: BIRD predictions are a JSON object {{\"0\": \"SQL\\t----- bird "
                          f"-----\\tdb_id\", ...}}")
    for key, value in data.items():
        if not (isinstance(key, str) and key.isdecimal() and int(key) < len(examples)):
            problems.extra.append(f"key {key!r}")
            continue
        i = int(key)
        if not isinstance(value, str) or BIRD_SEPARATOR not in value:
            problems.unparseable.append(f"key {key!r}")
            continue
        sql, db = value.split(BIRD_SEPARATOR, 1)
        if db.strip() != db_id(examples[i]):
            problems.wrong_database.append(f"key {key!r} names {db.strip()!r}, not {db_id(examples[i])!r}")
            continue
        found[i] = Prediction(sql=sql)


def _read_spider(text: str, examples: Sequence[Any], found: dict[int, Prediction], problems: Problems) -> None:
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are harmless to the released evaluator too
    i = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            problems.blank_lines.append(f"line {lineno}")
            continue
        if i >= len(examples):
            problems.extra.append(f"line {lineno}")
        else:
            found[i] = Prediction(sql=line.strip().split("\t")[0])
        i += 1


def _jsonl_entries(text: str, problems: Problems) -> list[tuple[str, str, Prediction]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            problems.unparseable.append(where)
            continue
        if not isinstance(d, dict) or not isinstance(d.get("id"), (str, int)) or isinstance(d.get("id"), bool):
            problems.unparseable.append(where)
            continue
        if isinstance(d.get("sql"), str):
            pred = Prediction(sql=d["sql"])
        elif isinstance(d.get("answer"), str):
            pred = Prediction(answer=(d["answer"],))
        elif isinstance(d.get("answer"), list) and all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                       for a in d["answer"]):
            pred = Prediction(answer=tuple(str(a) for a in d["answer"]))
        else:
            problems.unparseable.append(f"{where} (needs 'sql' or 'answer')")
            continue
        out.append((str(d["id"]), where, pred))
    return out


def _tsv_entries(text: str, problems: Problems) -> list[tuple[str, str, Prediction]]:
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        out.append((parts[0], f"line {lineno}", Prediction(answer=tuple(parts[1:]))))
    return out


def _read_by_id(entries: Sequence[tuple[str, str, Prediction]], examples: Sequence[Any],
                found: dict[int, Prediction], problems: Problems) -> None:
    index = {ex.id: i for i, ex in enumerate(examples)}
    for ex_id, where, pred in entries:
        i = index.get(ex_id)
        if i is None:
            problems.extra.append(f"id {ex_id!r} ({where})")
        elif i in found:
            problems.duplicates.append(f"id {ex_id!r} ({where}; the first is kept)")
        else:
            found[i] = pred


# ---------------------------------------------------------------------------
# outputs
def write_predictions(out_dir: Path, source: str, split: str | None, examples: Sequence[Any],
                      rows: Sequence[Mapping[str, Any]]) -> Path:
    """The scored predictions in the source's own layout (a missing one is written so it fails)."""
    layout = layout_for(source)
    if layout == "bird":
        path = out_dir / f"predict_{split or 'dev'}.json"
        data = {str(i): f"{r.get('pred_sql') or ''}{BIRD_SEPARATOR}{db_id(ex)}" for i, (ex, r) in
                enumerate(zip(examples, rows))}
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    elif layout == "spider":
        path = out_dir / "predictions.sql"
        lines = [" ".join((r.get("pred_sql") or "SELECT").split()) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif layout == "tsv":
        path = out_dir / "predictions.tsv"
        lines = []
        for r in rows:
            values = r.get("answer") if r.get("answer") is not None else r.get("result_values") or []
            lines.append("\t".join([r["id"], *(" ".join(str(v).split()) for v in values)]))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path = out_dir / "predictions.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for r in rows:
                item = {"id": r["id"], "answer": r["answer"]} if r.get("answer") is not None else \
                    {"id": r["id"], "sql": r.get("pred_sql")}
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def markdown(result: EvalResult, title: str = "Evaluation") -> str:
    """The summary (and the difficulty breakdown) as Markdown tables."""
    s = result.summary
    lines = [f"## {title}", "", f"{int(s.get('n', 0))} examples; execution error rate {_pct(s.get('error_rate'))}%; "
             f"skipped {int(s.get('skipped', 0))}" + (f" ({', '.join(f'{k}: {v}' for k, v in result.skipped.items())})"
                                                       if result.skipped else ""), "",
             "| metric | source | % |", "|---|---|---:|"]
    for m in METRICS:
        if m.name in s:
            lines.append(f"| `{m.name}` | {m.source} | {_pct(s[m.name])} |")
    if result.breakdowns:
        keys = [k for k in ("bird_ex", "spider_ex", "ex_set", "wikitq_accuracy", "denotation_exact", "error_rate")
                if any(k in b for b in result.breakdowns.values())]
        lines += ["", "| difficulty | n | " + " | ".join(f"`{k}`" for k in keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        for name, b in result.breakdowns.items():
            lines.append(f"| {name} | {int(b['n'])} | " + " | ".join(_pct(b.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, source: str, split: str | None, examples: Sequence[Any], result: EvalResult,
                  config: Mapping[str, Any], budgets: Mapping[str, Any], problems: Problems | None,
                  extra: Mapping[str, Any] | None = None) -> str:
    """``metrics.json``, ``metrics.md`` and the predictions file; returns the Markdown."""
    rows = list(result.rows)
    pred_path = write_predictions(out_dir, source, split, examples, rows)
    report = markdown(result)
    limits = {k: sum(1 for r in rows if r.get("limit") == k) for k in ("deadline", "vm_steps", "rows", "bytes")}
    gold_steps = [r["gold_vm_steps"] for r in rows if r.get("gold_vm_steps") is not None]
    metrics = {
        "summary": result.summary, "breakdowns": result.breakdowns, "skipped": result.skipped,
        "limits": limits, "gold_vm_steps_max": max(gold_steps) if gold_steps else None,
        "problems": problems.to_json() if problems is not None else None,
        "missing_ids": [r["id"] for r in rows if r.get("error") == "missing"],
        "budgets": dict(budgets), "config": dict(config), "predictions_file": pred_path.name,
        "metrics": [dataclasses.asdict(m) for m in METRICS], **dict(extra or {}),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False, allow_nan=False,
                                                     default=str) + "\n", encoding="utf-8")
    (out_dir / "metrics.md").write_text(report, encoding="utf-8")
    return report
