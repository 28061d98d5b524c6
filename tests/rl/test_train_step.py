"""The jitted train step: sharded == single device, micro-batches, NaN guard, SFT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsql.sharding import make_mesh
from models.config import ModelConfig
from models.model import init_params
from rl import algo
from rl.batch import Batch, FlatBatch
from rl.config import OptimSection
from rl.train_step import StepConfig, TrainStep, init_state, make_optimizer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
N, P, C = 8, 5, 4


def _batch(seed=0, beta=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, (N, P + C)).astype(np.int32)
    mask = np.ones((N, P + C), np.int32)
    mask[0, :2] = 0  # left padding
    mask[3, -2:] = 0  # short completion
    tokens[mask == 0] = 0
    cm = mask[:, P:].copy()
    b = {"tokens": tokens, "mask": mask, "completion_mask": cm,
         "advantages": rng.normal(size=N).astype(np.float32),
         "old_logp": (-4.0 + 0.1 * rng.normal(size=(N, C))).astype(np.float32) * cm,
         "sampler_logp": (-4.0 + 0.1 * rng.normal(size=(N, C))).astype(np.float32) * cm}
    if beta:
        b["ref_logp"] = (-4.1 + 0.1 * rng.normal(size=(N, C))).astype(np.float32) * cm
    return b


_STEPS = {}


def _train_step(mesh, sc, lr, adam_eps):
    # one compiled step per setting: compiling dominates these tests' time
    key = (tuple(mesh.shape.items()), sc, lr, adam_eps)
    if key not in _STEPS:
        opt = make_optimizer(OptimSection(learning_rate=lr, max_grad_norm=1.0, weight_decay=0.01,
                                          eps=adam_eps), 10)
        _STEPS[key] = TrainStep(CFG, sc, opt, mesh)
    return _STEPS[key]


def _run(mesh, sc, batch, steps=1, lr=1e-3, adam_eps=1e-4):
    ts = _train_step(mesh, sc, lr, adam_eps)
    opt = ts.optimizer
    params = init_params(CFG, jax.random.PRNGKey(0))
    state = init_state(params, opt, ts.state_shardings)
    metrics = None
    if isinstance(batch, dict):
        batch = FlatBatch(**batch)
    for _ in range(steps):
        state, metrics = ts(state, ts.place_batch(batch))
    return jax.device_get(state), jax.device_get(metrics)


def _grouped(b, G=4):
    """The same rows in the grouped layout (N/G prompts, each with its G completions)."""
    g = {k: v for k, v in b.items() if k not in ("tokens", "mask")}
    g["prompt_tokens"] = b["tokens"][::G, :P].copy()
    g["prompt_mask"] = b["mask"][::G, :P].copy()
    g["completion_tokens"] = b["tokens"][:, P:].copy()
    return Batch(**g)


def _shared_prompts(b, G=4):
    """Make rows of a group share their prompt (as GRPO samples do)."""
    b = dict(b)
    for k in ("tokens", "mask"):
        x = b[k].copy()
        x[:, :P] = np.repeat(x[::G, :P], G, axis=0)
        b[k] = x
    return b


SC = StepConfig(loss="grpo", loss_config=algo.PolicyLossConfig(loss_agg="token_mean", eps_high=0.28, beta=0.04,
                                                               max_len=C, tis_cap=2.0))


def test_eight_devices_equal_one_device():
    assert len(jax.devices()) == 8
    # Adam's first update is ~lr * g / (|g| + eps): with eps=1e-8 a gradient entry
    # near 1e-8 turns a 1e-9 difference in summation order into a 1e-4 step, so
    # the test uses eps=1e-4 to compare the step, not the rounding of ~0 gradients.
    # the trainer's grouped layout: 2 prompts (replicated: 4 batch shards) x 4 completions
    batch = _grouped(_shared_prompts(_batch()))
    one, m1 = _run(make_mesh(1, 1, 1, devices=jax.devices()[:1]), SC, batch)
    eight, m8 = _run(make_mesh(2, 2, 2), SC, batch)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(eight["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    assert int(eight["step"]) == 1 and int(eight["skipped"]) == 0
    # the parameters really moved
    p0 = init_params(CFG, jax.random.PRNGKey(0))
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(one["params"]))) > 1e-4
    for k in ("kl", "clip_fraction", "entropy", "mismatch_abs", "grad_norm"):
        assert np.isfinite(m8[k]), k


def test_micro_batches_equal_full_batch():
    agg = "token_mean"  # rl/test_algo covers every aggregation's micro-batch algebra
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    loss = SC.loss_config
    full, mf = _run(mesh, SC, _batch())
    micro, mm = _run(mesh, StepConfig(loss_config=loss, micro_batches=2), _batch())
    np.testing.assert_allclose(mf["loss"], mm["loss"], rtol=1e-5)
    np.testing.assert_allclose(mf["grad_norm"], mm["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(micro["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_nan_guard_skips_update():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    b = _batch()
    b["advantages"][0] = np.nan
    state, m = _run(mesh, SC, b)
    p0 = init_params(CFG, jax.random.PRNGKey(0))
    for a, c in zip(jax.tree.leaves(p0), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, c)
    assert int(state["skipped"]) == 1 and int(state["step"]) == 0 and m["update_skipped"] == 1.0


def test_without_old_logp_ratio_is_one_and_sft_lowers_nll():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    b = _batch(beta=False)
    del b["old_logp"], b["sampler_logp"]
    _, m = _run(mesh, StepConfig(loss_config=algo.PolicyLossConfig(beta=0.0, max_len=C)), b)
    np.testing.assert_allclose(m["ratio"], 1.0, rtol=1e-6)
    assert m["clip_fraction"] == 0.0 and "kl" not in m
    sft = {k: b[k] for k in ("tokens", "mask", "completion_mask")}
    _, m1 = _run(mesh, StepConfig(loss="sft"), sft, steps=1, lr=1e-2)
    _, m5 = _run(mesh, StepConfig(loss="sft"), sft, steps=8, lr=1e-2)
    assert m5["nll"] < m1["nll"] - 0.1


def test_completion_logprobs_match_model_and_chunking():
    from models.model import token_logprobs
    from rl.policy import logprobs_and_entropy

    params = init_params(CFG, jax.random.PRNGKey(1))
    b = _batch()
    want = np.asarray(token_logprobs(params, CFG, jnp.asarray(b["tokens"]), jnp.asarray(b["mask"]),
                                     temperature=0.7))[:, P:] * b["completion_mask"]
    whole, ent = logprobs_and_entropy(params, CFG, b["tokens"], b["mask"], C, temperature=0.7)
    chunked, ent_c = logprobs_and_entropy(params, CFG, b["tokens"], b["mask"], C, temperature=0.7, chunk=3)
    cm = b["completion_mask"]
    np.testing.assert_allclose(np.asarray(whole) * cm, want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked) * cm, want, atol=1e-5)
    np.testing.assert_allclose(ent_c, ent, atol=1e-5)
    assert (np.asarray(ent) > 0).all() and (np.asarray(ent) <= np.log(64) + 1e-4).all()


def test_full_width_layout_equals_completion_layout():
    """Rows given with [N, T] per-token arrays train exactly like the [N, C] layout."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    b = _batch()
    wide = dict(b)
    for k in ("completion_mask", "old_logp", "sampler_logp", "ref_logp"):
        wide[k] = np.concatenate([np.zeros((N, P), b[k].dtype), b[k]], 1)
    wide = FlatBatch.from_full_width(**wide)
    narrow_state, mn = _run(mesh, SC, b)
    wide_state, mw = _run(mesh, SC, wide)
    np.testing.assert_allclose(mn["loss"], mw["loss"], rtol=1e-5)
    for a, c in zip(jax.tree.leaves(narrow_state["params"]), jax.tree.leaves(wide_state["params"])):
        np.testing.assert_allclose(a, c, atol=1e-6)


def test_grouped_layout_equals_full_rows_with_micro_batches():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    full = _shared_prompts(_batch())
    sc2 = StepConfig(loss_config=SC.loss_config, micro_batches=2)
    full_state, mf = _run(mesh, sc2, full)
    grouped_state, mg = _run(mesh, sc2, _grouped(full))
    np.testing.assert_allclose(mf["loss"], mg["loss"], rtol=1e-5)
    np.testing.assert_allclose(mf["entropy"], mg["entropy"], rtol=1e-5)
    for a, c in zip(jax.tree.leaves(full_state["params"]), jax.tree.leaves(grouped_state["params"])):
        np.testing.assert_allclose(a, c, atol=1e-6)


@pytest.mark.slow  # splash in Pallas interpret mode through a forward and backward pass on 8 devices
def test_splash_attention_in_the_sharded_step_equals_xla(monkeypatch):
    """The step runs under its mesh (`jax.set_mesh`), so the splash kernel is placed per device
    (shard_map: rows over data x fsdp, heads over tensor), as `auto` picks it on a multi-chip TPU."""
    from models import attention as attn
    from models.attention import interpret_kernels

    placed = []
    original = attn._shard_over
    monkeypatch.setattr(attn, "_shard_over", lambda *a: placed.append(a[1].shape) or original(*a))
    mesh = make_mesh(2, 2, 2)
    sc = StepConfig(loss="grpo", loss_config=algo.PolicyLossConfig(beta=0.04, max_len=C))
    opt = make_optimizer(OptimSection(learning_rate=1e-3, eps=1e-4), 10)
    out = {}
    for attention in ("xla", "splash"):
        ts = TrainStep(CFG.replace(attention=attention), sc, opt, mesh)
        state = init_state(init_params(CFG, jax.random.PRNGKey(0)), opt, ts.state_shardings)
        with interpret_kernels():
            state, metrics = ts(state, ts.place_batch(FlatBatch(**_batch())))
        out[attention] = jax.device_get((state["params"], metrics["loss"]))
    assert placed and all(dict(m) == dict(mesh.shape) for m in placed)  # the kernel ran under the step's mesh
    np.testing.assert_allclose(out["splash"][1], out["xla"][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["splash"][0]), jax.tree.leaves(out["xla"][0])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow  # splash in Pallas interpret mode through two log-prob passes on 8 devices
def test_reference_logprobs_run_splash_under_the_trainer_mesh(monkeypatch):
    """The reference/old log-probs (`rl.rollout.completion_logprobs`) run under the mesh the
    trainer's parameters live on, so the splash kernel is placed per device as in the update;
    full rows and grouped rows equal the `xla` values."""
    from models import attention as attn
    from models.attention import interpret_kernels
    from rl.rollout import completion_logprobs

    placed = []
    original = attn._shard_over
    monkeypatch.setattr(attn, "_shard_over", lambda *a: placed.append(dict(a[1].shape)) or original(*a))
    mesh = make_mesh(2, 2, 2)
    ts = _train_step(mesh, SC, 1e-3, 1e-4)
    params = init_state(init_params(CFG, jax.random.PRNGKey(0)), ts.optimizer, ts.state_shardings)["params"]
    b = _shared_prompts(_batch(), G=2)
    batches = {"flat": ts.place_batch(FlatBatch(**b)), "grouped": ts.place_batch(_grouped(b, G=2))}
    out = {}
    for attention in ("xla", "splash"):
        with interpret_kernels():
            for kind, batch in batches.items():
                out[attention, kind] = np.asarray(completion_logprobs(params, batch, CFG.replace(attention=attention),
                                                                      0.7)[0])
    assert len(placed) >= 2 and all(m == dict(mesh.shape) for m in placed)  # under the trainer's mesh
    for kind in batches:
        np.testing.assert_allclose(out["splash", kind], out["xla", kind], atol=1e-5)
    np.testing.assert_allclose(out["xla", "grouped"], out["xla", "flat"], atol=1e-5)
