"""`jaxsql demo`: the main job on the embedded default (SFT -> GRPO -> evaluation -> HF export)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``jaxsql demo`` to `sub` (this room has no benchmark target)."""
    p = sub.add_parser(
        "demo",
        help="run the CPU demo: synthetic data, SFT, GRPO from answers, evaluation, HF export",
        description=(
            "Generate the synthetic benchmark, train a tokenizer and a small decoder (SFT cold start), "
            "improve it with GRPO using an execution reward computed from gold answers only, evaluate "
            "greedy decoding on the dev split before and after RL, and export an HF checkpoint. "
            "Rerunning on the same --out resumes where it stopped."),
    )
    p.add_argument("--out", default="./demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock cap shared by the phases (default 30); the phases run a fixed number "
                        "of steps and the report names a phase the cap cut short")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling (default 0)")
    p.add_argument("--smoke", action="store_true", help="a few steps of every phase with a tiny model (CI)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or phase lines")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import sys

    from jaxsql.errors import UsageError
    from rl.demo import DemoConfig, run_demo, smoke_config

    if args.minutes is not None and args.minutes <= 0:
        raise UsageError("--minutes: must be > 0")
    if args.smoke:
        config = smoke_config(seed=args.seed, minutes=args.minutes or 10.0)
    else:
        config = DemoConfig(seed=args.seed, minutes=args.minutes or DemoConfig.minutes)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    state = run_demo(args.out, config, say=say, progress=not args.quiet)
    if state.get("interrupted"):
        print(f"demo stopped during phase '{state['interrupted']}' (checkpoint saved); rerun the same "
              f"command to continue", file=sys.stderr)
        return 130
    before = state["phases"].get("eval_sft", {}).get("summary", {})
    after = state["phases"].get("eval_rl", {}).get("summary", {})
    if before and after:
        print(f"dev EX (set): SFT {100 * before['ex_set']:.1f}% -> GRPO {100 * after['ex_set']:.1f}% "
              f"({100 * (after['ex_set'] - before['ex_set']):+.1f} pts); report: {args.out}/report.md")
    return 0
