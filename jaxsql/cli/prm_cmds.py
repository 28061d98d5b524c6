"""Process reward model commands: ``jaxsql prm init / label / train / score``.

Reward-SQL's PRM (see ``docs/rewardsql.md``). jax and transformers are
imported inside the handlers so that the dispatcher starts fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxsql.errors import JaxsqlError, UsageError


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub`."""
    prm = sub.add_parser("prm", help="process reward model (Reward-SQL): init, step labels, training, step scores")
    psub = prm.add_subparsers(dest="prm_command", metavar="ACTION")
    prm.set_defaults(func=lambda args: _help(prm))

    p = psub.add_parser("init", help="a PRM directory from a policy checkpoint (same decoder and tokenizer)")
    p.add_argument("--policy", required=True, help="HF checkpoint directory of the policy (with its tokenizer)")
    p.add_argument("--out", required=True, help="PRM directory to write")
    p.add_argument("--head", choices=("lm", "value"), default="lm",
                   help="lm: the released form, P(good) read at the step tag; value: a scalar head, exported as "
                        "*ForTokenClassification, starting from the same scores (default lm)")
    p.add_argument("--step-tag", default=None, help="text after each step's result (default ' и', as released)")
    p.add_argument("--good-token", default=None, help="the lm head's positive candidate (default ' +')")
    p.add_argument("--bad-token", default=None, help="the lm head's negative candidate (default ' -')")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty directory that is not an export")
    p.set_defaults(func=_init)

    p = psub.add_parser("label", help="step labels of sampled CoCTE trajectories (execution + k continuations)")
    p.add_argument("--policy", required=True, help="HF checkpoint directory of the (CoCTE SFT) policy")
    _add_data_args(p)
    p.add_argument("--k", type=int, required=True, help="continuations sampled per step")
    p.add_argument("--out", required=True, help="label file (JSONL); rerunning with the same settings resumes")
    p.add_argument("--trajectories", type=int, default=4, help="trajectories sampled per example (default 4)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch, the unit of resuming")
    p.add_argument("--limit", type=int, default=None, help="label the first N examples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_label)

    p = psub.add_parser("train", help="train a PRM on step labels through the shared loop (YAML config)")
    from jaxsql.cli.train_cmds import _add_config_args

    _add_config_args(p)
    p.set_defaults(func=_train)

    p = psub.add_parser("score", help="per-step and trajectory PRM scores of completions (JSON lines)")
    p.add_argument("--prm", required=True, help="PRM directory (jaxsql prm init, or any causal LM: the lm head)")
    _add_data_args(p)
    p.add_argument("--completions", required=True,
                   help='JSONL with one {"id": example id, "completion": text} per line')
    p.add_argument("--head", choices=("lm", "value"), default=None, help="refuse a PRM with the other head")
    p.add_argument("--policy", default=None,
                   help="policy directory: adds the entropy-weighted score (needs the PRM's tokenizer)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of the entropy weighting (nats)")
    p.add_argument("--max-len", type=int, default=2048, help="longest PRM input in tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_score)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """Examples, and how their prompts and queries are bounded."""
    p.add_argument("--data", required=True, metavar="SOURCE:PATH[:SPLIT]",
                   help="examples as `jaxsql eval --data` reads them, e.g. synthetic:DIR:train")
    p.add_argument("--max-prompt-len", type=int, default=512, help="prompt tokens kept (the last ones)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per query (default 5)")
    p.add_argument("--max-vm-steps", type=int, default=None, metavar="N",
                   help="SQLite VM-instruction budget per query: whether a slow step fails no longer depends on "
                        "machine load (default: the deadline only)")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _positive(name: str, value: float | int | None) -> None:
    """A usage error unless `value` is None or a finite number > 0 (checked before any work)."""
    if value is not None and not (0 < value < math.inf):
        raise UsageError(f"{name} must be a finite number > 0, got {value}")


def _load_policy(path: str):
    from jaxsql.cli.model_cmds import load_tokenizer
    from models.hf_io import load_hf_checkpoint

    from jaxsql.paths import as_path

    if not as_path(path).is_dir():  # local or gs:// (staged by load_hf_checkpoint / load_tokenizer)
        raise JaxsqlError(f"policy directory not found: {path}")
    cfg, params = load_hf_checkpoint(path)
    return cfg, params, load_tokenizer(path, cfg.vocab_size)


def _init(args: argparse.Namespace) -> int:
    import dataclasses

    from models.prm import PrmConfig, candidate_ids, save_prm, value_head_from_lm

    cfg, params, tok = _load_policy(args.policy)
    over = {k: v for k, v in (("step_tag", args.step_tag), ("good_token", args.good_token),
                              ("bad_token", args.bad_token)) if v is not None}
    prm_cfg = dataclasses.replace(PrmConfig(head=args.head), **over)
    cands = candidate_ids(prm_cfg, tok)
    if args.head == "value":
        cfg, params = value_head_from_lm(params, cfg, cands)
    out = save_prm(args.out, prm_cfg, cfg, params, tokenizer_dir=args.policy, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), "head": args.head, "candidates": list(cands),
                      "architecture": json.loads((out / "config.json").read_text())["architectures"][0]}))
    return 0


def _label(args: argparse.Namespace) -> int:
    from jaxsql.cli.eval_cmds import DataSpec, load_data
    from jaxsql.sql import SqlPool
    from rl.prm_label import LabelSettings, policy_sampler, run_labeling
    from rl.rollout import PromptEncoder
    from jaxsql.paths import is_remote
    from rl.setup import special_ids

    for name in ("--timeout", "--limit", "--max-vm-steps"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    settings = LabelSettings(k=args.k, trajectories=args.trajectories, temperature=args.temperature,
                             top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             seed=args.seed, max_prompt_len=args.max_prompt_len)
    examples = load_data(DataSpec.parse(args.data))[: args.limit]
    cfg, params, tok = _load_policy(args.policy)
    stop_ids, pad_id = special_ids(tok, cfg)
    encoder = PromptEncoder(tok, "cocte", args.max_prompt_len)
    sample = policy_sampler(params, cfg, tok, settings=settings, stop_ids=stop_ids, pad_id=pad_id)
    meta = {"policy": args.policy if is_remote(args.policy) else str(Path(args.policy).resolve()), "data": args.data, "limit": args.limit,
            "max_vm_steps": args.max_vm_steps}
    with SqlPool(timeout_s=args.timeout, max_vm_steps=args.max_vm_steps) as pool:
        stats = run_labeling(examples, args.out, pool=pool, prompt_ids=encoder, sample=sample, settings=settings,
                             meta=meta, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), **stats}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from jaxsql.cli.train_cmds import _load
    from jaxsql.distributed import initialize_from_env
    from rl.config import load_prm_train_config
    from rl.prm_train import prm_train, summary

    initialize_from_env()
    cfg, resume = _load(args, load_prm_train_config)
    print(json.dumps(summary(prm_train(cfg, resume=resume)), allow_nan=False))
    return 0


def read_completions(path: str | Path) -> list[tuple[str, str]]:
    """``(id, completion)`` pairs of a completions JSONL; a bad line is one clear error."""
    from rl.prm import json_lines

    out = []
    for where, d in json_lines(path, "completions file"):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(d.get("completion"), str):
            raise JaxsqlError(f'{where}: expected {{"id": string, "completion": string}}')
        out.append((d["id"], d["completion"]))
    if not out:
        raise JaxsqlError(f"{path}: no completions")
    return out


def _score(args: argparse.Namespace) -> int:
    from jaxsql.cli.eval_cmds import DataSpec, load_data
    from jaxsql.cocte import split_completion
    from jaxsql.sql import SqlPool
    from models.prm import check_matches_policy, load_prm
    from rl.prm_score import policy_step_entropies, score_completions
    from rl.rollout import PromptEncoder

    for name in ("--tau", "--max-len", "--batch-size", "--timeout", "--max-prompt-len", "--max-vm-steps"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    pairs = read_completions(args.completions)
    by_id = {e.id: e for e in load_data(DataSpec.parse(args.data))}
    unknown = sorted({i for i, _ in pairs if i not in by_id})
    if unknown:
        raise JaxsqlError(f"{args.completions}: ids not in {args.data}: {unknown[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''}")
    prm = load_prm(args.prm, head=args.head)
    examples = [by_id[i] for i, _ in pairs]
    completions = [c for _, c in pairs]
    encoder = PromptEncoder(prm.tokenizer, "cocte", args.max_prompt_len)
    entropies = None
    if args.policy:
        cfg, params, tok = _load_policy(args.policy)
        check_matches_policy(prm, tok, args.policy)
        spans = []
        for c in completions:
            offset, chain = split_completion(c)
            spans.append([(offset + s.start, offset + s.end) for s in chain.steps])
        policy_prompts = PromptEncoder(tok, "cocte", args.max_prompt_len)
        entropies = policy_step_entropies(params, cfg, tok, [policy_prompts(e) for e in examples], completions,
                                          spans, batch_size=args.batch_size)
    with SqlPool(timeout_s=args.timeout, max_vm_steps=args.max_vm_steps) as pool:
        scored = score_completions(prm, examples, completions, pool, prompt_ids=encoder, max_len=args.max_len,
                                   batch_size=args.batch_size, entropies=entropies, tau=args.tau)
    for (i, _), s in zip(pairs, scored):
        print(json.dumps({"id": i, **s.to_json()}, ensure_ascii=False))
    return 0
