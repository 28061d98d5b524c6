"""`jaxsql bench grpo`: seconds per GRPO step on a fixed workload, optionally vs TRL.

Workload (the issue's): 4 prompts x 8 generations, prompts of exactly 128
tokens, exactly 64 completion tokens (stop tokens masked), KL weight beta =
0.04 (so reference log-probs are computed), one inner iteration (old
log-probs = current, detached, as in TRL), float32, and a cheap host reward
(the fraction of completion token ids that are even) so the figure measures
the learner, not SQL. One step = sample, reference log-probs, reward,
advantages, one jitted update. The first `warmup` steps (compilation) are
not timed. Peak memory is the process's peak RSS (``ru_maxrss``).

With ``--compare-trl`` the same weights, prompts and settings run through
TRL's ``GRPOTrainer`` (PyTorch, CPU) in the same process, so the ratio is
taken under the same machine load (see `rl.bench_trl`).
"""

from __future__ import annotations

import resource
import string
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxsql.errors import JaxsqlError


def cheap_reward(completion_ids: list[list[int]]) -> list[float]:
    """Fraction of even token ids in each completion (deterministic, varied, ~free)."""
    return [float(np.mean([t % 2 == 0 for t in ids])) if ids else 0.0 for ids in completion_ids]


def bench_prompts(model_dir: str | Path, num: int, length: int, seed: int = 0):
    """(texts or None, token ids [num][length]): text prompts of exactly `length` tokens when
    the checkpoint has a tokenizer (so TRL can be given the same prompts), else random ids."""
    rng = np.random.RandomState(seed)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception:  # no tokenizer files: random ids are fine for jaxsql alone
        tok = None
    # Without tokenizer files, transformers 5 may still build an empty tokenizer of the
    # model's family that encodes every text to nothing: treat it as no tokenizer.
    if tok is not None and not tok("a b c", add_special_tokens=False)["input_ids"]:
        tok = None
    if tok is None:
        return None, rng.randint(3, 200, (num, length)).tolist(), None
    texts, ids = [], []
    letters = np.array(list(string.ascii_lowercase + " "))
    for i in range(num):
        text = "".join(rng.choice(letters, length * 2))
        for _ in range(20):
            enc = tok(text, add_special_tokens=False)["input_ids"]
            if len(enc) >= length:
                enc = enc[:length]
                text = tok.decode(enc)
                if tok(text, add_special_tokens=False)["input_ids"] == enc:
                    break
            text = text + "".join(rng.choice(letters, length))
        else:
            raise JaxsqlError(f"the tokenizer in {model_dir} cannot make prompt {i} exactly "
                              f"{length} tokens long (its decode/encode does not round-trip)")
        texts.append(text)
        ids.append(list(enc))
    return texts, ids, tok


def run_bench(model_dir: str | Path, *, steps: int = 3, warmup: int = 1, compare_trl: bool = False,
              prompts: int = 4, generations: int = 8, prompt_len: int = 128, new_tokens: int = 64,
              beta: float = 0.04, learning_rate: float = 1e-6, seed: int = 0) -> dict[str, Any]:
    """Time `steps` GRPO steps of jaxsql (and TRL with `compare_trl`); a JSON-ready dict."""
    import jax
    import jax.numpy as jnp

    from jaxsql.sharding import make_mesh
    from models import flops
    from models.hf_io import load_hf_checkpoint
    from models.sampler import generate
    from rl import algo
    from rl.config import OptimSection
    from rl.rollout import assemble, completion_logprobs
    from rl.setup import copy_tree
    from rl.train_step import StepConfig, TrainStep, init_state, make_optimizer

    texts, prompt_ids, tok = bench_prompts(model_dir, prompts, prompt_len, seed)
    if compare_trl and texts is None:  # checked before any timing, not after minutes of it
        raise JaxsqlError(f"--compare-trl needs a tokenizer in {model_dir} (e.g. `jaxsql model init "
                          f"--test-tokenizer`) so both sides get the same prompts")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg, params = load_hf_checkpoint(model_dir, mesh=mesh, param_dtype="float32")
    optim = OptimSection(learning_rate=learning_rate, b1=0.9, b2=0.999, weight_decay=0.0, max_grad_norm=1.0)
    optimizer = make_optimizer(optim, steps + warmup)
    sc = StepConfig(loss="grpo", loss_config=algo.PolicyLossConfig(
        loss_agg="seq_mean_token_mean", eps_low=0.2, eps_high=0.2, beta=beta, max_len=new_tokens))
    ts = TrainStep(cfg, sc, optimizer, mesh)
    ref = copy_tree(params) if beta else None
    state = init_state(params, optimizer, ts.state_shardings)
    del params

    times: list[dict[str, float]] = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = generate(state["params"], cfg, prompt_ids, key=jax.random.PRNGKey(i), max_new_tokens=new_tokens,
                       num_samples=generations, temperature=1.0, ignore_stop=True)
        rows = assemble(out, generations)
        toks = np.asarray(jax.device_get(out.tokens))
        t1 = time.perf_counter()
        if ref is not None:  # dispatched before the host computes rewards
            rows = rows.replace(ref_logp=completion_logprobs(ref, rows, cfg, 1.0)[0])
        rewards = np.asarray(cheap_reward(toks.tolist()), np.float32)
        adv = algo.compute_advantages("grpo", rewards, generations)
        t2 = time.perf_counter()
        if ref is not None:
            jax.block_until_ready(rows.ref_logp)
        t3 = time.perf_counter()
        rows = rows.replace(advantages=jnp.asarray(adv))
        state, metrics = ts(state, ts.place_batch(rows))
        jax.block_until_ready(metrics)
        t4 = time.perf_counter()
        times.append({"generate_s": t1 - t0, "reward_s": t2 - t1, "ref_logprobs_wait_s": t3 - t2,
                      "update_s": t4 - t3, "step_s": t4 - t0})
    timed = times[warmup:]
    mean = {k: round(float(np.mean([t[k] for t in timed])), 4) for k in timed[0]}
    result: dict[str, Any] = {
        "model": str(model_dir), "params": cfg.num_params(), "backend": jax.default_backend(),
        "workload": {"prompts": prompts, "generations": generations, "prompt_len": prompt_len,
                     "new_tokens": new_tokens, "beta": beta, "num_iterations": 1, "dtype": "float32",
                     "loss": "grpo seq_mean_token_mean", "reward": "fraction of even token ids"},
        "steps": steps, "warmup": warmup,
        "jaxsql_first_step_s": round(times[0]["step_s"], 3),
        "jaxsql_s_per_step": mean["step_s"], "jaxsql_breakdown": mean,
        "jaxsql_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    # Model FLOPs and MFU per phase (models.flops); the reference log-probs run while the host
    # computes rewards, so their time is the reward time plus the wait.
    step_flops = flops.grpo_step_flops(cfg, prompts, generations, prompt_len, new_tokens, reference=bool(beta))
    phase_s = {"generate": mean["generate_s"], "ref_logprobs": mean["reward_s"] + mean["ref_logprobs_wait_s"],
               "update": mean["update_s"], "total": mean["step_s"]}
    peaks = flops.device_peaks(cfg.compute_dtype)
    result["jaxsql_utilisation"] = flops.phase_utilisation(step_flops, phase_s, peaks)
    if compare_trl:
        from rl.bench_trl import run_trl

        trl = run_trl(model_dir, texts, steps=steps, warmup=warmup, generations=generations,
                      prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens, beta=beta,
                      learning_rate=learning_rate, seed=seed, reward=cheap_reward)
        result.update(trl)
        result["trl_over_jaxsql"] = round(trl["trl_s_per_step"] / mean["step_s"], 2)
        result["jaxsql_peak_rss_note"] = "peak RSS is per process: after TRL runs it includes torch"
    return result


#: Per-step keys of the multi-turn workload's breakdown (from the trainer's step metrics).
MULTI_TURN_BREAKDOWN = {"rollout_s": "time/rollout_s", "decode_s": "time/decode_s", "tool_s": "time/tool_s",
                        "extend_s": "time/extend_s", "reward_s": "time/rewards_s",
                        "ref_logprobs_s": "time/logprobs_s", "update_s": "time/update_s", "step_s": "time/step_s"}


def run_bench_multi_turn(model_dir: str | Path, *, steps: int = 3, warmup: int = 1, prompts: int = 4,
                         generations: int = 8, new_tokens: int = 128, max_prompt_len: int = 320,
                         beta: float = 0.04, learning_rate: float = 1e-6, seed: int = 0,
                         work_dir: str | Path | None = None) -> dict[str, Any]:
    """`jaxsql bench grpo --multi-turn`: seconds per GRPO step of the real trainer in
    ``rollout.mode: multi_turn`` on the synthetic benchmark (``tool`` prompts, SQL tool calls
    run in the trainer's pool, execution + tool-format rewards).

    The model needs its tokenizer (the tags are text). The step time is split into the
    rollout (``decode_s`` the sampler's decode rounds, ``tool_s`` the host running the calls
    and rendering observations, ``extend_s`` appending them), the reward, the reference
    log-probs (dispatched before the rewards: their span) and the update; ``tool`` reports
    how many calls the policy made, since a policy that never calls spends nothing on tools
    (a random model seldom does; a tool-SFT model does).
    """
    import json
    import tempfile

    from data.synthetic import generate_benchmark
    from rl.config import load_train_config
    from rl.trainer import GrpoTrainer

    if not (Path(model_dir) / "tokenizer.json").exists() and not (Path(model_dir) / "tokenizer_config.json").exists():
        raise JaxsqlError(f"--multi-turn needs a tokenizer in {model_dir} (the tool tags are text)")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        synth = Path(tmp) / "synthetic"
        generate_benchmark(synth, seed=seed, n_train=max(64, prompts * (warmup + steps)), n_dev=8)
        overrides = {
            "run_dir": str(Path(tmp) / "run"), "model.path": str(model_dir), "data.path": str(synth),
            "data.prompt_format": "tool", "data.batch_size": prompts, "data.max_prompt_len": max_prompt_len,
            "rollout.mode": "multi_turn", "sampling.num_generations": generations,
            "sampling.max_new_tokens": new_tokens, "algo.beta": beta, "algo.loss_agg": "seq_mean_token_mean",
            "optim.learning_rate": learning_rate, "steps": warmup + steps, "seed": seed, "progress": False,
            "tensorboard": False, "checkpoint.export_hf": False, "checkpoint.every_steps": 0,
            "mesh.data": 1, "reward.weights.execution": 1.0, "reward.weights.tool_format": 0.1,
        }
        cfg = load_train_config(None, [f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                                       for k, v in overrides.items()])
        history = []
        with GrpoTrainer(cfg) as trainer:
            for i in range(warmup + steps):
                history.append(trainer.step(i))
            params = trainer.model_cfg.num_params()
    timed = history[warmup:]

    def mean(key: str) -> float:
        return round(float(np.mean([m.get(key, 0.0) for m in timed])), 4)

    return {
        "model": str(model_dir), "params": params, "workload": {
            "mode": "multi_turn", "prompts": prompts, "generations": generations, "max_prompt_len": max_prompt_len,
            "new_tokens": new_tokens, "beta": beta, "num_iterations": 1, "loss": "grpo seq_mean_token_mean",
            "data": "synthetic benchmark, tool prompts", "reward": "execution + 0.1 tool_format"},
        "steps": steps, "warmup": warmup,
        "jaxsql_first_step_s": round(float(history[0]["time/step_s"]), 3),
        "jaxsql_s_per_step": mean("time/step_s"),
        "jaxsql_breakdown": {k: mean(v) for k, v in MULTI_TURN_BREAKDOWN.items()},
        "tool": {k: mean(f"tool/{k}") for k in ("turns_per_completion", "used_share", "errors",
                                                 "observation_share", "answered_share")},
        "jaxsql_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
