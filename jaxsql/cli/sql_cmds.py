"""``jaxsql exec``, ``jaxsql compare`` and ``jaxsql bench sql``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxsql.errors import UsageError


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub` and benchmarks to `bench`."""
    p = sub.add_parser("exec", help="run one SQL query in the sandbox and print a JSON result")
    p.add_argument("db", help="SQLite database file (opened read-only)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("sql", nargs="?", default=None, help="the query ('-': read it from standard input)")
    query.add_argument("--file", "-f", default=None, metavar="PATH",
                       help="read the query from this file ('-': standard input), for queries of any size")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="deadline (default 5)")
    p.add_argument("--max-rows", type=int, default=10_000, metavar="N", help="row cap (default 10000)")
    p.add_argument("--max-vm-steps", type=int, default=None, metavar="N",
                   help="budget of SQLite VM instructions: a reproducible timeout (default: none)")
    p.set_defaults(func=_exec)

    p = sub.add_parser("compare", help="compare a predicted query with gold SQL or gold answers")
    p.add_argument("db", help="SQLite database file (opened read-only)")
    p.add_argument("--pred", required=True, help="predicted SQL (or a whole completion: the SQL is extracted)")
    gold = p.add_mutually_exclusive_group(required=True)
    gold.add_argument("--gold", help="gold SQL")
    gold.add_argument("--answer", nargs="+", metavar="VALUE", help="gold answer value(s)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="deadline per query (default 5)")
    p.add_argument("--max-vm-steps", type=int, default=None, metavar="N",
                   help="budget of SQLite VM instructions per query: a reproducible timeout (default: none)")
    p.set_defaults(func=_compare)

    p = bench.add_parser("sql", help="SQL pool throughput vs serial execution")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--queries", type=int, default=512, help="queries per run (default 512)")
    p.add_argument("--workers", type=int, default=None, help="pool threads (default: CPU cores)")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the generated table (default 200000)")
    p.set_defaults(func=_bench)


def _check_limits(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    if getattr(args, "max_rows", 1) < 1:
        raise UsageError(f"--max-rows must be >= 1, got {args.max_rows}")
    if args.max_vm_steps is not None and args.max_vm_steps < 1:
        raise UsageError(f"--max-vm-steps must be >= 1, got {args.max_vm_steps}")


def _read_sql(args: argparse.Namespace) -> str:
    """The query from the command line, a file or standard input (UTF-8; any size up to the sandbox's limit)."""
    source = args.file if args.file is not None else args.sql
    if args.file is None and source != "-":
        return source
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            data = Path(source).read_bytes()
    except OSError as e:
        raise UsageError(f"--file {source}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        name = "standard input" if source == "-" else source
        raise UsageError(f"{name}: the query is not UTF-8 text (byte {e.start})") from None


def _exec(args: argparse.Namespace) -> int:
    from jaxsql.sql import execute

    _check_limits(args)
    sql = _read_sql(args)
    result = execute(args.db, sql, timeout_s=args.timeout, max_rows=args.max_rows,
                     max_vm_steps=args.max_vm_steps)
    print(json.dumps(result.to_json(), ensure_ascii=False, allow_nan=False))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from jaxsql.compare import compare_all
    from jaxsql.extract import extract_sql
    from jaxsql.rewards import EPISODE_REWARDS, REWARDS, RewardConfig, RewardContext
    from jaxsql.sql import execute

    _check_limits(args)
    pred_sql = extract_sql(args.pred)
    limits = dict(timeout_s=args.timeout, max_vm_steps=args.max_vm_steps)
    pred = execute(args.db, pred_sql, **limits)
    gold = execute(args.db, args.gold, **limits) if args.gold is not None else None
    answers = tuple(args.answer) if args.answer is not None else None
    ctx = RewardContext(args.pred, pred_sql, pred, gold, args.gold, answers)
    one_query = {name: fn for name, fn in REWARDS.items() if name not in EPISODE_REWARDS}  # no tool episode here
    defaults = RewardConfig(weights={name: 1.0 for name in one_query})
    out = {
        "pred": pred.to_json(),
        "gold": gold.to_json() if gold is not None else None,
        "metrics": compare_all(pred, gold, answers, args.gold, pred_sql),
        "rewards": {name: fn(ctx, **defaults.kwargs(name)) for name, fn in one_query.items()},
    }
    print(json.dumps(out, ensure_ascii=False))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jaxsql.sql.bench import run_bench

    if args.queries < 1:
        raise UsageError(f"--queries must be >= 1, got {args.queries}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    report = run_bench(queries=args.queries, workers=args.workers, rows=args.rows)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>28}: {value}", file=sys.stdout)
    return 0
