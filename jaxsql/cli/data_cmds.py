"""``jaxsql data stats``, ``build``, ``synth``, ``cocte`` and ``tooltraces``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxsql.errors import UsageError


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub` and benchmarks to `bench`."""
    data = sub.add_parser("data", help="datasets: statistics, TFDS builds, the synthetic benchmark")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: _missing(data))

    p = dsub.add_parser("stats", help="count examples and databases, and how many gold queries execute (JSON)")
    p.add_argument("source", help="reader name: spider, bird, geoquery, wikitq, temptabqa_c, jsonl")
    p.add_argument("path", help="the dataset's root directory (or file, for jsonl/geoquery)")
    p.add_argument("--split", default=None, help="split to read (default: the reader's default)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed rows (counted in a warning)")
    p.add_argument("--no-databases", action="store_true", help="read questions without requiring databases")
    p.add_argument("--split-kind", choices=("question", "query"), default=None, help="geoquery: which split")
    p.add_argument("--db-dir", default=None, help="temptabqa_c: where to build the athlete databases")
    p.add_argument("--check", action="store_true",
                   help="temptabqa_c: also run the published SQL per type and count answers reproduced")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per gold query (default 5)")
    p.set_defaults(func=_stats)

    p = dsub.add_parser("build", help="build the TFDS (ArrayRecord) dataset of a source")
    p.add_argument("source", help="spider, bird, geoquery, wikitq, temptabqa_c, jsonl or synthetic")
    p.add_argument("--manual-dir", required=True, help="folder holding the source data")
    p.add_argument("--data-dir", default="tfds_data", help="TFDS output directory (default ./tfds_data)")
    p.add_argument("--config", default=None, help="builder config (geoquery: question or query)")
    p.add_argument("--rebuild", action="store_true",
                   help="replace an existing build whose source folder changed since it was made")
    p.set_defaults(func=_build)

    p = dsub.add_parser("synth", help="write the synthetic benchmark (databases + train/dev JSONL)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=300)
    p.add_argument("--max-level", type=int, choices=(1, 2, 3), default=3,
                   help="difficulty: 1 one-table, 2 +grouping/ordering, 3 +joins/nesting")
    p.add_argument("--cocte", action="store_true",
                   help="also write train.cocte.jsonl / dev.cocte.jsonl: gold SQL as chains of CTEs")
    p.set_defaults(func=_synth)

    p = dsub.add_parser("cocte", help="gold SQL -> chains of CTEs checked by execution (Reward-SQL SFT data, JSONL)")
    p.add_argument("data", metavar="SOURCE:PATH[:SPLIT]",
                   help="examples as `jaxsql eval --data` reads them, e.g. geoquery:../shared/data/geoquery or "
                        "synthetic:DIR:train")
    p.add_argument("--out", required=True, help="JSONL to write (read it back as jsonl:FILE, prompt format cocte)")
    p.add_argument("--multi-step-only", action="store_true",
                   help="drop queries with nothing to lift (kept as one step by default)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per query (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_cocte)

    p = dsub.add_parser("tooltraces", help="multi-turn SFT traces from gold SQL (tool calls with real "
                                           "observations, checked by execution), JSONL")
    p.add_argument("data", metavar="SOURCE:PATH[:SPLIT]",
                   help="examples as `jaxsql eval --data` reads them, e.g. synthetic:DIR:train")
    p.add_argument("--out", required=True,
                   help="JSONL of the examples whose trace is kept (train on it as jsonl:FILE, prompt format tool)")
    p.add_argument("--traces", default=None, metavar="FILE",
                   help="also write every kept trace (segments, calls) as JSONL, for inspection")
    p.add_argument("--peek-share", type=float, default=None, metavar="P",
                   help="share of queries without a filtered text column that get a LIMIT 3 peek (default 0.5)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per query (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_tooltraces)


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _stats(args: argparse.Namespace) -> int:
    from data.readers import read_examples
    from jaxsql.sql.sandbox import execute

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    options: dict = {}
    if args.no_databases:
        options["require_databases"] = False
    if args.split_kind:
        if args.source not in ("geoquery", "text2sql"):
            raise UsageError("--split-kind applies to geoquery only")
        options["split_kind"] = args.split_kind
    if args.db_dir:
        if args.source != "temptabqa_c":
            raise UsageError("--db-dir applies to temptabqa_c only")
        options["db_dir"] = args.db_dir
    examples = read_examples(args.source, args.path, split=args.split, skip_bad=args.skip_bad, **options)
    dbs = sorted({e.db_path for e in examples})
    present = [d for d in dbs if Path(d).is_file()]
    with_sql = [e for e in examples if e.gold_sql]
    executes = 0
    for e in with_sql:
        if Path(e.db_path).is_file() and execute(e.db_path, e.gold_sql, timeout_s=args.timeout,
                                                 max_rows=100_000).ok:
            executes += 1
    out = {
        "source": args.source, "split": args.split, "examples": len(examples), "databases": len(dbs),
        "databases_present": len(present), "with_gold_sql": len(with_sql), "gold_sql_execute": executes,
        "with_gold_answers": sum(1 for e in examples if e.gold_answers),
    }
    if args.check:
        if args.source != "temptabqa_c" or not args.db_dir:
            raise UsageError("--check needs source temptabqa_c and --db-dir")
        from data.temptabqa_check import check_reproduction

        report = check_reproduction(args.path, args.db_dir, split=args.split or "dev")
        out["published_sql"] = {"questions": report.total, "executed": report.executed,
                                "reproduced": report.reproduced, "fraction": round(report.fraction, 4)}
    print(json.dumps(out, indent=1))
    return 0


def _build(args: argparse.Namespace) -> int:
    from data.tfds_builders import build_dataset

    builder = build_dataset(args.source, args.manual_dir, args.data_dir, config=args.config, rebuild=args.rebuild)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(json.dumps({"name": builder.name, "dir": str(builder.data_dir), "splits": splits,
                      "reused": builder.jaxsql_reused}, indent=1))
    return 0


def _synth(args: argparse.Namespace) -> int:
    import time

    from data.synthetic import generate_benchmark

    start = time.perf_counter()
    bench = generate_benchmark(args.out, seed=args.seed, n_train=args.n_train, n_dev=args.n_dev,
                               max_level=args.max_level)
    out = {"out": bench.out_dir, "train": len(bench.train), "dev": len(bench.dev),
           "databases": len(bench.db_paths)}
    if args.cocte:
        from data.synthetic import write_cocte_splits

        out["cocte"] = write_cocte_splits(bench)
    out["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(out, indent=1))
    return 0


def _cocte(args: argparse.Namespace) -> int:
    from data.cocte import cocte_examples, convert_examples, write_jsonl
    from jaxsql.cli.eval_cmds import DataSpec, load_data
    from jaxsql.sql import SqlPool

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    examples = load_data(DataSpec.parse(args.data))
    with SqlPool(timeout_s=args.timeout, max_rows=100_000) as pool:
        report = convert_examples(examples, pool)
    kept = cocte_examples(report, keep_single_step=not args.multi_step_only)
    written = write_jsonl(kept, out)
    print(json.dumps({"out": str(out), "written": written, **report.to_json()}, indent=1))
    return 0


def _tooltraces(args: argparse.Namespace) -> int:
    from data.cocte import write_jsonl
    from data.multiturn import DEFAULT_PEEK_SHARE, build_traces, trace_report, write_traces
    from jaxsql.cli.eval_cmds import DataSpec, load_data
    from jaxsql.sql import SqlPool

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    share = DEFAULT_PEEK_SHARE if args.peek_share is None else args.peek_share
    if not (0.0 <= share <= 1.0):
        raise UsageError(f"--peek-share must be in [0, 1], got {args.peek_share}")
    outs = [Path(args.out)] + ([Path(args.traces)] if args.traces else [])
    if len(outs) == 2 and outs[0].resolve() == outs[1].resolve():
        raise UsageError("--traces must differ from --out")
    for out in outs:
        if out.exists() and not args.overwrite:
            raise UsageError(f"{out} exists; pass --overwrite to replace it")
    examples = load_data(DataSpec.parse(args.data))
    with SqlPool(timeout_s=args.timeout, max_rows=100_000) as pool:
        report = trace_report(examples, build_traces(examples, pool.execute_batch, peek_share=share))
    kept = [e for e, t in report.items if t.kept]
    result = {"out": str(outs[0]), "written": write_jsonl(kept, outs[0])}
    if args.traces:
        result["traces"] = str(outs[1])
        write_traces(report, outs[1])
    print(json.dumps({**result, **report.to_json()}, indent=1))
    return 0
