"""The GRPO loop: sample on the device, score on the host SQL pool, update on the device.

One step (see DESIGN.md, "A step of training")::

    grain batch ─► prompts ─► generate (N x G) ─► device rows
      ├─ dispatch: reference log-probs (beta > 0), old log-probs (mu > 1)   [device, async]
      └─ host: detokenise ─► extract SQL ─► SqlPool ─► rewards              [threads]
    process rewards (``weights.process``): the same host task also runs every step's prefix
      query and tokenizes the PRM rows ─► PRM step scores                  [device, async]
      └─ host meanwhile: each step's tokens in the completion
    rewards ─► advantages ─► (DAPO: drop flat groups, refill) ─► mu jitted updates

The device log-prob work is dispatched before the host blocks on the SQL
pool, so the two overlap; ``time/reward_hidden_s`` reports how much of the
reward time ran concurrently with it; ``time/prm_s`` is the PRM's span from dispatch
to its scores being ready and ``time/prm_hidden_s`` the part of it the host spent
placing steps on tokens (`rl.process`). The updates minimise the registered
``"grpo"`` loss (`rl.losses`) on a grouped `rl.batch.Batch`.

With ``rollout.mode: multi_turn`` the rollout is `rl.multiturn.multi_turn_rollout`
(the model's SQL tool calls run in the run's pool while it decodes); the batch
attends to the observations (``completion_mask``) and scores the sampled tokens only
(``loss_mask``), the rewards read each episode's final answer, and the step logs the
tool metrics (``tool/...``) and ``time/decode_s`` / ``time/tool_s`` / ``time/extend_s``
(docs/multiturn.md).

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
from jaxsql.paths import open_append
from jaxsql.errors import ConfigError
from jaxsql.rewards import concat_scores
from rl import algo, setup
from rl.base_trainer import BaseTrainer
from jaxsql.tools import episode_metrics
from rl.batch import Batch, batch_fields
from rl.config import TrainConfig
from rl.process import StepScores, completion_step_ends, step_advantages, trajectory_rewards
from rl.rollout import completion_logprobs, decode_completions, multi_turn_batch, sample_rollout
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


def _drawn(rows, score, texts, rewards, groups: int, lengths, t_rollout: float, scored: _Timed, dev_span,
           *, steps=None, prm: dict[str, Any] | None = None, **extra) -> dict[str, Any]:
    """One draw's result as `GrpoTrainer.step` reads it: the rows (device log-probs
    attached), host scores and rewards, `groups` prompt groups, completion `lengths`, the
    rollout time, the reward thread's and device's spans, process-reward step scores and
    the PRM's timings (`prm`, None without process rewards), plus mode-specific `extra`."""
    return {"rows": rows, "score": score, "texts": texts, "rewards": rewards, "steps": steps, "groups": groups,
            "lengths": lengths, "t_rollout": t_rollout, "reward_span": (scored.start, scored.end),
            "device_span": dev_span, "prm_span": prm["span"] if prm else None,
            "prm_hidden": prm["hidden"] if prm else 0.0, **extra}


def _is_count(key: str) -> bool:
    """`jaxsql.tools.episode_metrics` keys that are counts (summed over draws), not shares."""
    return key in ("tool/episodes", "tool/calls", "tool/errors") or key.startswith("tool/end/")


class GrpoTrainer(BaseTrainer):
    """A GRPO run: the base trainer's model, data and checkpoints, plus the SQL pool (its own
    unless `pool` is given), the reward thread and the reference policy (beta > 0)."""

    kind = "grpo"
    progress_keys = ("reward/mean", "train/loss")

    def __init__(self, config: TrainConfig, *, resume: bool = False, pool=None):
        c = config
        self.rewards = reward_config(c)
        self.process = self.rewards.process  # None without process rewards
        self.prm_scorer = None
        self._pool_arg = pool
        self._samples: Any = None  # samples.jsonl, opened for appending at the first logged step
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
        if self.config.rollout.multi_turn:
            from jaxsql.tools import ToolRunner

            if distributed.process_count() > 1:
                raise ConfigError("RolloutSection.mode: multi_turn runs on one process "
                                  "(the multi-host multi-turn rollout is not built)")
            self.tool_runner = ToolRunner(self.pool, self.config.tool)
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
        self._releases.append(lambda: self._executor.shutdown(wait=True))
        if self.process is not None:
            from rl.process import PrmScorer, load_process_prm

            c = self.config
            prm = load_process_prm(self.process.prm, self.tokenizer, c.model.path or c.model.preset, mesh=self.mesh,
                                   rules=self.rules, param_dtype=c.model.param_dtype,
                                   compute_dtype=c.model.compute_dtype)
            self.prm_scorer = PrmScorer(prm, self.mesh, self.rules)

    # -- one rollout draw -------------------------------------------------------------

    def _draw(self, key) -> dict[str, Any]:
        """Sample one grain batch, dispatch device log-probs, score on the host."""
        c = self.config
        batch = next(self.iterator)
        if c.rollout.multi_turn:
            return self._draw_multi_turn(key, batch)
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
        device, watch = self._dispatch_logprobs(params, ro.rows)
        # ... then the host detokenises and the pool executes SQL while the device works.
        texts = decode_completions(self.tokenizer, tokens, lengths, self.stop_ids)
        fut = self._executor.submit(_Timed, self._host_work, texts, ro.examples)
        scored = fut.result()
        local_score, trajs, prm_rows = scored.value
        prm = self._process_scores(prm_rows, trajs, tokens, lengths, texts, ro.examples) if self.prm_scorer else None
        dev_span = watch.result() if watch else None
        # every process gets every process's scores (global order): advantages, DAPO's
        # choices and the logged metrics are then what one process computes
        score = concat_scores(distributed.process_objects(local_score))
        lengths = np.concatenate(distributed.process_objects(np.asarray(lengths)))
        rewards = score.rewards
        steps = None
        if prm is not None:
            steps = StepScores(prm["scores"], prm["n_steps"], prm["ends"], tuple(int(n) for n in lengths))
            if self.process.form == "trajectory":
                rewards = trajectory_rewards(score.rewards, steps, self.rewards.process_weight,
                                             self.process.aggregation)
        groups = len(score.rewards) // c.sampling.num_generations
        return _drawn(ro.rows.replace(**device), score, texts, rewards, groups, lengths, t_rollout, scored,
                      dev_span, steps=steps, prm=prm)

    def _draw_multi_turn(self, key, batch) -> dict[str, Any]:
        """One draw of multi-turn episodes (`rl.multiturn.multi_turn_rollout`): the sampler
        decodes until rows close a tool call, the run's SQL pool answers the calls
        (`jaxsql.tools.ToolRunner`), the observations are appended and decoding goes on.
        The batch attends to every token and scores the sampled ones (`multi_turn_batch`);
        the rewards score each episode's final answer."""
        from models.sampler import sampler_model
        from rl.multiturn import multi_turn_rollout

        c = self.config
        G = c.sampling.num_generations
        t0 = time.perf_counter()
        params = self.state["params"]
        prompts = [self.encoder(ex) for ex in batch]
        mt = multi_turn_rollout(sampler_model(params, self.model_cfg, pad_id=self.pad_id, rules=self.rules),
                                prompts, [ex.db_path for ex in batch], self.tool_runner, self.tokenizer,
                                key=key, num_samples=G, temperature=c.sampling.temperature,
                                top_p=c.sampling.top_p, top_k=c.sampling.top_k,
                                max_new_tokens=c.sampling.max_new_tokens, max_turns=c.tool.max_turns,
                                stop_ids=self.stop_ids)
        host = multi_turn_batch(mt, prompts, G, self.pad_id, width=c.sampling.max_new_tokens)
        rows = host.replace(**{k: self.update_step.global_rows(v) for k, v in batch_fields(host).items()})
        t_rollout = time.perf_counter() - t0
        device, watch = self._dispatch_logprobs(params, rows)
        examples = [ex for ex in batch for _ in range(G)]
        texts = [e.text for e in mt.episodes]
        scored = self._executor.submit(_Timed, self._score, texts, examples, list(mt.final_sql),
                                       list(mt.episodes)).result()
        dev_span = watch.result() if watch else None
        score = scored.value
        lengths = np.asarray(host.completion_mask).sum(axis=1)
        sampled = float(np.asarray(host.loss_mask).sum())
        tool = episode_metrics(mt.episodes)
        tool["tool/observation_share"] = 1.0 - sampled / max(float(lengths.sum()), 1.0)
        tool["tool/sampled_tokens_mean"] = sampled / len(lengths)
        return _drawn(rows.replace(**device), score, texts, score.rewards, len(batch), lengths, t_rollout, scored,
                      dev_span, tool=tool, rollout_stats={k: float(v) for k, v in mt.stats.items()})

    def _dispatch_logprobs(self, params, rows) -> tuple[dict[str, Any], Any]:
        """Dispatch (async) the device log-probs that do not need rewards: the reference
        policy's with a KL term, the sampling policy's for mu > 1 updates. Returns them by
        `Batch` field and a future of their device span (None when there are none)."""
        c = self.config
        device = {}
        if self.ref_params is not None:
            device["ref_logp"] = completion_logprobs(self.ref_params, rows, self.model_cfg,
                                                     c.sampling.temperature)[0]
        if c.algo.num_iterations > 1:
            device["old_logp"] = completion_logprobs(params, rows, self.model_cfg, c.sampling.temperature)[0]
        return device, (_watch(device) if device else None)

    def _host_work(self, texts, examples):
        """The rewards thread's task: (outcome `ScoreBatch`, executed CoCTE trajectories, PRM
        rows), the last two None without process rewards."""
        if self.prm_scorer is None:
            return self._score(texts, examples), None, None
        from jaxsql.cocte import execute_completions
        from rl.prm_score import encode_rows

        # every step's prefix query first: the final step's query is the completion's SQL,
        # which the outcome reward then finds in the pool's cache
        trajs = execute_completions(self.pool, [(ex.db_path, t) for ex, t in zip(examples, texts)])
        score = self._score(texts, examples)
        rows = encode_rows(self.prm_scorer.prm, [self.encoder(ex) for ex in examples], trajs,
                           self.process.max_len)
        return score, trajs, rows

    def _score(self, texts, examples, sqls=None, episodes=None):
        """This process's completions scored on its own SQL pool (its local databases); a
        multi-turn draw passes its final answers (`sqls`) and `episodes`."""
        from jaxsql.rewards import score_batch

        return score_batch(self.pool, texts, examples, self.rewards, sqls=sqls, episodes=episodes)

    def _process_scores(self, rows, trajs, tokens, lengths, texts, examples) -> dict[str, Any]:
        """Dispatch the PRM on this process's rows (each prompt once per group of G), place
        the steps on the completion tokens while it runs, then gather both over processes
        (global row order)."""
        t0 = time.perf_counter()
        scores_dev = self.prm_scorer.dispatch(rows, [self.encoder(ex) for ex in examples],
                                              self.config.sampling.num_generations)
        ready = _watch(scores_dev)
        h0 = time.perf_counter()
        ends = completion_step_ends(self.tokenizer, tokens, lengths, self.stop_ids, texts,
                                    [t.step_spans() for t in trajs])
        h1 = time.perf_counter()
        local = [(len(r.positions), len(t.steps), tuple(e)) for r, t, e in zip(rows, trajs, ends)]
        gathered = [x for part in distributed.process_objects(local) for x in part]
        table = distributed.to_host(scores_dev)
        start, end = ready.result()
        return {"scores": tuple(tuple(float(v) for v in table[i, :k]) for i, (k, _, _) in enumerate(gathered)),
                "n_steps": tuple(n for _, n, _ in gathered), "ends": tuple(e for _, _, e in gathered),
                "span": (t0, end), "hidden": max(0.0, min(h1, end) - max(h0, start))}

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
                mask = algo.informative_groups(draws[d]["rewards"], G)
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
        rewards = np.concatenate([d["rewards"] for d in draws])[index]
        adv = np.array(algo.compute_advantages(c.algo.advantage, rewards, G, c.algo.adv_eps))
        if self.process is not None and self.process.form == "step":
            # per-token advantages [B*G, C] from the outcome rewards and the step scores
            steps = StepScores.concat([d["steps"] for d in draws]).take(index)
            _, adv = step_advantages(self.process.advantage, rewards, adv, steps, G, self.rewards.process_weight,
                                     rows.completion_tokens.shape[1], c.algo.adv_eps)
        if filler:
            adv[n_real * G:] = 0.0
            live = self.update_step.global_rows((np.arange(B * G) < n_real * G).astype(np.int32)[:, None])
            rows = rows.replace(completion_mask=rows.completion_mask * live,
                                loss_mask=None if rows.loss_mask is None else rows.loss_mask * live)
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
        m["reward/std"] = float(first["rewards"].std())
        if first["steps"] is not None:
            steps = first["steps"]
            m["reward/outcome_mean"] = float(first["score"].rewards.mean())
            m["reward/mean"] = float(first["rewards"].mean())
            m["reward/process_mean"] = float(steps.trajectory(self.process.aggregation).mean())
            flat = [v for s in steps.scores for v in s]
            m["reward/step_score_mean"] = float(np.mean(flat)) if flat else 0.0
            m["reward/steps_mean"] = float(np.mean(steps.n_steps))
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
        if self.prm_scorer is not None:
            m["time/prm_s"] = sum(d["prm_span"][1] - d["prm_span"][0] for d in draws)
            m["time/prm_hidden_s"] = sum(d["prm_hidden"] for d in draws)
        m.update({"time/rollout_s": rollout_s, "time/rewards_s": reward_s, "time/logprobs_s": logprob_s,
                  "time/reward_hidden_s": hidden, "time/update_s": t_end - t_update, "time/step_s": step_s,
                  "tokens_per_s": float(sum(np.sum(d["lengths"]) for d in draws)) / max(step_s, 1e-9)})
        if c.rollout.multi_turn:
            # the tool's metrics over every draw's episodes; the rollout's own timings summed
            n_eps = sum(d["tool"]["tool/episodes"] for d in draws)
            for k in first["tool"]:
                total = sum(d["tool"][k] * (1.0 if _is_count(k) else d["tool"]["tool/episodes"]) for d in draws)
                m[k] = total if _is_count(k) else total / max(n_eps, 1.0)
            for k in ("decode_s", "tool_s", "extend_s"):
                m[f"time/{k}"] = sum(d["rollout_stats"].get(k, 0.0) for d in draws)
        self._log_samples(step, first)
        return m

    def _log_samples(self, step: int, draw: dict) -> None:
        if not is_lead_process():
            return
        G = self.config.sampling.num_generations
        line = json.dumps({"step": step, "ids": [m["id"] for m in draw["score"].metrics[::G]],
                           "completion": draw["texts"][0][:500], "reward": float(draw["score"].rewards[0])}) + "\n"
        if self._samples is None:  # in a bucket, rewritten whole at each flush (jaxsql.paths)
            self._samples = open_append(self.run_dir / "samples.jsonl")
            self._releases.append(self._samples.close)
        self._samples.write(line)
        self._samples.flush()

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
