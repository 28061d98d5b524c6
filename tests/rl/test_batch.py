"""The typed batch, the KV cache's group repeat and axes, and a loss registered outside the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsql.sharding import ShardingRules, make_mesh, tree_shardings
from models.config import ModelConfig
from models.model import KVCache, init_cache, init_params, token_logprobs
from rl.batch import Batch, FlatBatch
from rl.config import OptimSection
from rl.losses import LOSSES, LossContext, get_loss, register_loss
from rl.policy import batch_logprobs
from rl.train_step import StepConfig, TrainStep, init_state, make_optimizer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
N, G, P, C = 2, 2, 5, 4


def _grouped(seed=0) -> Batch:
    rng = np.random.default_rng(seed)
    pt = rng.integers(3, 64, (N, P)).astype(np.int32)
    pm = np.ones((N, P), np.int32)
    pm[0, :2] = 0
    pt[pm == 0] = 0
    ct = rng.integers(3, 64, (N * G, C)).astype(np.int32)
    cm = np.ones((N * G, C), np.int32)
    cm[1, -1] = 0
    ct[cm == 0] = 0
    return Batch(prompt_tokens=pt, prompt_mask=pm, completion_tokens=ct, completion_mask=cm)


def test_flat_is_the_grouped_rows_written_out():
    b = _grouped().replace(advantages=np.arange(N * G, dtype=np.float32))
    f = b.flat()
    assert isinstance(f, FlatBatch) and f.completion_len == C
    np.testing.assert_array_equal(f.tokens[2], np.concatenate([b.prompt_tokens[1], b.completion_tokens[2]]))
    np.testing.assert_array_equal(f.mask[1], np.concatenate([b.prompt_mask[0], b.completion_mask[1]]))
    np.testing.assert_array_equal(f.advantages, b.advantages)
    # a loss mask becomes the flat rows' scored positions; the real-token mask stays
    lm = np.zeros_like(b.completion_mask)
    lm[:, 1] = 1
    f2 = b.replace(loss_mask=lm).flat()
    np.testing.assert_array_equal(f2.completion_mask, lm)
    np.testing.assert_array_equal(f2.mask, f.mask)


def test_batch_is_a_pytree_and_groups_select_and_concat():
    b = _grouped()
    leaves, tree = jax.tree.flatten(b)
    assert len(leaves) == 4  # absent optional fields are not leaves
    assert isinstance(jax.tree.unflatten(tree, leaves), Batch)
    sel = b.select_groups(np.array([1]))
    np.testing.assert_array_equal(sel.prompt_tokens, b.prompt_tokens[1:])
    np.testing.assert_array_equal(sel.completion_tokens, b.completion_tokens[2:])
    wide = Batch(prompt_tokens=np.full((1, P + 2), 7, np.int32), prompt_mask=np.ones((1, P + 2), np.int32),
                 completion_tokens=b.completion_tokens[:2], completion_mask=b.completion_mask[:2])
    cat = Batch.concat([b, wide])
    assert cat.prompt_tokens.shape == (N + 1, P + 2)
    np.testing.assert_array_equal(cat.prompt_mask[0, :2], 0)  # narrower prompts padded on the left
    with pytest.raises(ValueError, match="some parts only"):
        Batch.concat([b.replace(advantages=np.zeros(N * G, np.float32)), b])


def test_kv_cache_repeats_rows_and_declares_axes():
    stacked = init_cache(CFG, 2, 6)
    stacked = stacked._replace(k=stacked.k.at[:, 1].set(1.0), mask_BS=stacked.mask_BS.at[1].set(True))
    rep = stacked.repeat_rows(3)
    assert rep.k.shape[1] == 6 and rep.mask_BS.shape == (6, 6)
    np.testing.assert_array_equal(np.asarray(rep.k[:, 3:, 0, 0, 0]), 1.0)
    np.testing.assert_array_equal(np.asarray(rep.k[:, :3, 0, 0, 0]), 0.0)
    assert np.asarray(rep.mask_BS[3:]).all() and not np.asarray(rep.mask_BS[:3]).any()
    per_layer = init_cache(CFG, 2, 6, per_layer=True).repeat_rows(2)
    assert all(a.shape[0] == 4 for a in per_layer.k + per_layer.v)
    # the sharding table places the cache like parameters: rows over data, KV heads over tensor
    mesh = make_mesh(2, 1, 2, devices=jax.devices()[:4])
    sh = tree_shardings(KVCache.axes(), mesh, ShardingRules(), init_cache(CFG, 4, 8))
    assert tuple(sh.k.spec)[:3] == (None, "data", "tensor") and tuple(sh.v.spec)[:3] == (None, "data", "tensor")
    assert sh.mask_BS.spec[0] == "data"
    sh_l = tree_shardings(KVCache.axes(CFG.num_layers), mesh, ShardingRules(),
                          init_cache(CFG, 4, 8, per_layer=True))
    assert tuple(sh_l.v[1].spec)[:2] == ("data", "tensor")


def _bce_at_positions(params, batch, ctx: LossContext):
    """A PRM-style objective: BCE of p_t = exp(log p(token_t)) against targets at loss-mask positions."""
    logp, _ = batch_logprobs(params, ctx.model_cfg, batch, temperature=ctx.temperature, with_entropy=False)
    m = batch.scored_mask.astype(jnp.float32)
    p = jnp.clip(jnp.exp(logp), 1e-6, 1 - 1e-6)
    y = batch.targets
    bce = -(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))
    return (bce * m).sum(), m.sum(), {"tokens": m.sum(), "positive": (y * m).sum()}


def test_a_loss_registered_outside_the_step_trains_with_golden_values():
    register_loss("test_step_bce")(_bce_at_positions)
    try:
        assert get_loss("test_step_bce") is _bce_at_positions
        b = _grouped(1)
        lm = np.zeros((N * G, C), np.int32)
        lm[:, [1, 3]] = 1  # "step ends"
        lm[1, 3] = 0  # a padded position is not a step end
        targets = np.zeros((N * G, C), np.float32)
        targets[[0, 2], 1] = 1.0
        targets[3, 3] = 1.0
        b = b.replace(loss_mask=lm, targets=targets)
        params = init_params(CFG, jax.random.PRNGKey(3))
        # golden value from the model's own full-sequence log-probs, in numpy
        f = b.flat()
        lp_full = np.asarray(token_logprobs(params, CFG, jnp.asarray(f.tokens), jnp.asarray(f.mask)))[:, P:]
        p = np.clip(np.exp(lp_full.astype(np.float64)), 1e-6, 1 - 1e-6)
        bce = -(targets * np.log(p) + (1 - targets) * np.log1p(-p))
        want = float((bce * lm).sum() / lm.sum())
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        opt = make_optimizer(OptimSection(learning_rate=1e-2), 10)
        ts = TrainStep(CFG, StepConfig(loss="test_step_bce", loss_config=None), opt, mesh)
        state = init_state(params, opt, ts.state_shardings)
        state, m = ts(state, ts.place_batch(b))
        m = jax.device_get(m)
        np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
        assert m["tokens"] == lm.sum() == 7 and m["positive"] == pytest.approx(3 / 7)
        # the same objective on the flat rows gives the same value
        ts_flat = TrainStep(CFG, StepConfig(loss="test_step_bce", loss_config=None), opt, mesh)
        state_f = init_state(init_params(CFG, jax.random.PRNGKey(3)), opt, ts_flat.state_shardings)
        _, mf = ts_flat(state_f, ts_flat.place_batch(f.replace(targets=targets)))
        np.testing.assert_allclose(float(mf["loss"]), want, rtol=1e-5)
        moved = max(float(np.abs(np.asarray(a) - np.asarray(c)).max())
                    for a, c in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])))
        assert moved > 1e-4
    finally:
        LOSSES.pop("test_step_bce", None)


def test_unknown_loss_and_untyped_batch_are_refused():
    from jaxsql.errors import ConfigError

    with pytest.raises(ConfigError, match="StepConfig.loss: unknown 'nope'"):
        get_loss("nope")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ts = TrainStep(CFG, StepConfig(loss="sft"), make_optimizer(OptimSection(), 1), mesh)
    with pytest.raises(TypeError, match="rl.batch.Batch or FlatBatch"):
        ts(None, {"tokens": np.zeros((2, 3), np.int32)})
