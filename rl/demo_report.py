"""The demo's report: ``plot.png`` (reward and dev EX over RL steps), ``report.md``, peak memory.

Kept apart from `rl.demo` (the phases) so each module reads as one job.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from rl.demo import DemoDir


def peak_memory_bytes() -> int:
    """Peak resident memory of this process and its waited-for children (ru_maxrss, KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, kids) * scale)


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A resumed phase may log a step twice (killed between logging and checkpointing): keep the last.
    by_step = {r["step"]: r for r in rows}
    return [by_step[k] for k in sorted(by_step)]


def write_plot(d: "DemoDir") -> Path:
    """``plot.png``: RL reward per step (and its running mean) and dev EX over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = _dedupe(d.read_metrics("rl"))
    ev = _dedupe(d.read_metrics("eval"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if rl:
        x = [r["step"] for r in rl]
        y = [r.get("reward/mean") or 0.0 for r in rl]
        k = max(1, len(y) // 8)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax1.plot(x, y, color="0.75", lw=1, label="batch mean")
        ax1.plot(x[k - 1:], smooth, color="C0", lw=2, label=f"running mean ({k})")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set(title="GRPO reward (execution, answers only)", xlabel="RL step", ylabel="reward")
    if ev:
        ax2.plot([r["step"] for r in ev], [100 * (r.get("ex_set") or 0) for r in ev], "o-", label="EX (set)")
        ax2.plot([r["step"] for r in ev], [100 * (r.get("ex_bag") or 0) for r in ev], "s--", label="EX (bag)")
        ax2.plot([r["step"] for r in ev], [100 * (r.get("error_rate") or 0) for r in ev], "x:",
                 label="error rate")
        ax2.legend(loc="best", fontsize=8)
    ax2.set(title="dev split, greedy (step 0 = SFT)", xlabel="RL step", ylabel="%")
    fig.tight_layout()
    path = d.path("plot.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(d: "DemoDir", total_seconds: float, peak_bytes: int, phases: Sequence[str]) -> Path:
    """``report.md``: the before/after table, phase times, peak memory, settings."""
    before = d.info("eval_sft").get("summary", {})
    after = d.info("eval_rl").get("summary", {})
    rows = [("EX (set semantics)", "ex_set", True), ("refined EX (bag semantics)", "ex_bag", True),
            ("execution error rate", "error_rate", False), ("QATCH cell precision", "cell_precision", True),
            ("QATCH cell recall", "cell_recall", True), ("QATCH tuple cardinality", "tuple_cardinality", True),
            ("QATCH mean", "qatch", True)]
    cfg = d.config
    lines = ["# jaxsql demo report", "",
             f"Synthetic benchmark (seed {cfg.seed}): {cfg.n_train} train / {cfg.n_dev} dev questions; "
             f"dev has unseen values and held-out template-domain pairs. Greedy decoding on the whole dev split.",
             "", "| metric (dev) | SFT (before RL) | after GRPO | change |", "|---|---:|---:|---:|"]
    for label, key, _ in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        lines.append(f"| {label} | {100 * b:.1f}% | {100 * a:.1f}% | {100 * (a - b):+.1f} pts |")
    sft, rl = d.info("sft"), d.info("rl")
    lines += ["", "## Run", "",
              f"- SFT: {sft.get('steps')} steps x {cfg.sft_batch} examples (first {cfg.sft_examples} train examples), "
              f"lr {cfg.sft_lr}" + (" — stopped early by the time budget" if sft.get("stopped_early") else ""),
              f"- GRPO questions: {d.info('data').get('rl_questions')} question-answer pairs "
              + ("over new databases (a second synthetic draw, seed + 1000; held-out dev template-domain "
                 "pairs and questions naming a dev value removed)" if cfg.rl_questions == "new_databases"
                 else "(the SFT split's questions)") + "; no gold SQL",
              f"- GRPO: {rl.get('steps')} steps x {cfg.rl_prompts} prompts x G={cfg.rl_generations}, "
              f"temperature {cfg.rl_temperature}, lr {cfg.rl_lr}, beta 0, token-mean loss, "
              + ("DAPO dynamic sampling, " if cfg.rl_dynamic_sampling else "") + "clip "
              f"[0.8, {1 + cfg.rl_eps_high}]; reward `execution` ({cfg.reward_correct} / {cfg.reward_wrong} / "
              f"{cfg.reward_failed}) against gold answers only (gold SQL never given to the reward)"
              + (" — stopped early by the time budget" if rl.get("stopped_early") else ""),
              f"- model: Qwen2-style decoder, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
              f"{cfg.num_heads} heads ({cfg.num_kv_heads} KV), vocab {d.info('data').get('vocab')}, "
              f"random init; prompts {cfg.prompt_len} tokens, completions <= {cfg.max_new_tokens}",
              f"- HF export: {d.info('export').get('hf_check', 'not run')}", "",
              "| phase | seconds |", "|---|---:|"]
    for p in phases[:-1]:
        if "seconds" in d.info(p):
            lines.append(f"| {p} | {d.info(p)['seconds']:.1f} |")
    lines += [f"| **total (all phases)** | {total_seconds:.1f} |", "",
              f"Peak resident memory of the demo process (ru_maxrss, the invocation that finished the run): **{peak_bytes / 2**30:.2f} GiB**.",
              "", "![reward and dev EX](plot.png)", ""]
    path = d.path("report.md")
    path.write_text("\n".join(lines))
    return path
