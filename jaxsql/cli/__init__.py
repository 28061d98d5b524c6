"""The `jaxsql` command: one dispatcher, one module per room of the house.

Each module in `COMMAND_MODULES` has ``register(sub, bench)`` that adds its
subcommands to `sub` and its benchmarks to `bench` (the ``jaxsql bench ...``
group). Every handler is ``handler(args) -> int`` and imports heavy packages
(jax, torch) lazily so that ``jaxsql --help`` and ``jaxsql exec`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from jaxsql.distributed import configure_cpu_devices
from jaxsql.errors import JaxsqlError

COMMAND_MODULES = (
    "jaxsql.cli.sql_cmds",
    "jaxsql.cli.model_cmds",
    "jaxsql.cli.data_cmds",
    "jaxsql.cli.train_cmds",
    "jaxsql.cli.prm_cmds",
    "jaxsql.cli.demo_cmd",
    "jaxsql.cli.study_cmd",
    "jaxsql.cli.eval_cmds",
    "jaxsql.cli.plan_cmds",
)


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on usage errors, which is what we want."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxsql",
        description="Train language models to write SQL by RL from execution feedback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench_parser = sub.add_parser("bench", help="benchmarks (sql, generate, grpo)")
    bench = bench_parser.add_subparsers(dest="bench_target", metavar="TARGET")
    bench_parser.set_defaults(func=lambda args: _missing(bench_parser))
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, bench)
    return parser


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def sampling_bytes(args: argparse.Namespace) -> int | None:
    """The weights' bytes of the model a job that samples on its own (``--model DIR --devices
    auto``: `generate`, `eval`, `bench generate`) reads, from its ``config.json`` (no JAX
    needed), for `configure_cpu_devices`; None for any other job, or when the directory
    cannot be read (the command itself then reports it)."""
    model = getattr(args, "model", None)
    if getattr(args, "devices", None) != "auto" or not isinstance(model, str):
        return None
    from models.config import load_hf_config

    try:
        cfg = load_hf_config(model)  # local, or gs:// through jaxsql.paths
    except Exception:  # unreadable here: the command reads it again and reports what is wrong
        return None
    return cfg.num_params() * _DTYPE_BYTES.get(getattr(args, "dtype", None) or cfg.param_dtype, 4)


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxsql` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        configure_cpu_devices(sampling_bytes=sampling_bytes(args))  # before any command starts JAX
        return int(func(args) or 0)
    except JaxsqlError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
