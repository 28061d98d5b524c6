"""GRPO / DAPO / Dr. GRPO as pure functions, registered by name.

Advantage estimators map the rewards of ``num_groups`` groups of ``G``
completions (flattened, group-major: rows ``g*G .. g*G+G-1`` belong to
prompt ``g``) to one advantage per completion. Loss aggregators turn a
per-token loss into ``(loss_sum, denominator)`` so that the mean stays
*global* when a batch is split into gradient-accumulation micro-batches:
the trainer sums both over micro-batches and divides once at the end.

Notation: ``r_i`` reward of completion ``i``; ``mean_g``/``std_g`` over its
group; ``pi``/``pi_old``/``pi_ref`` the current, rollout-time and reference
policies; ``rho_t = pi(o_t)/pi_old(o_t)``; ``m_t`` the completion mask.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxsql.errors import ConfigError

Array = jax.Array

ADVANTAGES: dict[str, Callable[..., Array]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[..., tuple[Array, Array]]] = {}


def register_advantage(name: str):
    """Register an advantage estimator ``fn(rewards_N, group_size, eps) -> adv_N``."""

    def deco(fn):
        ADVANTAGES[name] = fn
        return fn

    return deco


def register_loss_aggregation(name: str):
    """Register ``fn(loss_BT, mask_BT, max_len) -> (loss_sum, denominator)``."""

    def deco(fn):
        LOSS_AGGREGATIONS[name] = fn
        return fn

    return deco


def get_advantage(name: str) -> Callable[..., Array]:
    """The registered advantage estimator `name` (ConfigError naming the choices)."""
    if name not in ADVANTAGES:
        raise ConfigError(f"AlgoConfig.advantage: unknown {name!r}; known: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def get_loss_aggregation(name: str) -> Callable[..., tuple[Array, Array]]:
    """The registered loss aggregation `name` (ConfigError naming the choices)."""
    if name not in LOSS_AGGREGATIONS:
        raise ConfigError(
            f"AlgoConfig.loss_agg: unknown {name!r}; known: {sorted(LOSS_AGGREGATIONS)}"
        )
    return LOSS_AGGREGATIONS[name]


def _groups(rewards_N: Array, group_size: int) -> Array:
    return jnp.asarray(rewards_N, jnp.float32).reshape(-1, group_size)


# ----------------------------------------------------------------- advantages


@register_advantage("grpo")
def group_advantages(rewards_N: Array, group_size: int, eps: float = 1e-6) -> Array:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, eq. 3 / sec. 4.1.2).

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` with the population std of
    the group (as in Tunix ``compute_advantages``).
    """
    r_GK = _groups(rewards_N, group_size)
    mean = r_GK.mean(axis=1, keepdims=True)
    std = r_GK.std(axis=1, keepdims=True)
    return ((r_GK - mean) / (std + eps)).reshape(-1)


@register_advantage("batch")
def batch_advantages(rewards_N: Array, group_size: int, eps: float = 1e-6) -> Array:
    """Group-centred, batch-scaled advantage (Think2SQL, Papicchio et al. 2025, sec. 3;
    Hu et al. 2025 REINFORCE++ / "Lite PPO" batch normalisation).

    ``A_i = (r_i - mean_g(r)) / (std_batch(r) + eps)``: the baseline is still the
    group mean, but the scale is the std over all rewards of the batch, so a
    group with near-equal rewards is not blown up.
    """
    r_GK = _groups(rewards_N, group_size)
    mean = r_GK.mean(axis=1, keepdims=True)
    return ((r_GK - mean) / (r_GK.std() + eps)).reshape(-1)


@register_advantage("drgrpo")
def centred_advantages(rewards_N: Array, group_size: int, eps: float = 1e-6) -> Array:
    """Dr. GRPO advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3).

    ``A_i = r_i - mean_g(r)``: no division by the std, which removes the
    question-difficulty bias. `eps` is unused.
    """
    del eps
    r_GK = _groups(rewards_N, group_size)
    return (r_GK - r_GK.mean(axis=1, keepdims=True)).reshape(-1)


@register_advantage("none")
def raw_advantages(rewards_N: Array, group_size: int, eps: float = 1e-6) -> Array:
    """No baseline and no scaling (REINFORCE, Williams 1992): ``A_i = r_i``."""
    del group_size, eps
    return jnp.asarray(rewards_N, jnp.float32)


# ------------------------------------------------------------ loss aggregation


@register_loss_aggregation("token_mean")
def token_mean(loss_BT: Array, mask_BT: Array, max_len: int) -> tuple[Array, Array]:
    """DAPO token-level loss (Yu et al. 2025, eq. 8 / sec. 3.3).

    ``L = sum_{i,t} l_{i,t} m_{i,t} / sum_{i,t} m_{i,t}``: every token of the
    batch has equal weight, so long completions are not down-weighted.
    Returns ``(sum_{i,t} l m, sum_{i,t} m)``.
    """
    del max_len
    m = mask_BT.astype(loss_BT.dtype)
    return (loss_BT * m).sum(), m.sum()


@register_loss_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(loss_BT: Array, mask_BT: Array, max_len: int) -> tuple[Array, Array]:
    """GRPO sample-level loss (Shao et al. 2024, DeepSeekMath, eq. 3).

    ``L = 1/N sum_i (1/|o_i|) sum_t l_{i,t}``. Returns
    ``(sum_i mean_t l_{i,t}, N)``; an empty completion contributes 0.
    """
    del max_len
    m = mask_BT.astype(loss_BT.dtype)
    per_seq = (loss_BT * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
    return per_seq.sum(), jnp.asarray(loss_BT.shape[0], loss_BT.dtype)


@register_loss_aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss_BT: Array, mask_BT: Array, max_len: int) -> tuple[Array, Array]:
    """Dr. GRPO constant-length normalisation (Liu et al. 2025, eq. 3 / appendix).

    ``L = 1/N sum_i (1/L_max) sum_t l_{i,t}`` with ``L_max`` the configured
    maximum completion length, a constant, so no length bias. Returns
    ``(sum_{i,t} l m / L_max, N)``.
    """
    m = mask_BT.astype(loss_BT.dtype)
    return (loss_BT * m).sum() / float(max_len), jnp.asarray(loss_BT.shape[0], loss_BT.dtype)


# ---------------------------------------------------------------- policy loss


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Static settings of `policy_loss` (hashable: a jit static argument).

    Attributes:
      loss_agg: name in `LOSS_AGGREGATIONS`.
      eps_low / eps_high: PPO clip range ``[1-eps_low, 1+eps_high]``
        (DAPO clip-higher when ``eps_high > eps_low``).
      beta: KL weight; 0 means no reference log-probs are needed at all.
      tis_cap: truncated importance-sampling cap C, or None for no correction.
      max_len: ``L_max`` of the Dr. GRPO constant normalisation.
    """

    loss_agg: str = "token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    tis_cap: float | None = None
    max_len: int = 1


def k3_kl(logp_BT: Array, ref_logp_BT: Array) -> Array:
    """k3 estimator of KL(pi || pi_ref) per token (Schulman 2020, "Approximating KL
    Divergence"; used by GRPO, Shao et al. 2024 eq. 4).

    ``k3 = exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased for samples of pi).
    """
    d = ref_logp_BT - logp_BT
    return jnp.exp(d) - d - 1.0


def tis_weights(old_logp_BT: Array, sampler_logp_BT: Array, cap: float) -> Array:
    """Truncated importance sampling for sampler/trainer mismatch (Yao et al. 2025,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").

    ``w_t = min(pi_old_trainer(o_t) / pi_sampler(o_t), C)``, no gradient.
    """
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(old_logp_BT - sampler_logp_BT), cap))


def policy_loss(
    logp_BT: Array,
    old_logp_BT: Array,
    advantages: Array,
    mask_BT: Array,
    cfg: PolicyLossConfig,
    ref_logp_BT: Array | None = None,
    sampler_logp_BT: Array | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """Clipped surrogate with optional k3 KL and TIS, aggregated as ``cfg.loss_agg``.

    Per token (PPO, Schulman et al. 2017; clip-higher from DAPO, Yu et al. 2025)::

        rho = exp(logp - old_logp)
        l   = -w * min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3

    with ``w`` the TIS weight (1 without correction). `advantages` is one per completion
    ``[B]`` (broadcast over its tokens: the outcome advantage) or one per token ``[B, T]``
    (process rewards' per-token advantages, `rl.process`). Returns
    ``(loss_sum, denominator, metric_sums)``; `metric_sums` holds *sums* over
    completion tokens (``clipped``, ``kl``, ``ratio``, ``mismatch_abs``) and
    ``tokens`` so micro-batches can be added before dividing.
    """
    m = mask_BT.astype(jnp.float32)
    adv = (advantages[:, None] if advantages.ndim == 1 else advantages).astype(jnp.float32)
    ratio = jnp.exp(logp_BT - old_logp_BT)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    surrogate = jnp.minimum(ratio * adv, clipped_ratio * adv)
    if cfg.tis_cap is not None:
        if sampler_logp_BT is None:
            raise ValueError("policy_loss: tis_cap is set but sampler log-probs are missing")
        surrogate = surrogate * tis_weights(old_logp_BT, sampler_logp_BT, cfg.tis_cap)
    loss = -surrogate
    metrics: dict[str, Array] = {"tokens": m.sum()}
    if cfg.beta != 0.0:
        if ref_logp_BT is None:
            raise ValueError("policy_loss: beta != 0 but reference log-probs are missing")
        kl = k3_kl(logp_BT, ref_logp_BT)
        loss = loss + cfg.beta * kl
        metrics["kl"] = (kl * m).sum()
    is_clipped = (ratio * adv) > (clipped_ratio * adv)
    metrics["clipped"] = (is_clipped.astype(jnp.float32) * m).sum()
    metrics["ratio"] = (ratio * m).sum()
    if sampler_logp_BT is not None:
        metrics["mismatch_abs"] = (jnp.abs(old_logp_BT - sampler_logp_BT) * m).sum()
    loss_sum, denom = get_loss_aggregation(cfg.loss_agg)(loss, m, cfg.max_len)
    return loss_sum, denom, metrics


def sft_loss(logp_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """Cross-entropy on completion tokens only: ``(-sum_t logp_t m_t, sum_t m_t)``."""
    m = mask_BT.astype(jnp.float32)
    return -(logp_BT * m).sum(), m.sum()


def mismatch_metric(old_logp_BT: np.ndarray, sampler_logp_BT: np.ndarray, mask_BT: np.ndarray) -> dict[str, float]:
    """Sampler/trainer log-prob mismatch over completion tokens (always logged).

    ``mean |logp_trainer - logp_sampler|`` and ``max`` of the same.
    """
    m = np.asarray(mask_BT, bool)
    if not m.any():
        return {"mismatch/mean_abs": 0.0, "mismatch/max_abs": 0.0}
    d = np.abs(np.asarray(old_logp_BT, np.float64) - np.asarray(sampler_logp_BT, np.float64))[m]
    return {"mismatch/mean_abs": float(d.mean()), "mismatch/max_abs": float(d.max())}


# ------------------------------------------------------------ dynamic sampling


def informative_groups(rewards_N: np.ndarray, group_size: int, tol: float = 1e-9) -> np.ndarray:
    """DAPO dynamic sampling filter (Yu et al. 2025, eq. 11 / sec. 3.2).

    A group whose G rewards are all equal has zero advantage everywhere and no
    gradient; returns a bool mask over groups, True where
    ``max_g(r) - min_g(r) > tol``.
    """
    r = np.asarray(rewards_N, np.float64).reshape(-1, group_size)
    return (r.max(axis=1) - r.min(axis=1)) > tol


def compute_advantages(name: str, rewards_N, group_size: int, eps: float = 1e-6) -> Array:
    """Look up `name` and apply it (convenience for the trainer)."""
    return get_advantage(name)(jnp.asarray(rewards_N, jnp.float32), group_size, eps)


def known_names() -> Mapping[str, list[str]]:
    """Registered names, for config validation and docs."""
    return {"advantage": sorted(ADVANTAGES), "loss_agg": sorted(LOSS_AGGREGATIONS)}
