"""An update at learning rate 1e-6: float32 master weights with bf16 compute move as the
float32 step does; bf16 master weights lose most of it to rounding (the bug being fixed)."""

import jax
import numpy as np

from jaxsql.sharding import make_mesh
from models.config import ModelConfig
from models.model import cast_params, init_params
from rl import algo
from rl.batch import FlatBatch
from rl.config import OptimSection
from rl.train_step import StepConfig, TrainStep, init_state, make_optimizer

BASE = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
N, P, C = 8, 5, 4


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 64, (N, P + C)).astype(np.int32)
    mask = np.ones((N, P + C), np.int32)
    cm = mask[:, P:].copy()
    return FlatBatch(tokens=tokens, mask=mask, completion_mask=cm,
                     advantages=rng.normal(size=N).astype(np.float32),
                     sampler_logp=(-4.0 + 0.1 * rng.normal(size=(N, C))).astype(np.float32))


def _update(param_dtype: str, compute_dtype: str):
    """(initial, updated) parameters as float32 numpy arrays after one GRPO step at lr 1e-6."""
    cfg = BASE.replace(param_dtype=param_dtype, compute_dtype=compute_dtype)
    opt = make_optimizer(OptimSection(learning_rate=1e-6, max_grad_norm=0.0), 10)
    step = TrainStep(cfg, StepConfig(loss="grpo", loss_config=algo.PolicyLossConfig(beta=0.0, max_len=C)), opt,
                     make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    params = cast_params(init_params(BASE, jax.random.PRNGKey(0)), param_dtype)
    before = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
    state = init_state(params, opt, step.state_shardings)
    floats = [x for x in jax.tree.leaves(state["opt_state"]) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    assert {x.dtype for x in floats} == {np.dtype(param_dtype)}  # Adam's moments follow the master weights
    state, metrics = step(state, step.place_batch(_batch()))
    assert metrics["update_skipped"] == 0.0
    after = [np.asarray(x, np.float32) for x in jax.tree.leaves(jax.device_get(state["params"]))]
    return np.concatenate([b.ravel() for b in before]), np.concatenate([a.ravel() for a in after])


def test_bf16_compute_with_float32_master_weights_keeps_small_updates():
    p0, p32 = _update("float32", "float32")
    q0, mixed = _update("float32", "bfloat16")
    h0, half = _update("bfloat16", "bfloat16")
    np.testing.assert_array_equal(p0, q0)
    d32, dmix, dhalf = p32 - p0, mixed - q0, half - h0
    # float32 master weights: (nearly) every weight moves by ~lr, with bf16 compute as with float32
    assert np.mean(d32 != 0) > 0.99 and np.mean(dmix != 0) > 0.99
    assert np.mean(np.sign(dmix) == np.sign(d32)) > 0.99  # measured 0.998
    assert np.linalg.norm(dmix - d32) < 0.15 * np.linalg.norm(d32)  # measured 0.093: the flipped signs
    assert abs(np.abs(dmix).mean() - np.abs(d32).mean()) < 0.02 * np.abs(d32).mean()
    # bf16 master weights: the 1e-6 steps round away for most weights
    assert np.mean(dhalf == 0) > 0.9  # measured 0.976
