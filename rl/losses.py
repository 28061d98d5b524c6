"""Training objectives registered by name; the jitted step (`rl.train_step`) takes one.

A loss is a pure function ``fn(params, batch, ctx) -> (loss_sum, denominator,
metric_sums)`` of one micro-batch:

- `batch` is an `rl.batch.Batch` (grouped) or `rl.batch.FlatBatch` (full rows);
  `rl.policy.batch_logprobs` gives the per-token log-probs of either;
- `ctx` (`LossContext`, static) carries the model config, the sampler's
  temperature, the logits chunking and the loss's own settings
  (``ctx.settings``, any hashable value, e.g. `rl.algo.PolicyLossConfig`);
- ``loss_sum / denominator`` is the loss; both are *sums* over the
  micro-batch so that the step adds them over micro-batches and divides once
  (token-mean stays global, see `rl.algo`);
- `metric_sums` must hold ``tokens`` (the positions scored); every other
  entry is a sum over those positions that the step reports divided by the
  batch's ``tokens`` as ``train/<name>``.

Adding an objective touches neither the step nor the loop: register it and
name it in `rl.train_step.StepConfig.loss`. The process reward model's
binary cross-entropy at step-end positions (``"prm_bce"``) is one: it reads
the PRM's logit at the columns a `FlatBatch`'s ``completion_mask`` weights
against ``batch.targets`` (the step labels) and returns ``(sum of BCE terms,
number of step ends, {"tokens": number of step ends, ...})``; the PRM trainer
(`rl.prm_train`) builds those batches with `rl.prm.flat_batch`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp

from jaxsql.errors import ConfigError
from models.config import ModelConfig
from rl import algo
from rl.batch import Batch, FlatBatch
from rl.policy import batch_logprobs

Array = jax.Array
LossOutput = tuple[Array, Array, dict[str, Array]]
LossFn = Callable[[Any, "Batch | FlatBatch", "LossContext"], LossOutput]

LOSSES: dict[str, LossFn] = {}


@dataclasses.dataclass(frozen=True)
class LossContext:
    """Static inputs of a loss besides the parameters and the batch.

    Attributes:
      model_cfg: the decoder's config.
      temperature: the sampler's temperature (log-probs use logits / T).
      logits_chunk: completion positions per chunk of the log-softmax (None: by budget).
      settings: the loss's own hashable settings (e.g. `rl.algo.PolicyLossConfig`), or None.
    """

    model_cfg: ModelConfig
    temperature: float = 1.0
    logits_chunk: int | None = None
    settings: Hashable = None


def register_loss(name: str):
    """Register ``fn(params, batch, ctx) -> (loss_sum, denominator, metric_sums)`` as `name`."""

    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    """The registered loss `name` (ConfigError naming the choices)."""
    if name not in LOSSES:
        raise ConfigError(f"StepConfig.loss: unknown {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name]


def _logprobs(params, batch, ctx: LossContext, with_entropy: bool):
    return batch_logprobs(params, ctx.model_cfg, batch, temperature=ctx.temperature, with_entropy=with_entropy,
                          chunk=ctx.logits_chunk)


@register_loss("grpo")
def clipped_policy_objective(params, batch: Batch | FlatBatch, ctx: LossContext) -> LossOutput:
    """GRPO / DAPO / Dr. GRPO clipped surrogate (`rl.algo.policy_loss` with ``ctx.settings``, a
    `PolicyLossConfig`), plus the policy's mean entropy on its completions as a metric.

    Without ``batch.old_logp`` (mu = 1) the old log-probs are the current ones, detached.
    """
    logp, ent = _logprobs(params, batch, ctx, with_entropy=True)
    cm = batch.scored_mask.astype(jnp.float32)
    old = batch.old_logp if batch.old_logp is not None else jax.lax.stop_gradient(logp)
    s, d, metrics = algo.policy_loss(logp, old, batch.advantages, cm, ctx.settings,
                                     ref_logp_BT=batch.ref_logp, sampler_logp_BT=batch.sampler_logp)
    metrics["clip_fraction"] = metrics.pop("clipped")
    metrics["entropy"] = (ent * cm).sum()
    return s, d, metrics


@register_loss("sft")
def completion_cross_entropy(params, batch: Batch | FlatBatch, ctx: LossContext) -> LossOutput:
    """SFT: ``-sum_t log p(y_t) m_t / sum_t m_t`` over the scored completion tokens
    (`rl.algo.sft_loss`); reports ``nll`` per token."""
    logp, _ = _logprobs(params, batch, ctx, with_entropy=False)
    s, d = algo.sft_loss(logp, batch.scored_mask.astype(jnp.float32))
    return s, d, {"tokens": d, "nll": s}


@register_loss("prm_bce")
def process_reward_bce(params, batch: FlatBatch, ctx: LossContext) -> LossOutput:
    """The PRM's binary cross-entropy at the step ends (`rl.prm.prm_bce`): ``ctx.settings`` is
    a `rl.prm.PrmLossConfig` (head, candidate ids); the batch is `rl.prm.flat_batch` of a
    `rl.prm.PrmBatch` (step weights in ``completion_mask``, labels in ``targets``). Reports
    ``agree`` (score and label on the same side of 0.5), ``score`` and ``label`` per step."""
    from rl.prm import prm_bce

    return prm_bce(params, batch, ctx.settings, ctx.model_cfg)


def known_losses() -> list[str]:
    """Registered loss names (config validation, docs)."""
    return sorted(LOSSES)
