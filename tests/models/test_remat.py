"""Rematerialisation on the grouped update path (`rl.policy.grouped_logprobs_and_entropy`): the
completions run through the KV-cache branch of `hidden_states`, which applies ``ModelConfig.remat``
with the prompt's keys and values as scanned inputs.

Gradients under every policy equal the no-remat gradients; XLA's own buffer assignment (the
compiled executable's memory analysis, nothing timed) needs less temporary memory with ``full``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import REMAT_POLICIES, ModelConfig
from models.model import init_params
from rl.policy import grouped_logprobs_and_entropy

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True, attention="xla")


def _batch(N: int, G: int, P: int, C: int, V: int, seed: int = 0):
    """N left-padded prompts and N x G right-padded completions, random tokens."""
    rng = np.random.RandomState(seed)
    prompt = rng.randint(1, V, (N, P))
    pmask = np.arange(P)[None, :] >= rng.randint(0, P // 2, N)[:, None]  # left padding
    comp = rng.randint(1, V, (N * G, C))
    cmask = np.arange(C)[None, :] < rng.randint(1, C + 1, N * G)[:, None]  # finished early
    return (jnp.asarray(prompt * pmask), jnp.asarray(pmask), jnp.asarray(comp * cmask), jnp.asarray(cmask))


def _loss(cfg: ModelConfig, batch, weights_BC):
    def loss(params):
        lp, _ = grouped_logprobs_and_entropy(params, cfg, *batch, with_entropy=False)
        return jnp.sum(lp * weights_BC)

    return loss


def test_grouped_gradients_equal_without_remat_for_every_policy():
    batch = _batch(N=2, G=3, P=7, C=5, V=CFG.vocab_size)
    weights = jnp.asarray(np.random.RandomState(1).randn(6, 5), jnp.float32) * batch[3]
    params = init_params(CFG, jax.random.PRNGKey(0), std=0.2)
    ref_val, ref_grad = jax.jit(jax.value_and_grad(_loss(CFG, batch, weights)))(params)
    assert float(jnp.abs(jnp.concatenate([g.ravel() for g in jax.tree.leaves(ref_grad)])).max()) > 1e-3
    for policy in REMAT_POLICIES[1:]:
        cfg = CFG.replace(remat=policy)
        val, grad = jax.jit(jax.value_and_grad(_loss(cfg, batch, weights)))(params)
        np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-6)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(ref_grad)):
            # float32 summation order differs with recompute: within 1e-5 of the leaf's scale
            err = float(jnp.abs(g - r).max())
            assert err <= 1e-5 * float(jnp.abs(r).max()), (policy, jax.tree_util.keystr(path), err)


def _temp_bytes(cfg: ModelConfig, batch, weights) -> int:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    compiled = jax.jit(jax.grad(_loss(cfg, batch, weights))).lower(params).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no compiled memory analysis")
    return int(analysis.temp_size_in_bytes)


def test_full_remat_needs_less_temporary_memory_on_the_grouped_path():
    # 8 layers of 64 completion positions x 8 rows: the saved activations of all layers dominate
    # without remat; with `full` only each layer's input is kept.
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_layers=8, num_heads=4,
                      num_kv_heads=2, head_dim=16, attention="xla")
    batch = _batch(N=2, G=4, P=16, C=64, V=cfg.vocab_size)
    weights = batch[3].astype(jnp.float32)
    none = _temp_bytes(cfg, batch, weights)
    full = _temp_bytes(cfg.replace(remat="full"), batch, weights)
    assert full < 0.6 * none, (full, none)
