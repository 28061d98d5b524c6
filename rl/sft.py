"""SFT cold start: cross-entropy on the gold completion's tokens only.

Each example becomes one group of size 1 of an `rl.batch.Batch` (its
left-padded prompt, then ``target + EOS`` right-padded; the target is
`data.prompts.render_target` in the run's prompt format), trained as full
rows (`Batch.flat`: with one completion per prompt there is no prompt to
share). The same jitted, sharded step as GRPO minimises the registered
``"sft"`` loss (`rl.losses`): ``-sum_t log p(y_t) / #target tokens`` over the
batch (token-mean, global across micro-batches). In a multi-turn format
(``tool``) the target is a trace (`data.multiturn`): its observation tokens
are context, not targets: the batch's ``loss_mask`` is 0 on them. `SftTrainer` is a
`rl.base_trainer.BaseTrainer`: checkpoints, resume, SIGTERM / SIGINT and the
HF export work as for GRPO; the HF export in ``<run_dir>/hf`` is the GRPO
run's ``model.path``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from data.records import Example
from jaxsql.distributed import process_values, to_host
from models.sampler import bucket_length
from rl.base_trainer import BaseTrainer
from rl.batch import Batch
from rl.config import SftConfig
from rl.rollout import PromptEncoder
from rl.train_step import StepConfig


def sft_batch(examples: Sequence[Example], encoder: PromptEncoder, max_target_len: int, eos_id: int,
              pad_id: int, longest_prompt: int | None = None) -> Batch:
    """Host arrays of a G = 1 batch: prompts [B, P] (P the bucket length of the longest
    prompt, or of `longest_prompt` when given: the longest over every process's rows, so
    that all processes pad to one width; left-padded) and targets + EOS [B, L]
    (L = max_target_len, right-padded). A multi-turn prompt format (one with
    `data.prompts.PromptFormat.segments`) also sets ``loss_mask`` [B, L]: 1 on the
    model's tokens and EOS, 0 on observation tokens and padding
    (`data.multiturn.encode_trace`)."""
    from data.prompts import get_format

    prompts = [encoder(ex) for ex in examples]
    segments = get_format(encoder.prompt_format).segments
    masks = None
    if segments is None:
        targets = [encoder.target_ids(ex, max_target_len, eos_id) for ex in examples]
    else:
        from data.multiturn import encode_trace

        encoded = [encode_trace(encoder.tokenizer, segments(ex), max_target_len, eos_id) for ex in examples]
        targets, masks = [t for t, _ in encoded], [m for _, m in encoded]
    longest = max(len(p) for p in prompts)
    if longest_prompt is not None:
        if longest_prompt < longest:
            raise ValueError(f"sft_batch: longest_prompt={longest_prompt} but a prompt has {longest} tokens")
        longest = longest_prompt
    P = bucket_length(longest)
    B, L = len(examples), max_target_len
    prompt = np.full((B, P), pad_id, np.int32)
    prompt_mask = np.zeros((B, P), np.int32)
    completion = np.full((B, L), pad_id, np.int32)
    completion_mask = np.zeros((B, L), np.int32)
    loss_mask = None if masks is None else np.zeros((B, L), np.int32)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        prompt[i, P - len(p):] = p
        prompt_mask[i, P - len(p):] = 1
        completion[i, :len(t)] = t
        completion_mask[i, :len(t)] = 1
        if loss_mask is not None:
            loss_mask[i, :len(t)] = masks[i]
    return Batch(prompt_tokens=prompt, prompt_mask=prompt_mask, completion_tokens=completion,
                 completion_mask=completion_mask, loss_mask=loss_mask)


class SftTrainer(BaseTrainer):
    """Supervised fine-tuning run with the GRPO machinery (mesh, step, checkpoints, loop)."""

    kind = "sft"
    progress_keys = ("train/nll",)

    def __init__(self, config: SftConfig, *, resume: bool = False):
        super().__init__(config, resume=resume,
                         step_config=StepConfig(loss="sft", micro_batches=config.optim.micro_batches),
                         total_updates=config.steps)
        eos = self.tokenizer.eos_token_id
        self.eos_id = int(eos if eos is not None else self.stop_ids[0])

    def step(self, step: int) -> dict[str, float]:
        """One update on the next batch; the train step's metrics, step time and tokens/s."""
        import jax

        t0 = time.perf_counter()
        # this process's rows of the global batch; the step trains on all processes' rows
        examples = next(self.iterator)
        longest = int(process_values(np.int32(max(len(self.encoder(ex)) for ex in examples))).max())
        batch = sft_batch(examples, self.encoder, self.config.data.max_target_len, self.eos_id,
                          self.pad_id, longest_prompt=longest).flat()
        out = jax.tree.map(to_host, self.update(batch))
        m = {f"train/{k}": float(v) for k, v in out.items()}
        m["time/step_s"] = time.perf_counter() - t0
        m["tokens_per_s"] = float(process_values(np.int32(batch.mask.sum())).sum()) / m["time/step_s"]
        return m


def sft(config: SftConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run the SFT cold start (the `jaxsql sft` command)."""
    with SftTrainer(config, resume=resume) as trainer:
        return trainer.run()
