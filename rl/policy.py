"""Per-token log-probabilities and entropies of completions under the policy.

Two row layouts (the two batch types of `rl.batch`). *Full rows*: ``[left-padded prompt | completion (C slots,
right-padded)]``
of length T: the completion always occupies the last C columns, so only
those C positions need the vocabulary projection. ``mask_BT`` marks real
tokens (prompt and completion). Outputs are ``[B, C]``: entry c scores token
``T - C + c`` from the hidden state just before it.

*Grouped rows* (`grouped_logprobs_and_entropy`): N prompts and B = N x G
completions, the prompt run once per group.

The [B, C, V] logits are materialised whole when they fit a budget
(`WHOLE_LOGITS_LIMIT` values); otherwise the completion is processed in
chunks with each chunk rematerialised in the backward pass, so memory stays
at [B, chunk, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.model import hidden_states, output_logits, positions_from_mask
from rl.batch import Batch, FlatBatch

# Below this many logits (B x C x V) the head runs in one piece without remat.
WHOLE_LOGITS_LIMIT = 64 * 1024 * 1024


def _head(params, cfg: ModelConfig, h_BcD, t_Bc, temperature: float, with_entropy: bool):
    logits = output_logits(params, h_BcD, cfg) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    lp = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0] - logz
    if not with_entropy:
        return lp, jnp.zeros_like(lp)
    logits_ng = jax.lax.stop_gradient(logits)
    p = jnp.exp(logits_ng - jax.lax.stop_gradient(logz)[..., None])
    ent = jax.lax.stop_gradient(logz) - (p * logits_ng).sum(-1)
    return lp, ent


def _completion_head(params, cfg: ModelConfig, h_BCD, t_BC, temperature: float, with_entropy: bool,
                     chunk: int | None):
    """Log-probs (and entropies) of tokens `t_BC` from the hidden states that predict them."""
    B, C = t_BC.shape
    if chunk is None:  # as many positions per chunk as fit the logits budget
        chunk = max(1, WHOLE_LOGITS_LIMIT // (B * cfg.vocab_size))
    if C <= chunk:
        lp, ent = _head(params, cfg, h_BCD, t_BC, temperature, with_entropy)
    else:
        pad = (-C) % chunk
        nc = (C + pad) // chunk
        h = jnp.pad(h_BCD, ((0, 0), (0, pad), (0, 0))).reshape(B, nc, chunk, -1).swapaxes(0, 1)
        t = jnp.pad(t_BC, ((0, 0), (0, pad))).reshape(B, nc, chunk).swapaxes(0, 1)

        def one(_, xs):
            return None, _head(params, cfg, xs[0], xs[1], temperature, with_entropy)

        # Remat each chunk so the backward pass keeps no [B, C, V] softmax residuals.
        _, (lp, ent) = jax.lax.scan(jax.checkpoint(one), None, (h, t))
        lp = lp.swapaxes(0, 1).reshape(B, -1)[:, :C]
        ent = ent.swapaxes(0, 1).reshape(B, -1)[:, :C]
    return lp, (ent if with_entropy else None)


def logprobs_and_entropy(
    params,
    cfg: ModelConfig,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    completion_len: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """``log pi(x_t | x_<t)`` for the last `completion_len` positions [B, C] and, if
    asked, the entropy ``H_t = -sum_v p_v log p_v`` of each of those next-token
    distributions (no gradient). Logits are divided by `temperature` (the
    sampler's) before the softmax, so ratios compare like with like."""
    B, T = tokens_BT.shape
    C = completion_len
    mask = mask_BT.astype(jnp.bool_)
    h_BTD, _ = hidden_states(params, tokens_BT, positions_from_mask(mask), cfg, mask_BT=mask)
    return _completion_head(params, cfg, h_BTD[:, T - C - 1:T - 1], tokens_BT[:, T - C:], temperature,
                            with_entropy, chunk)


def grouped_logprobs_and_entropy(
    params,
    cfg: ModelConfig,
    prompt_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    completion_BC: jax.Array,
    completion_mask_BC: jax.Array,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """`logprobs_and_entropy` for G = B / N completions per prompt, running each prompt once.

    The N left-padded prompts go through the decoder once, filling a KV cache;
    the cache is repeated G times and the B completions attend to it, so the
    prompt's share of the forward and backward passes is paid once per group
    instead of G times (GRPO's G samples share their prompt). Completion c is
    predicted by the hidden state before it: the prompt's last one for c = 0.
    Same values as the full-row function up to float summation order.
    """
    N, P = prompt_NP.shape
    B, C = completion_BC.shape
    G = B // N
    pm = prompt_mask_NP.astype(jnp.bool_)
    h_prompt, cache = hidden_states(params, prompt_NP, positions_from_mask(pm), cfg, mask_BT=pm, fill_cache=P + C,
                                    last_only=True)
    cache = cache.repeat_rows(G)
    start_B = jnp.repeat(pm.sum(axis=1, dtype=jnp.int32), G)
    positions = start_B[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    h_comp, _ = hidden_states(params, completion_BC, positions, cfg,
                              mask_BT=completion_mask_BC.astype(jnp.bool_), cache=cache)
    h_BCD = jnp.concatenate([jnp.repeat(h_prompt, G, axis=0), h_comp[:, :-1]], axis=1)
    return _completion_head(params, cfg, h_BCD, completion_BC, temperature, with_entropy, chunk)


def batch_logprobs(params, cfg: ModelConfig, batch: Batch | FlatBatch, *, temperature: float = 1.0,
                   with_entropy: bool = True, chunk: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs (and entropies) [rows, C] of a batch's completion positions, by its type:
    grouped (`Batch`, each prompt run once) or full rows (`FlatBatch`)."""
    if isinstance(batch, Batch):
        return grouped_logprobs_and_entropy(params, cfg, batch.prompt_tokens, batch.prompt_mask,
                                            batch.completion_tokens, batch.completion_mask,
                                            temperature=temperature, with_entropy=with_entropy, chunk=chunk)
    if isinstance(batch, FlatBatch):
        return logprobs_and_entropy(params, cfg, batch.tokens, batch.mask, batch.completion_len,
                                    temperature=temperature, with_entropy=with_entropy, chunk=chunk)
    raise TypeError(f"batch_logprobs: expected rl.batch.Batch or FlatBatch, got {type(batch).__name__}")
