"""Learning commands: `jaxsql sft`, `jaxsql train`, `jaxsql export`, `jaxsql bench grpo`."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (see docs/training.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run_dir from its latest checkpoint")
    p.add_argument("--resume-from-previous", action="store_true",
                   help="like --resume, but if the latest checkpoint cannot be restored (truncated, damaged) "
                        "move it aside and continue from the one before (checkpoint.fallback_to_previous)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.learning_rate=1e-5 algo.beta=0")


def _finite(v):
    # strict JSON: a NaN or infinite metric is printed as null, never as NaN
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _summary(out: dict) -> dict:
    last = out["history"][-1] if out["history"] else {}
    keep = ("reward/mean", "sql/ex", "sql/error_rate", "train/loss", "train/nll", "time/step_s")
    return {"step": out["step"], "stopped_by_signal": out["stopped"],
            **{k: _finite(last[k]) for k in keep if k in last}}


def _print_summary(out: dict) -> None:
    print(json.dumps(_summary(out), allow_nan=False))


def _load(args: argparse.Namespace, loader):
    overrides = list(args.overrides)
    if args.resume_from_previous:
        overrides.append("checkpoint.fallback_to_previous=true")
    return loader(args.config, overrides), args.resume or args.resume_from_previous


def _train(args: argparse.Namespace) -> int:
    from jaxsql.distributed import initialize_from_env
    from rl.config import load_train_config
    from rl.trainer import train

    initialize_from_env()  # multi-host (tpu_scripts/launch.sh) before any device is touched
    cfg, resume = _load(args, load_train_config)
    _print_summary(train(cfg, resume=resume))
    return 0


def _sft(args: argparse.Namespace) -> int:
    from jaxsql.distributed import initialize_from_env
    from rl.config import load_sft_config
    from rl.sft import sft

    initialize_from_env()
    cfg, resume = _load(args, load_sft_config)
    _print_summary(sft(cfg, resume=resume))
    return 0


def _export(args: argparse.Namespace) -> int:
    from rl.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, step=args.step, tokenizer=args.tokenizer,
                            overwrite=args.overwrite)
    print(json.dumps({"exported": str(out)}))
    return 0


def _bench_grpo(args: argparse.Namespace) -> int:
    from jaxsql.errors import JaxsqlError
    from rl.bench import run_bench, run_bench_multi_turn

    if args.multi_turn:
        if args.compare_trl:
            raise JaxsqlError("bench grpo: --compare-trl has no multi-turn counterpart; drop one of them")
        result = run_bench_multi_turn(args.model, steps=args.steps, warmup=args.warmup, prompts=args.prompts,
                                      generations=args.generations, new_tokens=args.new_tokens or 128,
                                      max_prompt_len=args.prompt_len or 320, beta=args.beta)
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    result = run_bench(args.model, steps=args.steps, warmup=args.warmup, compare_trl=args.compare_trl,
                       prompts=args.prompts, generations=args.generations, prompt_len=args.prompt_len or 128,
                       new_tokens=args.new_tokens or 64, beta=args.beta)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub` and benchmarks to `bench`."""
    p = sub.add_parser("train", help="GRPO training with execution rewards (YAML config)")
    _add_config_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("sft", help="SFT cold start: cross-entropy on gold completions")
    _add_config_args(p)
    p.set_defaults(func=_sft)

    p = sub.add_parser("export", help="export a training checkpoint to Hugging Face format")
    p.add_argument("--checkpoint", required=True, help="run directory (or its checkpoints/ folder)")
    p.add_argument("--out", required=True, help="output directory for the HF checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    p.set_defaults(func=_export)

    b = bench.add_parser("grpo", help="seconds per GRPO step on a fixed workload (JSON)")
    b.add_argument("--model", required=True, help="HF checkpoint directory (e.g. from `jaxsql model init`)")
    b.add_argument("--compare-trl", action="store_true", help="also run TRL's GRPOTrainer on the same workload")
    b.add_argument("--steps", type=int, default=3, help="timed steps")
    b.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
    b.add_argument("--prompts", type=int, default=4)
    b.add_argument("--generations", type=int, default=8)
    b.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens (default 128; with --multi-turn the longest prompt kept, default 320)")
    b.add_argument("--new-tokens", type=int, default=None,
                   help="completion tokens (default 64; with --multi-turn the episode's budget, default 128)")
    b.add_argument("--multi-turn", action="store_true",
                   help="the multi-turn workload: the real trainer with SQL tool calls on the synthetic benchmark")
    b.add_argument("--beta", type=float, default=0.04)
    b.set_defaults(func=_bench_grpo)
