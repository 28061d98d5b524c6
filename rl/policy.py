"""Per-token log-probabilities and entropies of completions under the policy.

A training row is ``[left-padded prompt | completion | right padding]`` of
length T. ``mask_BT`` marks real tokens (prompt and completion),
``completion_BT`` the completion tokens that are scored. Entry t of the
outputs scores token t (from the logits at t-1), matching
`models.model.token_logprobs`; the [B, T, V] logits are computed chunk by
chunk so memory stays at [B, chunk, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.model import hidden_states, output_logits, positions_from_mask


def logprobs_and_entropy(
    params,
    cfg: ModelConfig,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk: int = 128,
) -> tuple[jax.Array, jax.Array | None]:
    """``log pi(x_t | x_<t)`` [B, T] and, if asked, the entropy of the next-token
    distribution that produced x_t, ``H_t = -sum_v p_v log p_v`` [B, T] (no gradient).

    Logits are divided by `temperature` (the sampler's) before the softmax, so
    ratios compare like with like. Entry 0 and entries after/at padding are 0.
    """
    B, T = tokens_BT.shape
    mask = mask_BT.astype(jnp.bool_)
    h_BTD, _ = hidden_states(params, tokens_BT, positions_from_mask(mask), cfg, mask_BT=mask)
    n = T - 1
    c = max(1, min(chunk, n))
    pad = (-n) % c
    h_prev = jnp.pad(h_BTD[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, pad)))
    nc = (n + pad) // c
    h_CBcD = h_prev.reshape(B, nc, c, -1).swapaxes(0, 1)
    t_CBc = targets.reshape(B, nc, c).swapaxes(0, 1)

    def one(_, xs):
        h, t = xs
        logits = output_logits(params, h, cfg) / temperature
        logz = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - logz
        if with_entropy:
            logits_ng = jax.lax.stop_gradient(logits)
            p = jax.nn.softmax(logits_ng, axis=-1)
            ent = jax.lax.stop_gradient(logz) - (p * logits_ng).sum(-1)
        else:
            ent = jnp.zeros_like(lp)
        return None, (lp, ent)

    # Remat each chunk so the backward pass does not keep [B, T, V] softmax residuals.
    _, (lp_CBc, ent_CBc) = jax.lax.scan(jax.checkpoint(one), None, (h_CBcD, t_CBc))
    valid = mask[:, 1:] & mask[:, :-1]

    def finish(x_CBc):
        x = x_CBc.swapaxes(0, 1).reshape(B, nc * c)[:, :n]
        x = jnp.where(valid, x, 0.0)
        return jnp.concatenate([jnp.zeros((B, 1), jnp.float32), x], axis=1)

    return finish(lp_CBc), (finish(ent_CBc) if with_entropy else None)
