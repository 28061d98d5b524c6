"""`jaxsql study`: the three methods (answers-only GRPO, Think2SQL dense rewards, Reward-SQL with a
PRM) trained and evaluated side by side on the synthetic benchmark over seeds."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``jaxsql study`` to `sub` (this room has no benchmark target)."""
    p = sub.add_parser(
        "study",
        help="run the three methods side by side on the synthetic benchmark (seeds, one table)",
        description=(
            "For each seed: the demo's data and plain SFT cold start, a CoCTE cold start, PRM labels and "
            "training, then GRPO per arm (execution reward from answers; Think2SQL's gated dense reward with "
            "group, batch or no advantage scaling; Reward-SQL with the PRM's process reward), each policy "
            "evaluated on the dev split by `jaxsql eval` with every selector. Writes OUT/study.md (mean and "
            "range over the seeds) and OUT/study.png. Rerunning on the same --out resumes. See docs/study.md."),
    )
    p.add_argument("--out", default="./study_out", help="output directory (default ./study_out)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --smoke: 0)")
    p.add_argument("--arms", default=None,
                   help="comma-separated arms (default the three methods: answers, dense_group, dense_batch, "
                        "dense_none, rewardsql; add multiturn for the multi-turn tool-use arm)")
    p.add_argument("--smoke", action="store_true", help="every phase for a few steps with a tiny model (CI)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or phase lines")
    p.set_defaults(func=_study)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from jaxsql.errors import UsageError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag}: expected at least one value")
    return values


def _study(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from jaxsql.errors import UsageError
    from rl.study import ARMS, StudyConfig, main_summary, run_study, smoke_config

    config = smoke_config() if args.smoke else StudyConfig()
    changes: dict = {}
    if args.seeds is not None:
        changes["seeds"] = _ints(args.seeds, "--seeds")
    if args.arms is not None:
        arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
        unknown = [a for a in arms if a not in ARMS]
        if unknown or not arms:
            raise UsageError(f"--arms: unknown {unknown}; arms are {', '.join(ARMS)}")
        changes["arms"] = arms
    if changes:
        config = dataclasses.replace(config, **changes)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    state = run_study(args.out, config, say=say, progress=not args.quiet)
    if state.get("interrupted"):
        print(f"study stopped during '{state['interrupted']}' (checkpoint saved); rerun the same command to "
              f"continue", file=sys.stderr)
        return 130
    print(main_summary(state, config))
    print(f"table: {args.out}/study.md")
    return 0
