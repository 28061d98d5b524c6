"""The GRPO loop: sample on the device, score on the host SQL pool, update on the device.

One step (see DESIGN.md, "A step of training")::

    grain batch ─► prompts ─► generate (N x G) ─► device rows
      ├─ dispatch: reference log-probs (beta > 0), old log-probs (mu > 1)   [device, async]
      └─ host: detokenise ─► extract SQL ─► SqlPool ─► rewards              [threads]
    rewards ─► advantages ─► (DAPO: drop flat groups, refill) ─► mu jitted updates

The device log-prob work is dispatched before the host blocks on the SQL
pool, so the two overlap; ``time/reward_hidden_s`` reports how much of the
reward time ran concurrently with it. The updates minimise the registered
``"grpo"`` loss (`rl.losses`) on a grouped `rl.batch.Batch`.

`GrpoTrainer` is a `rl.base_trainer.BaseTrainer`: the loop (`rl.loop`:
checkpoints every ``checkpoint.every_steps`` and on SIGTERM / SIGINT,
metrics, progress), the run-directory checks and `--resume` come from
there; `--resume` continues exactly (params, optimizer, rng and the grain
iterator position are restored; the sampling key of step s is
``fold_in(seed_key, s)``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from typing import Any

import jax
import numpy as np

from jaxsql.config import to_dict
from jaxsql import distributed
from jaxsql.distributed import any_process, is_lead_process
from jaxsql.errors import ConfigError
from jaxsql.rewards import concat_scores
from rl import algo, setup
from rl.base_trainer import BaseTrainer
from rl.batch import Batch
from rl.config import TrainConfig
from rl.rollout import completion_logprobs, decode_completions, sample_rollout
from rl.train_step import StepConfig


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


class GrpoTrainer(BaseTrainer):
    """A GRPO run: the base trainer's model, data and checkpoints, plus the SQL pool (its own
    unless `pool` is given), the reward thread and the reference policy (beta > 0)."""

    kind = "grpo"
    progress_keys = ("reward/mean", "train/loss")

    def __init__(self, config: TrainConfig, *, resume: bool = False, pool=None):
        c = config
        self.rewards = reward_config(c)
        self._pool_arg = pool
        loss = algo.PolicyLossConfig(loss_agg=c.algo.loss_agg, eps_low=c.algo.eps_low,
                                     eps_high=c.algo.eps_high, beta=c.algo.beta, tis_cap=c.algo.tis_cap,
                                     max_len=c.sampling.max_new_tokens)
        self.step_cfg = StepConfig(loss="grpo", loss_config=loss, micro_batches=c.optim.micro_batches,
                                   temperature=c.sampling.temperature)
        super().__init__(c, resume=resume, step_config=self.step_cfg,
                         total_updates=c.steps * c.algo.num_iterations)

    def _init_extra(self, params) -> None:
        # The reference policy is the initial one; it needs its own buffers because the
        # train state is donated.
        self.ref_params = setup.copy_tree(params) if self.config.algo.beta != 0 else None
        self.pool = self._pool_arg
        if self.pool is None:
            self.pool = self.config.sql.open_pool()
            self._releases.append(self.pool.close)
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
        self._releases.append(lambda: self._executor.shutdown(wait=True))

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
                            ignore_stop=c.sampling.ignore_stop, stop_ids=self.stop_ids, pad_id=self.pad_id,
                            rules=self.rules)
        # this process's samples (its prompts' rows) travel to the host for scoring
        tokens, lengths = distributed.local_rows(ro.tokens_NC), distributed.local_rows(ro.lengths_N)
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
        # every process gets every process's scores (global order): advantages, DAPO's
        # choices and the logged metrics are then what one process computes
        score = concat_scores(distributed.process_objects(scored.value))
        lengths = np.concatenate(distributed.process_objects(np.asarray(lengths)))
        return {"rows": ro.rows.replace(**device), "score": score, "texts": texts,
                "groups": len(score.rewards) // c.sampling.num_generations,
                "lengths": lengths, "t_rollout": t_rollout, "reward_span": (scored.start, scored.end),
                "device_span": dev_span}

    def _score(self, texts, examples):
        """This process's completions scored on its own SQL pool (its local databases)."""
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
                # a refill is a device call: every process takes the same branch
                if any_process(len(keep) >= B or len(draws) > c.algo.max_refill_batches):
                    break
                draws.append(self._draw(jax.random.fold_in(key, len(draws))))
            keep = keep[:B]
        else:
            keep = [(0, g) for g in range(B)]
        n_real = len(keep)
        # Too few informative groups after the refills: pad with masked-out groups
        # so shapes stay fixed; they add nothing to the loss or its denominator.
        filler = [(0, g) for g in range(B - n_real)]
        offsets = np.cumsum([0] + [d["groups"] for d in draws])
        groups = np.array([offsets[d] + g for d, g in keep + filler])
        rows = Batch.concat([d["rows"] for d in draws]).select_groups(groups)
        index = (groups[:, None] * G + np.arange(G)[None, :]).reshape(-1)
        rewards = np.concatenate([d["score"].rewards for d in draws])[index]
        adv = np.array(algo.compute_advantages(c.algo.advantage, rewards, G, c.algo.adv_eps))
        if filler:
            adv[n_real * G:] = 0.0
            live = self.update_step.global_rows((np.arange(B * G) < n_real * G).astype(np.int32)[:, None])
            rows = rows.replace(completion_mask=rows.completion_mask * live)
        rows = rows.replace(advantages=self.update_step.global_rows(adv.astype(np.float32)))
        # micro-batches are whole groups; when they cannot be, full rows
        batch = rows if B % c.optim.micro_batches == 0 else rows.flat()

        t_update = time.perf_counter()
        out = jax.tree.map(distributed.to_host, self.update(batch, times=c.algo.num_iterations))
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
        if not is_lead_process():
            return
        with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            G = self.config.sampling.num_generations
            f.write(json.dumps({"step": step, "ids": [m["id"] for m in draw["score"].metrics[::G]],
                                "completion": draw["texts"][0][:500],
                                "reward": float(draw["score"].rewards[0])}) + "\n")

    def run(self, until: int | None = None, **loop_options: Any) -> dict[str, Any]:
        """`BaseTrainer.run`, plus ``skipped_updates`` (non-finite updates skipped)."""
        out = super().run(until, **loop_options)
        out["skipped_updates"] = int(distributed.to_host(self.state["skipped"]))
        return out


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run GRPO training as configured (the `jaxsql train` command)."""
    if config.sampling.num_generations < 2:
        raise ConfigError("SamplingSection.num_generations: GRPO needs at least 2")
    with GrpoTrainer(config, resume=resume) as trainer:
        return trainer.run()
