"""SFT cold start: cross-entropy on the gold completion's tokens only.

Each example becomes one row ``[left-padded prompt | target + EOS | padding]``
(the target is `data.prompts.render_target` in the run's prompt format), and
the same jitted, sharded step as GRPO (``StepConfig(kind="sft")``) minimises
``-sum_t log p(y_t) / #target tokens`` over the batch (token-mean, global
across micro-batches). Checkpoints, resume, SIGTERM and HF export work as in
`rl.trainer`; the HF export in ``<run_dir>/hf`` is the GRPO run's
``model.path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from data.records import Example
from jaxsql.checkpoint import PreemptionGuard
from jaxsql.metrics import MetricsWriter, ProgressBar
from models.sampler import bucket_length
from rl import setup
from rl.config import SftConfig
from rl.rollout import PromptEncoder
from rl.train_step import StepConfig, TrainStep, init_state, make_optimizer


def sft_rows(examples: Sequence[Example], encoder: PromptEncoder, max_target_len: int, eos_id: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """Host arrays tokens / mask [B, P + L] and completion_mask [B, L] (L = max_target_len,
    P a bucket length): the target sits in the last L columns."""
    prompts = [encoder(ex) for ex in examples]
    targets = [encoder.target_ids(ex, max_target_len, eos_id) for ex in examples]
    P = bucket_length(max(len(p) for p in prompts))
    B, T = len(examples), P + max_target_len
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        tokens[i, P - len(p):P] = p
        mask[i, P - len(p):P] = 1
        tokens[i, P:P + len(t)] = t
        mask[i, P:P + len(t)] = 1
        cm[i, P:P + len(t)] = 1
    return {"tokens": tokens, "mask": mask, "completion_mask": cm[:, P:]}


class SftTrainer:
    """Supervised fine-tuning run with the GRPO machinery (mesh, step, checkpoints)."""

    def __init__(self, config: SftConfig, *, resume: bool = False):
        self.config = c = config
        self.run_dir = Path(c.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mesh = setup.build_mesh(c.mesh)
        self.model_cfg, params = setup.load_policy(c.model, self.mesh)
        self.tokenizer = setup.load_tokenizer(c.model)
        stop_ids, self.pad_id = setup.special_ids(self.tokenizer, self.model_cfg)
        eos = self.tokenizer.eos_token_id
        self.eos_id = int(eos if eos is not None else stop_ids[0])
        self.encoder = PromptEncoder(self.tokenizer, c.data.prompt_format, c.data.max_prompt_len)
        examples = setup.load_examples(c.data, self.run_dir)
        self.iterator = setup.data_stream(examples, c.data, c.data.batch_size)
        self.optimizer = make_optimizer(c.optim, c.steps)
        self.train_step = TrainStep(self.model_cfg, StepConfig(kind="sft", micro_batches=c.optim.micro_batches),
                                    self.optimizer, self.mesh, cache_key=(c.optim, c.steps))
        self.state = init_state(params, self.optimizer, self.train_step.state_shardings)
        del params
        self.rng = jax.random.PRNGKey(c.seed)
        self.checkpointer = setup.open_checkpointer(self.run_dir, c.checkpoint, resume=resume)
        self.state, self.rng, self.start_step = setup.restore_run(
            self.checkpointer, self.state, self.rng, self.iterator)

    def save(self, step: int) -> bool:
        """Checkpoint the run as `step`."""
        return setup.save_run(self.checkpointer, step, self.state, self.rng, self.iterator,
                              self.config.to_dict(), self.model_cfg, "sft")

    def step(self) -> tuple[dict[str, float], float]:
        """One update on the next batch: (the train step's metrics as floats, tokens in the batch).

        `run` loops over it; callers with their own loop (the demo's budget and
        progress) call it directly, then `save` and `export`.
        """
        batch = sft_rows(next(self.iterator), self.encoder, self.config.data.max_target_len, self.eos_id,
                         self.pad_id)
        self.state, out = self.train_step(self.state, self.train_step.place_batch(batch))
        return {k: float(v) for k, v in jax.device_get(out).items()}, float(batch["mask"].sum())

    def run(self) -> dict[str, Any]:
        """Train to `config.steps`; returns a summary with the per-step metrics."""
        import time

        c = self.config
        history = []
        step, stopped = self.start_step, False
        bar = ProgressBar(c.steps, initial=step, desc="sft", enabled=c.progress, show=("train/nll",))
        try:
            with MetricsWriter(self.run_dir, tensorboard=c.tensorboard) as writer, PreemptionGuard() as guard:
                while step < c.steps:
                    t0 = time.perf_counter()
                    out, batch_tokens = self.step()
                    m = {f"train/{k}": v for k, v in out.items()}
                    m["time/step_s"] = time.perf_counter() - t0
                    m["tokens_per_s"] = batch_tokens / m["time/step_s"]
                    step += 1
                    history.append(m)
                    if step % c.log_every == 0 or step == c.steps:
                        writer.write(step, m)
                    bar.update(m)
                    if guard.stop_requested():
                        self.save(step)
                        stopped = True
                        break
                    if c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0:
                        self.save(step)
                if not stopped:
                    self.save(step)
                self.checkpointer.wait()
        finally:
            bar.close()
        if not stopped and c.checkpoint.export_hf:
            self.export(self.run_dir / "hf")
        return {"step": step, "stopped": stopped, "history": history}

    def export(self, out_dir: str | Path) -> Path:
        """Write the current weights as an HF checkpoint with the tokenizer."""
        return setup.export_policy(out_dir, self.config.model, self.model_cfg, self.state["params"])

    def close(self) -> None:
        self.checkpointer.close()


def sft(config: SftConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run the SFT cold start (the `jaxsql sft` command)."""
    trainer = SftTrainer(config, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
