"""The GRPO loop: sample on the device, score on the host SQL pool, update on the device.

One step (see DESIGN.md, "A step of training")::

    grain batch ─► prompts ─► generate (N x G) ─► device rows
      ├─ dispatch: reference log-probs (beta > 0), old log-probs (mu > 1)   [device, async]
      └─ host: detokenise ─► extract SQL ─► SqlPool ─► rewards              [threads]
    rewards ─► advantages ─► (DAPO: drop flat groups, refill) ─► mu jitted updates

The device log-prob work is dispatched before the host blocks on the SQL
pool, so the two overlap; ``time/reward_hidden_s`` reports how much of the
reward time ran concurrently with it. Checkpoints every
``checkpoint.every_steps`` and on SIGTERM; `--resume` continues exactly
(params, optimizer, rng and the grain iterator position are restored; the
sampling key of step s is ``fold_in(seed_key, s)``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsql.checkpoint import PreemptionGuard
from jaxsql.config import to_dict
from jaxsql.errors import ConfigError
from jaxsql.metrics import MetricsWriter, ProgressBar
from rl import algo, setup
from rl.config import TrainConfig
from rl.rollout import (PromptEncoder, completion_logprobs, concat_rows, decode_completions,
                        sample_rollout, select_groups, ungroup)
from rl.train_step import StepConfig, TrainStep, init_state, make_optimizer


def reward_config(cfg: TrainConfig):
    """`jaxsql.rewards.RewardConfig` from the run config's ``reward`` mapping."""
    from jaxsql.config import from_dict
    from jaxsql.rewards import RewardConfig

    return from_dict(RewardConfig, to_dict(cfg.reward), "TrainConfig.reward")


class _Timed:
    """Run a callable, remembering when it started and ended."""

    def __init__(self, fn, *args):
        self.start = time.perf_counter()
        self.value = fn(*args)
        self.end = time.perf_counter()


def _watch(arrays) -> cf.Future:
    """A future that completes (with (start, end)) when `arrays` are computed."""
    fut: cf.Future = cf.Future()
    start = time.perf_counter()

    def wait():
        jax.block_until_ready(arrays)
        fut.set_result((start, time.perf_counter()))

    threading.Thread(target=wait, daemon=True).start()
    return fut


class GrpoTrainer:
    """Owns the model, optimizer state, data stream, SQL pool and checkpoints of one run."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, pool=None):
        self.config = c = config
        self.run_dir = Path(c.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rewards = reward_config(c)
        self.mesh = setup.build_mesh(c.mesh)
        self.model_cfg, params = setup.load_policy(c.model, self.mesh)
        self.tokenizer = setup.load_tokenizer(c.model)
        self.stop_ids, self.pad_id = setup.special_ids(self.tokenizer, self.model_cfg)
        self.encoder = PromptEncoder(self.tokenizer, c.data.prompt_format, c.data.max_prompt_len)
        self.examples = setup.load_examples(c.data, self.run_dir)
        self.iterator = setup.data_stream(self.examples, c.data, c.data.batch_size)
        mu = c.algo.num_iterations
        self.optimizer = make_optimizer(c.optim, c.steps * mu)
        loss = algo.PolicyLossConfig(loss_agg=c.algo.loss_agg, eps_low=c.algo.eps_low,
                                     eps_high=c.algo.eps_high, beta=c.algo.beta, tis_cap=c.algo.tis_cap,
                                     max_len=c.sampling.max_new_tokens)
        self.step_cfg = StepConfig(kind="grpo", loss=loss, micro_batches=c.optim.micro_batches,
                                   temperature=c.sampling.temperature)
        self.train_step = TrainStep(self.model_cfg, self.step_cfg, self.optimizer, self.mesh,
                                    cache_key=(c.optim, c.steps * mu))
        # The reference policy is the initial one; it needs its own buffers because the
        # train state is donated.
        self.ref_params = setup.copy_tree(params) if c.algo.beta != 0 else None
        self.state = init_state(params, self.optimizer, self.train_step.state_shardings)
        del params
        self.rng = jax.random.PRNGKey(c.seed)
        self.checkpointer = setup.open_checkpointer(self.run_dir, c.checkpoint, resume=resume)
        self.state, self.rng, self.start_step = setup.restore_run(
            self.checkpointer, self.state, self.rng, self.iterator)
        self._own_pool = pool is None
        if pool is None:
            from jaxsql.sql import SqlPool

            pool = SqlPool()
        self.pool = pool
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")

    # -- one rollout draw -------------------------------------------------------------

    def _draw(self, key) -> dict[str, Any]:
        """Sample one grain batch, dispatch device log-probs, score on the host."""
        c = self.config
        batch = next(self.iterator)
        t0 = time.perf_counter()
        params = self.state["params"]
        ro = sample_rollout(params, self.model_cfg, self.encoder, batch, key=key,
                            num_generations=c.sampling.num_generations,
                            max_new_tokens=c.sampling.max_new_tokens, temperature=c.sampling.temperature,
                            top_p=c.sampling.top_p, top_k=c.sampling.top_k,
                            ignore_stop=c.sampling.ignore_stop, stop_ids=self.stop_ids, pad_id=self.pad_id)
        tokens, lengths = jax.device_get((ro.tokens_NC, ro.lengths_N))
        t_rollout = time.perf_counter() - t0
        # Device work that does not need rewards goes first (async dispatch) ...
        device = {}
        if self.ref_params is not None:
            device["ref_logp"] = completion_logprobs(self.ref_params, ro.rows, self.model_cfg,
                                                     c.sampling.temperature)[0]
        if c.algo.num_iterations > 1:
            device["old_logp"] = completion_logprobs(params, ro.rows, self.model_cfg,
                                                     c.sampling.temperature)[0]
        watch = _watch(device) if device else None
        # ... then the host detokenises and the pool executes SQL while the device works.
        texts = decode_completions(self.tokenizer, tokens, lengths, self.stop_ids)
        fut = self._executor.submit(_Timed, self._score, texts, ro.examples)
        scored = fut.result()
        dev_span = watch.result() if watch else None
        rows = dict(ro.rows)
        rows.update(device)
        return {"rows": rows, "score": scored.value, "texts": texts, "examples": ro.examples,
                "lengths": lengths, "t_rollout": t_rollout, "reward_span": (scored.start, scored.end),
                "device_span": dev_span}

    def _score(self, texts, examples):
        from jaxsql.rewards import score_batch

        return score_batch(self.pool, texts, examples, self.rewards)

    # -- one training step -------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """Roll out, score, and apply mu updates; returns the step's metrics."""
        c = self.config
        G, B = c.sampling.num_generations, c.data.batch_size
        t_start = time.perf_counter()
        key = jax.random.fold_in(self.rng, step)
        draws = [self._draw(jax.random.fold_in(key, 0))]
        keep: list[tuple[int, int]] = []  # (draw, group)
        if c.algo.dynamic_sampling:
            while True:
                d = len(draws) - 1
                mask = algo.informative_groups(draws[d]["score"].rewards, G)
                keep += [(d, g) for g in np.flatnonzero(mask)]
                if len(keep) >= B or len(draws) > c.algo.max_refill_batches:
                    break
                draws.append(self._draw(jax.random.fold_in(key, len(draws))))
            keep = keep[:B]
        else:
            keep = [(0, g) for g in range(B)]
        n_real = len(keep)
        # Too few informative groups after the refills: pad with masked-out groups
        # so shapes stay fixed; they add nothing to the loss or its denominator.
        filler = [(0, g) for g in range(B - n_real)]
        offsets = np.cumsum([0] + [len(d["examples"]) // G for d in draws])
        groups = np.array([offsets[d] + g for d, g in keep + filler])
        rows = select_groups(concat_rows([d["rows"] for d in draws]), groups)
        index = (groups[:, None] * G + np.arange(G)[None, :]).reshape(-1)
        rewards = np.concatenate([d["score"].rewards for d in draws])[index]
        adv = np.array(algo.compute_advantages(c.algo.advantage, rewards, G, c.algo.adv_eps))
        if filler:
            adv[n_real * G:] = 0.0
            live = jnp.asarray(np.arange(B * G) < n_real * G)[:, None]
            rows["completion_mask"] = rows["completion_mask"] * live
        rows["advantages"] = jnp.asarray(adv, jnp.float32)
        if B % c.optim.micro_batches:  # micro-batches of whole groups are impossible
            rows = ungroup(rows)
        batch = self.train_step.place_batch(rows)

        t_update = time.perf_counter()
        out = {}
        for _ in range(c.algo.num_iterations):
            self.state, out = self.train_step(self.state, batch)
        out = jax.device_get(out)
        t_end = time.perf_counter()

        first = draws[0]
        m: dict[str, float] = {f"train/{k}": float(v) for k, v in out.items()}
        for k, v in first["score"].summary.items():
            name = "reward/mean" if k == "reward_mean" else k if k.startswith("reward/") else f"sql/{k}"
            m[name] = float(v)
        m["reward/std"] = float(first["score"].rewards.std())
        m["completion/length_mean"] = float(np.mean(first["lengths"]))
        m["completion/length_max"] = float(np.max(first["lengths"]))
        m["dynamic/kept_groups"] = float(n_real)
        m["dynamic/draws"] = float(len(draws))
        rollout_s = sum(d["t_rollout"] for d in draws)
        reward_s = sum(d["reward_span"][1] - d["reward_span"][0] for d in draws)
        hidden = 0.0
        logprob_s = 0.0
        for d in draws:
            if d["device_span"]:
                (a0, a1), (b0, b1) = d["reward_span"], d["device_span"]
                hidden += max(0.0, min(a1, b1) - max(a0, b0))
                logprob_s += b1 - b0
        step_s = t_end - t_start
        m.update({"time/rollout_s": rollout_s, "time/rewards_s": reward_s, "time/logprobs_s": logprob_s,
                  "time/reward_hidden_s": hidden, "time/update_s": t_end - t_update, "time/step_s": step_s,
                  "tokens_per_s": float(sum(np.sum(d["lengths"]) for d in draws)) / max(step_s, 1e-9)})
        self._log_samples(step, first)
        return m

    def _log_samples(self, step: int, draw: dict) -> None:
        with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            G = self.config.sampling.num_generations
            f.write(json.dumps({"step": step, "ids": [e.id for e in draw["examples"][::G]],
                                "completion": draw["texts"][0][:500],
                                "reward": float(draw["score"].rewards[0])}) + "\n")

    # -- the loop -----------------------------------------------------------------------

    def save(self, step: int) -> bool:
        """Checkpoint the run as `step` (number of completed steps)."""
        return setup.save_run(self.checkpointer, step, self.state, self.rng, self.iterator,
                              self.config.to_dict(), self.model_cfg, "grpo")

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train from `start_step` to `config.steps` (or to step `until`, if smaller: a
        partial session that ends with a checkpoint); returns a summary."""
        c = self.config
        last = c.steps if until is None else min(until, c.steps)
        every = c.checkpoint.every_steps
        history: list[dict[str, float]] = []
        stopped = False
        step = self.start_step
        bar = ProgressBar(last, initial=self.start_step, desc="grpo", enabled=c.progress)
        try:
            with MetricsWriter(self.run_dir, tensorboard=c.tensorboard) as writer, PreemptionGuard() as guard:
                while step < last:
                    m = self.step(step)
                    step += 1
                    history.append(m)
                    if step % c.log_every == 0 or step == last:
                        writer.write(step, m)
                    bar.update(m)
                    if guard.stop_requested():
                        self.save(step)
                        stopped = True
                        break
                    if every and step % every == 0:
                        self.save(step)
                if not stopped:
                    self.save(step)
                self.checkpointer.wait()
        finally:
            bar.close()
            self._executor.shutdown(wait=True)
            if self._own_pool:
                self.pool.close()
        if not stopped and step == c.steps and c.checkpoint.export_hf:
            self.export(self.run_dir / "hf")
        return {"step": step, "stopped": stopped, "history": history,
                "skipped_updates": int(jax.device_get(self.state["skipped"]))}

    def export(self, out_dir: str | Path) -> Path:
        """Write the current policy as an HF checkpoint (with the run's tokenizer)."""
        return setup.export_policy(out_dir, self.config.model, self.model_cfg, self.state["params"])

    def close(self) -> None:
        """Release the checkpointer."""
        self.checkpointer.close()


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run GRPO training as configured (the `jaxsql train` command)."""
    if config.sampling.num_generations < 2:
        raise ConfigError("SamplingSection.num_generations: GRPO needs at least 2")
    trainer = GrpoTrainer(config, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
