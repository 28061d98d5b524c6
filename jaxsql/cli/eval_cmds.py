"""``jaxsql eval``: score a model (``--model``) or another system's predictions (``--predictions``).

Both modes read ``--data SOURCE:PATH[:SPLIT]``, run every query in the
sandbox's pool, compute every metric (`jaxsql.compare.METRICS`: the official
ones by their benchmarks' names and our variants) and write into ``--out``:
``metrics.json``, ``results.jsonl`` (one row per example, appended as they
finish; a rerun with the same settings skips finished examples),
``predictions.*`` in the source's own layout, and ``metrics.md`` (also
printed). Bad input is refused with one line before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from jaxsql.config import changed_settings, read_saved_settings
from jaxsql.errors import JaxsqlError, UsageError
from jaxsql.paths import AnyPath, as_path, is_remote

#: The budget that decides whether a slow query times out in evaluation: SQLite VM instructions,
#: the same on every machine at any load (about 5 s of SQLite work on an idle core).
DEFAULT_EVAL_VM_STEPS = 500_000_000
#: Wall-clock limit per query in evaluation: only a guard against a stuck machine, well above
#: what the VM-step budget takes even on a busy one, so that it does not decide.
DEFAULT_EVAL_TIMEOUT_S = 300.0
SOURCES = ("bird", "spider", "geoquery", "text2sql", "wikitq", "temptabqa_c", "jsonl", "synthetic")
PREDICTION_FORMATS = ("auto", "bird", "spider", "jsonl", "tsv")
#: `rl.evaluate.SELECTORS` by name (kept here so that ``jaxsql --help`` does not import rl).
SELECT_CHOICES = ("greedy", "vote", "prm-best-of-n", "prm-beam")
#: `rl.prm_score.AGGREGATIONS` by name.
AGGREGATE_CHOICES = ("min", "product", "mean", "last", "entropy")
CONFIG_FILE = "eval_config.json"
RESULTS_FILE = "results.jsonl"


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``jaxsql eval`` to `sub` (this room has no benchmark target)."""
    p = sub.add_parser(
        "eval", help="score a model or a predictions file with every metric (official and ours)",
        description="Generate SQL with a model (--model) or read another system's predictions (--predictions), "
                    "execute them in the sandbox and report every metric: the official ones (BIRD, Spider "
                    "test suite, QATCH, Think2SQL, WikiTQ) by their names and our own variants. See docs/eval.md.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="HF checkpoint directory with its tokenizer")
    what.add_argument("--predictions", help="predictions file: BIRD JSON, Spider one-SQL-per-line, JSONL "
                                            "({id, sql} or {id, answer}), or WikiTQ TSV")
    p.add_argument("--data", required=True, metavar="SOURCE:PATH[:SPLIT]",
                   help=f"the examples, e.g. bird:/data/bird:dev; SOURCE is one of {', '.join(SOURCES)}")
    p.add_argument("--out", default="./eval_out", help="output directory, local or gs://... (default ./eval_out)")
    p.add_argument("--format", choices=PREDICTION_FORMATS, default="auto",
                   help="layout of --predictions (default: the source's own)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a predictions file with missing, extra or unparseable entries")
    g = p.add_argument_group("generation (--model)")
    g.add_argument("--select", choices=SELECT_CHOICES, default="greedy",
                   help="greedy; vote (self-consistency over --n samples); prm-best-of-n (--n CoCTE samples, the "
                        "executable one with the best PRM score); prm-beam (step-level beam search guided by "
                        "the PRM)")
    g.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="samples per example for vote and prm-best-of-n (default 8)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature for vote and the PRM strategies (default 1)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt-format", choices=["plain", "think", "cocte", "tool"], default="plain",
                   help="the policy's prompt format (tool: with --multi-turn)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--max-prompt-len", type=int, default=None, help="keep the last N prompt tokens")
    g.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (default 64)")
    g.add_argument("--schema-style", default="compact", help="schema serialisation (data.schema)")
    g.add_argument("--sample-values", type=int, default=0, help="sample values per column in the schema")
    g.add_argument("--devices", default="auto", help="devices to split generation over: auto or N")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    t = p.add_argument_group("multi-turn tool use (--multi-turn, --prompt-format tool; docs/multiturn.md)")
    t.add_argument("--multi-turn", action="store_true",
                   help="the model may run read-only SQL on the example's database while it answers "
                        "(<sql>...</sql>, result as an observation); its final <solution> is the prediction")
    t.add_argument("--max-turns", type=int, default=None, help="tool calls per episode (default 3)")
    t.add_argument("--tool-max-rows", type=int, default=None, help="result rows an observation shows (default 10)")
    t.add_argument("--tool-max-cell-chars", type=int, default=None,
                   help="characters shown of one cell (default 40)")
    t.add_argument("--tool-max-chars", type=int, default=None,
                   help="characters of an observation's body (default 1000)")
    t.add_argument("--tool-max-sql-s", type=float, default=None,
                   help="SQL seconds per episode; a call past it is refused (default 10)")
    r = p.add_argument_group("PRM-guided selection (--select prm-best-of-n | prm-beam, --prompt-format cocte)")
    r.add_argument("--prm", default=None, metavar="DIR",
                   help="process reward model directory (jaxsql prm init / prm train); its tokenizer must be "
                        "the policy's")
    r.add_argument("--prm-aggregate", choices=AGGREGATE_CHOICES, default="min",
                   help="step scores -> trajectory score (default min, the released best-of-N's)")
    r.add_argument("--prm-tau", type=float, default=1.0, help="temperature of --prm-aggregate entropy")
    r.add_argument("--prm-max-len", type=int, default=2048, help="longest PRM row in tokens (default 2048)")
    r.add_argument("--beam-width", type=int, default=2, help="prm-beam: beams kept per depth (default 2)")
    r.add_argument("--beam-expand", type=int, default=4,
                   help="prm-beam: candidate next steps sampled per beam (default 4)")
    r.add_argument("--beam-max-steps", type=int, default=8, help="prm-beam: most steps per completion (default 8)")
    s = p.add_argument_group("scoring")
    s.add_argument("--max-vm-steps", type=int, default=DEFAULT_EVAL_VM_STEPS, metavar="N",
                   help=f"SQLite VM-instruction budget per query, reproducible at any load "
                        f"(default {DEFAULT_EVAL_VM_STEPS:,}; 0: none)")
    s.add_argument("--timeout", type=float, default=DEFAULT_EVAL_TIMEOUT_S, metavar="SECONDS",
                   help=f"wall-clock limit per query, a guard against a stuck machine "
                        f"(default {DEFAULT_EVAL_TIMEOUT_S:g})")
    s.add_argument("--score-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="host-side scoring deadline per example (default 10)")
    s.add_argument("--workers", type=int, default=None, help="SQL pool threads (default: CPU cores)")
    s.add_argument("--keep-distinct", action="store_true", help="Spider test suite's --keep_distinct")
    s.add_argument("--no-test-suite", action="store_true",
                   help="Spider layout: check only the example's database, not every *.sqlite beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``SOURCE:PATH[:SPLIT]``."""

    source: str
    path: str
    split: str | None

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        source, sep, rest = text.partition(":")
        if not sep or not rest:
            raise UsageError(f"--data: expected SOURCE:PATH[:SPLIT], got {text!r}")
        if source not in SOURCES:
            raise UsageError(f"--data: unknown source {source!r}; expected one of {', '.join(SOURCES)}")
        path, split = rest, None
        if ":" in rest:
            path, split = rest.rsplit(":", 1)
            split = split or None
        return cls(source, path, split)


def load_data(spec: DataSpec) -> list[Any]:
    """The examples of `spec` (one clear error for a wrong path, layout or split)."""
    if spec.source == "synthetic":
        from data.synthetic import load_benchmark

        split = spec.split or "dev"
        if split not in ("train", "dev"):
            raise JaxsqlError(f"synthetic: unknown split {split!r}; expected 'train' or 'dev'")
        bench = load_benchmark(spec.path)
        examples = list(bench.train if split == "train" else bench.dev)
    else:
        from data.readers import read_examples

        if spec.source == "jsonl" and spec.split:
            raise JaxsqlError(f"jsonl: a JSONL file is one split; drop ':{spec.split}' from --data")
        examples = read_examples(spec.source, spec.path, split=spec.split)
    if not examples:
        raise JaxsqlError(f"{spec.source}:{spec.path}: no examples")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise JaxsqlError(f"{spec.source}:{spec.path}: example ids are not unique")
    return examples


def _check_args(args: argparse.Namespace) -> None:
    import math

    for name in ("timeout", "score_timeout"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise UsageError(f"--{name.replace('_', '-')}: must be a positive number of seconds, got {v}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers: must be >= 1, got {args.workers}")
    if args.max_vm_steps < 0:
        raise UsageError(f"--max-vm-steps: must be >= 0 (0: no budget), got {args.max_vm_steps}")
    if args.predictions is not None:
        if args.prm is not None:
            raise UsageError("--prm: only used with --model (PRM-guided selection of generated samples)")
        if args.multi_turn:
            raise UsageError("--multi-turn: only used with --model (the model runs SQL while it answers)")
        return
    _check_multi_turn(args)
    if args.select in ("greedy", "prm-beam") and args.n not in (None, 1):
        raise UsageError(f"--n: --select {args.select} takes one sample; use --select vote or prm-best-of-n")
    prm_select = args.select.startswith("prm-")
    if prm_select and args.prm is None:
        raise UsageError(f"--select {args.select}: needs a process reward model, --prm DIR")
    if args.prm is not None and not prm_select:
        raise UsageError(f"--prm: only used by --select prm-best-of-n or prm-beam, not {args.select}")
    if prm_select and args.prompt_format != "cocte":
        raise UsageError(f"--select {args.select}: scores CoCTE steps, so the policy must answer in that form "
                         f"(--prompt-format cocte)")
    for name in ("prm_max_len", "beam_width", "beam_expand", "beam_max_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1")
    if not args.prm_tau > 0:
        raise UsageError(f"--prm-tau: must be > 0, got {args.prm_tau}")
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n: must be >= 1, got {args.n}")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1")
    if args.max_prompt_len is not None and args.max_prompt_len < 1:
        raise UsageError("--max-prompt-len: must be >= 1")
    if args.select != "greedy" and not args.temperature > 0:
        raise UsageError(f"--temperature: must be > 0 for sampling, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p: must be in (0, 1], got {args.top_p}")


_TOOL_FLAGS = {"max_turns": "max_turns", "tool_max_rows": "max_rows", "tool_max_cell_chars": "max_cell_chars",
               "tool_max_chars": "max_chars", "tool_max_sql_s": "max_sql_s"}


def _check_multi_turn(args: argparse.Namespace) -> None:
    """--multi-turn goes with --prompt-format tool and a greedy or vote selection; the tool flags with it."""
    if args.multi_turn:
        if args.prompt_format != "tool":
            raise UsageError(f"--multi-turn: the policy must answer in the tool prompt format (--prompt-format "
                             f"tool), got {args.prompt_format}")
        if args.select not in ("greedy", "vote"):
            raise UsageError(f"--multi-turn: selection {args.select} is not available; use greedy or vote")
        _tool_config(args)  # a bad value: one line naming the flag's field
    else:
        if args.prompt_format == "tool":
            raise UsageError("--prompt-format tool: the model's SQL calls must run; add --multi-turn")
        given = [f"--{f.replace('_', '-')}" for f in _TOOL_FLAGS if getattr(args, f) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only used with --multi-turn")


def _tool_config(args: argparse.Namespace) -> Any:
    """The `jaxsql.tools.ToolConfig` of the tool flags (defaults for those not given)."""
    from jaxsql.tools import ToolConfig

    return ToolConfig(**{field: getattr(args, f) for f, field in _TOOL_FLAGS.items() if getattr(args, f) is not None})


def _run_config(args: argparse.Namespace, spec: DataSpec) -> dict[str, Any]:
    """What defines a run (a rerun with the same values resumes)."""
    cfg: dict[str, Any] = {"data": dataclasses.asdict(spec), "timeout_s": args.timeout,
                           "max_vm_steps": args.max_vm_steps or None,
                           "keep_distinct": args.keep_distinct, "test_suite": _test_suite(args, spec)}
    if args.predictions is not None:
        cfg.update(predictions=str(Path(args.predictions).resolve()), format=args.format)
    else:
        cfg.update(model=args.model if is_remote(args.model) else str(Path(args.model).resolve()), select=args.select, n=_samples(args),
                   temperature=args.temperature if args.select != "greedy" else None,
                   top_p=args.top_p if args.select != "greedy" else None, seed=args.seed,
                   prompt_format=args.prompt_format, max_new_tokens=args.max_new_tokens,
                   max_prompt_len=args.max_prompt_len, batch_size=args.batch_size,
                   schema_style=args.schema_style, sample_values=args.sample_values, dtype=args.dtype)
        if args.multi_turn:
            cfg.update(multi_turn=dataclasses.asdict(_tool_config(args)))
        if args.prm is not None:
            cfg.update(prm=args.prm if is_remote(args.prm) else str(Path(args.prm).resolve()), prm_aggregate=args.prm_aggregate,
                       prm_tau=args.prm_tau if args.prm_aggregate == "entropy" else None,
                       prm_max_len=args.prm_max_len)
            if args.select == "prm-beam":
                cfg.update(beam_width=args.beam_width, beam_expand=args.beam_expand,
                           beam_max_steps=args.beam_max_steps)
    return cfg


def _test_suite(args: argparse.Namespace, spec: DataSpec) -> bool:
    """Spider's test suite: every database beside the example's (the Spider layout only)."""
    return spec.source == "spider" and not args.no_test_suite


def _samples(args: argparse.Namespace) -> int:
    return 1 if args.select in ("greedy", "prm-beam") else (args.n or 8)


def _prepare_out(out: AnyPath, config: dict[str, Any]) -> None:
    """Create `out`, or check that it holds a run with the same settings (to resume)."""
    if out.exists() and not out.is_dir():
        raise JaxsqlError(f"--out {out}: exists and is not a directory")
    marker = out / CONFIG_FILE
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise JaxsqlError(f"--out {out}: a non-empty directory that is not a jaxsql eval output; "
                              f"choose another --out")
        changed = changed_settings(read_saved_settings(marker, "jaxsql eval settings"), config)
        if changed:
            raise JaxsqlError(f"--out {out}: holds a run with different settings ({', '.join(changed)}); "
                              f"choose another --out to keep both")
        return
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")


def _eval(args: argparse.Namespace) -> int:
    from jaxsql.distributed import initialize_from_env, is_lead_process
    from jaxsql.predictions import read_predictions, write_outputs
    from jaxsql.scoring import ResultsLog, ScoringOptions, answer_canon_from_tagged, score_all

    _check_args(args)
    spec = DataSpec.parse(args.data)
    model = None
    if args.model is not None:
        initialize_from_env()
        model = _load_model(args)  # config and tokenizer before the data, the weights after it
    examples = load_data(spec)
    predictions = problems = None
    if args.predictions is not None:
        predictions, problems = read_predictions(args.predictions, spec.source, examples, args.format)
        if any(p.answer is not None for p in predictions) and not any(e.gold_answers for e in examples):
            raise JaxsqlError(f"--predictions {args.predictions}: answer values need examples with gold answers")
        if problems.any():
            if args.strict:
                raise JaxsqlError(f"--predictions {args.predictions}: {problems.describe()}")
            print(f"warning: --predictions {args.predictions}: {problems.describe()}", file=sys.stderr, flush=True)
    else:
        model = (*model, _load_weights(args, model[0]), _load_prm(args, model[1]))
    out = as_path(args.out)  # local, or gs://... (jaxsql.paths)
    config = _run_config(args, spec)
    lead = is_lead_process()
    if lead:
        _prepare_out(out, config)
    canon = answer_canon_from_tagged(spec.path) if spec.source == "wikitq" else {}
    scoring = ScoringOptions(keep_distinct=args.keep_distinct, test_suite=_test_suite(args, spec),
                             timeout_s=args.score_timeout, answer_canon=canon)
    log = ResultsLog(out / RESULTS_FILE) if (lead or (out / RESULTS_FILE).exists()) else None
    with _pool(args) as pool:
        if predictions is not None:
            result = score_all(pool, examples, predictions, scoring, log, progress=not args.no_progress)
        else:
            result = _evaluate_model(args, model, examples, pool, scoring, log)
        budgets = _budgets(pool)
    if lead:
        extra = {"wikitq_canonical_forms": "tagged files" if canon else "computed"} if spec.source == "wikitq" else {}
        print(write_outputs(out, spec.source, spec.split, examples, result, config, budgets, problems, extra),
              end="")
    return 0


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from jaxsql.cli.model_cmds import load_tokenizer
    from models.config import load_hf_config

    model_dir = args.model  # local, or gs://... (config and tokenizer read through jaxsql.paths)
    if not as_path(model_dir).is_dir():
        raise JaxsqlError(f"--model {model_dir}: not a directory")
    overrides = {"param_dtype": args.dtype} if args.dtype else {}
    cfg = load_hf_config(model_dir, **overrides)
    return cfg, load_tokenizer(model_dir, cfg.vocab_size)


def _load_weights(args: argparse.Namespace, cfg: Any) -> Any:
    from jaxsql.cli.model_cmds import sampling_mesh
    from models.hf_io import load_hf_checkpoint

    _, params = load_hf_checkpoint(args.model, param_dtype=args.dtype, mesh=sampling_mesh(args.model, args))
    return params


def _load_prm(args: argparse.Namespace, policy_tokenizer: Any) -> Any:
    """The PRM of --prm (None without), checked to read the policy's tokens."""
    if args.prm is None:
        return None
    from models.prm import check_matches_policy, load_prm

    if not as_path(args.prm).is_dir():  # local or gs:// (load_prm copies a bucket directory to local disk)
        raise JaxsqlError(f"--prm {args.prm}: not a directory")
    prm = load_prm(args.prm, param_dtype=args.dtype)
    check_matches_policy(prm, policy_tokenizer, args.model)
    return prm


def _prm_guide(args: argparse.Namespace, prm: Any, tok: Any, cfg: Any) -> Any:
    """The `rl.evaluate.PrmGuide` of the PRM flags; the PRM reads the policy's prompt ids."""
    if prm is None:
        return None
    from rl.evaluate import PrmGuide, encode_prompts, schema_cache
    from rl.prm_search import prm_step_scorer

    schema = schema_cache(args.schema_style, args.sample_values)
    cache: dict[int, list[int]] = {}

    def prompt_ids(ex: Any) -> list[int]:
        if id(ex) not in cache:
            cache[id(ex)] = encode_prompts([ex], tok, schema, "cocte", args.max_prompt_len)[0]
        return cache[id(ex)]

    return PrmGuide(prm_step_scorer(prm, prompt_ids, max_len=args.prm_max_len), aggregate=args.prm_aggregate,
                    tau=args.prm_tau, beam_width=args.beam_width, beam_expand=args.beam_expand,
                    beam_max_steps=args.beam_max_steps)


def _evaluate_model(args: argparse.Namespace, model: tuple[Any, Any, Any, Any], examples: Sequence[Any],
                    pool: Any, scoring: Any, log: Any) -> Any:
    from rl.evaluate import evaluate, schema_cache

    cfg, tok, params, prm = model
    return evaluate(params, cfg, tok, examples, pool, prompt_format=args.prompt_format,
                    schema=schema_cache(args.schema_style, args.sample_values),
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    max_prompt_len=args.max_prompt_len, select=args.select, num_samples=_samples(args),
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, scoring=scoring, log=log,
                    progress=not args.no_progress, prm=_prm_guide(args, prm, tok, cfg),
                    multi_turn=args.multi_turn, tools=_tool_config(args) if args.multi_turn else None)


def _pool(args: argparse.Namespace):
    from jaxsql.sql import SqlPool

    return SqlPool(args.workers, timeout_s=args.timeout, max_vm_steps=args.max_vm_steps or None)


def _budgets(pool: Any) -> dict[str, Any]:
    """The execution budgets every query ran under (both reported in metrics.json)."""
    return {"timeout_s": pool.timeout_s, "max_vm_steps": pool.max_vm_steps, "max_rows": pool.max_rows,
            "max_bytes": pool.max_bytes}
