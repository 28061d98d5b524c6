"""The demo's report: ``plot.png`` (reward and dev EX over RL steps), ``report.md``, peak memory.

Kept apart from `rl.demo` (the phases) so each module reads as one job; it
takes plain values (metrics rows, phase records, settings) and imports
nothing from `rl`.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


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


def write_plot(path: Path, rl_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> Path:
    """``plot.png``: RL reward per step (and its running mean) and dev EX over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = _dedupe(rl_rows)
    ev = _dedupe(eval_rows)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _cut(info: Mapping[str, Any], minutes: float) -> str:
    if not info.get("stopped_early"):
        return ""
    return (f" — **cut by the time cap** (`--minutes {minutes:g}`) at step {info.get('steps')} of "
            f"{info.get('of_steps')}: the result is not the default run's")


def write_report(path: Path, s: Mapping[str, Any], phases: Mapping[str, Mapping[str, Any]], total_seconds: float,
                 peak_bytes: int, phase_names: Sequence[str]) -> Path:
    """``report.md``: the before/after table, phase times, peak memory, settings `s`."""
    before = phases.get("eval_sft", {}).get("summary", {})
    after = phases.get("eval_rl", {}).get("summary", {})
    rows = [("EX (set semantics)", "ex_set"), ("refined EX (bag semantics)", "ex_bag"),
            ("execution error rate", "error_rate"), ("QATCH cell precision", "cell_precision"),
            ("QATCH cell recall", "cell_recall"), ("QATCH tuple cardinality", "tuple_cardinality"),
            ("QATCH mean", "qatch")]
    lines = ["# jaxsql demo report", "",
             f"Synthetic benchmark (seed {s['seed']}): {s['n_train']} train / {s['n_dev']} dev questions; "
             f"dev has unseen values and held-out template-domain pairs. Greedy decoding on the whole dev split.",
             "", "| metric (dev) | SFT (before RL) | after GRPO | change |", "|---|---:|---:|---:|"]
    for label, key in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        lines.append(f"| {label} | {100 * b:.1f}% | {100 * a:.1f}% | {100 * (a - b):+.1f} pts |")
    sft, rl, data = phases.get("sft", {}), phases.get("rl", {}), phases.get("data", {})
    correct, wrong, failed = s["reward"]
    lines += ["", "## Run", "",
              f"- SFT (`rl/recipes/demo_sft.yaml`): {sft.get('steps')} steps x {s['sft_batch']} examples "
              f"(first {s['sft_examples']} train examples), lr {s['sft_lr']}" + _cut(sft, s["minutes"]),
              f"- GRPO questions: {data.get('rl_questions')} question-answer pairs "
              + ("over new databases (a second synthetic draw, seed + 1000; held-out dev template-domain "
                 "pairs and questions naming a dev value removed)" if s["rl_questions"] == "new_databases"
                 else "(the SFT split's questions)") + "; no gold SQL",
              f"- GRPO (`rl/recipes/demo_grpo.yaml`): {rl.get('steps')} steps x {s['rl_prompts']} prompts x "
              f"G={s['rl_generations']}, temperature {s['rl_temperature']}, lr {s['rl_lr']}, "
              f"advantage {s['rl_advantage']}, beta {s['rl_beta']}, {s['rl_loss_agg']} loss, "
              + ("DAPO dynamic sampling, " if s["rl_dynamic_sampling"] else "")
              + f"clip [{1 - s['rl_eps_low']:g}, {1 + s['rl_eps_high']:g}]; reward `execution` "
              f"({correct} / {wrong} / {failed}) against gold answers only (gold SQL never given to the reward)"
              + _cut(rl, s["minutes"]),
              f"- model: Qwen2-style decoder, hidden {s['hidden_size']}, {s['num_layers']} layers, "
              f"{s['num_heads']} heads ({s['num_kv_heads']} KV), vocab {data.get('vocab')}, "
              f"random init; prompts {s['prompt_len']} tokens, completions <= {s['max_new_tokens']}",
              f"- HF export: {phases.get('export', {}).get('hf_check', 'not run')}", "",
              "| phase | seconds |", "|---|---:|"]
    for p in phase_names[:-1]:
        if "seconds" in phases.get(p, {}):
            lines.append(f"| {p} | {phases[p]['seconds']:.1f} |")
    lines += [f"| **total (all phases)** | {total_seconds:.1f} |", "",
              f"Peak resident memory of the demo process (ru_maxrss, the invocation that finished the run): "
              f"**{peak_bytes / 2**30:.2f} GiB**.",
              "", "![reward and dev EX](plot.png)", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
