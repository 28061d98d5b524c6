"""Every attention implementation that runs on the CPU against the reference (`models.model.attention`),
forward and gradients, with left padding, grouped-query heads and a KV cache.

`jax.nn.dot_product_attention`'s XLA implementation runs through the same wrapper as the cuDNN path;
the Pallas splash kernel runs in interpret mode (`models.attention.interpret_kernels`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.sharding import make_mesh
from models import attention as attn
from models.config import preset
from models.model import attention as reference
from models.model import hidden_states, init_params, positions_from_mask, token_logprobs

B, N, K, H = 4, 4, 2, 64  # GQA: two query heads per KV head


def _case(seed: int, T: int, S: int | None):
    """Random q, keys (slots last), values and the mask facts of one call.

    S None: self-attention over T left-padded tokens. Else a cache of S slots whose first
    `index` are written (left-padded prompts), the T new tokens at [index, index + T) with
    right padding (finished completions), the slots after them unwritten.
    """
    rng = np.random.RandomState(seed)
    lead = rng.randint(0, 5, B)  # left padding per row
    if S is None:
        S, index = T, None
        q_mask = np.arange(T)[None, :] >= lead[:, None]
        k_mask = q_mask
    else:
        index = S - T - 3  # three unwritten slots at the end: the roll must wrap them
        q_mask = np.arange(T)[None, :] < rng.randint(1, T + 1, B)[:, None]
        k_mask = np.zeros((B, S), bool)
        k_mask[:, :index] = np.arange(index)[None, :] >= lead[:, None]
        k_mask[:, index:index + T] = q_mask
    q = jnp.asarray(rng.randn(B, T, N, H), jnp.float32)
    kT = jnp.asarray(rng.randn(B, K, H, S), jnp.float32)
    v = jnp.asarray(rng.randn(B, K, S, H), jnp.float32)
    off = None if index is None else jnp.asarray(index, jnp.int32)
    parts = attn.MaskParts(jnp.asarray(q_mask), jnp.asarray(k_mask), off)
    slot_T = np.arange(T) + (0 if index is None else index)
    allowed = jnp.asarray((np.arange(S)[None, None, :] <= slot_T[None, :, None]) & k_mask[:, None, :])
    cot = jnp.asarray(rng.randn(B, T, N, H), jnp.float32) * jnp.asarray(q_mask)[:, :, None, None]
    return q, kT, v, parts, allowed, cot


def _value_and_grads(fn, q, kT, v, cot):
    """Output and the gradients of <output, cot> (cot is zero on padding queries) w.r.t. q, k, v."""
    def loss(q, kT, v):
        return jnp.sum(fn(q, kT, v) * cot)

    return jax.jit(lambda q, kT, v: (fn(q, kT, v), jax.grad(loss, argnums=(0, 1, 2))(q, kT, v)))(q, kT, v)


def _check(impl_fn, seed, T, S, atol=2e-5):
    q, kT, v, parts, allowed, cot = _case(seed, T, S)
    out, grads = _value_and_grads(lambda q, k, v: impl_fn(q, k, v, parts), q, kT, v, cot)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: reference(q, k, v, allowed), q, kT, v, cot)
    real = np.asarray(parts.query_mask_BT)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=atol, rtol=atol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=atol, rtol=atol)


@pytest.mark.parametrize("T,S", [(24, None), (8, 40)], ids=["self", "cache"])
def test_dot_product_attention_matches_reference(T, S):
    """The cuDNN wrapper's layouts and mask, run by jax.nn.dot_product_attention's XLA implementation."""
    _check(lambda q, k, v, p: attn.dot_product_attention(q, k, v, p, implementation="xla"), 0, T, S)


@pytest.mark.parametrize("T,S", [(24, None), (130, 200)], ids=["self", "cache-two-blocks"])
def test_splash_matches_reference(T, S):
    """Splash in interpret mode: padded to its 128-slot blocks, rolled to put the queries last."""
    _check(lambda q, k, v, p: attn.splash_attention(q, k, v, p, interpret=True), 1, T, S)


def test_splash_sharded_over_a_mesh_context():
    """With a mesh set, splash runs under shard_map (rows over data x fsdp, heads over tensor)."""
    mesh = make_mesh(2, 2, 2)
    with attn.interpret_kernels(), jax.set_mesh(mesh):
        _check(lambda q, k, v, p: attn.splash_attention(q, k, v, p, interpret=True), 2, 8, 40)


def _tiny(attention: str):
    return preset("tiny", num_layers=2, attention=attention)


@pytest.mark.slow  # splash in interpret mode through two layers, forward and backward
def test_model_paths_with_splash_equal_xla():
    """Full model: token_logprobs and its parameter gradients, and a prefill followed by a
    T > 1 chunk against the cache (the grouped GRPO path), splash (interpreted) against xla."""
    cfg_x, cfg_s = _tiny("xla"), _tiny("splash")
    params = init_params(cfg_x, jax.random.key(0), std=0.2)
    rng = np.random.RandomState(3)
    tokens = jnp.asarray(rng.randint(3, cfg_x.vocab_size, (3, 20)))
    mask = jnp.ones((3, 20), bool).at[0, :6].set(False).at[2, :2].set(False)

    def logprob_and_grad(cfg):
        def loss(p):
            return token_logprobs(p, cfg, tokens, mask).sum()
        return jax.jit(lambda p: (token_logprobs(p, cfg, tokens, mask), jax.grad(loss)(p)))(params)

    def chunked(cfg):
        prompt, prompt_mask = tokens[:, :12], mask[:, :12]
        _, cache = hidden_states(params, prompt, positions_from_mask(prompt_mask), cfg, mask_BT=prompt_mask,
                                 fill_cache=20)
        comp_mask = jnp.ones((3, 8), bool).at[1, 5:].set(False)
        pos = jnp.sum(prompt_mask, axis=1)[:, None] + jnp.arange(8)[None]
        h, _ = hidden_states(params, tokens[:, 12:], pos, cfg, mask_BT=comp_mask, cache=cache)
        return h, comp_mask

    lp_x, g_x = logprob_and_grad(cfg_x)
    h_x, comp_mask = jax.jit(lambda: chunked(cfg_x))()
    with attn.interpret_kernels():
        lp_s, g_s = logprob_and_grad(cfg_s)
        h_s, _ = jax.jit(lambda: chunked(cfg_s))()
    np.testing.assert_allclose(np.asarray(lp_s), np.asarray(lp_x), atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_x)):  # float32 summation order differs
        assert np.linalg.norm(np.asarray(a - b)) <= 1e-5 * np.linalg.norm(np.asarray(b))
    real = np.asarray(comp_mask)
    np.testing.assert_allclose(np.asarray(h_s)[real], np.asarray(h_x)[real], atol=1e-5)


def test_choice_is_checked():
    with pytest.raises(ConfigError, match="ModelConfig.attention"):
        preset("tiny", attention="flash")
    assert attn.resolve("auto", "float32") == "xla"  # the CPU default
    assert attn.resolve("xla", "bfloat16") == "xla"
    with pytest.raises(JaxsqlError, match="needs an NVIDIA GPU"):
        attn.resolve("cudnn", "bfloat16")
    with pytest.raises(JaxsqlError, match="is a TPU kernel"):
        attn.resolve("splash", "float32")
    with attn.interpret_kernels():
        assert attn.resolve("splash", "float32") == "splash"
    cfg = _tiny("cudnn")  # a config may name it; running it here is the error
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(JaxsqlError, match="needs an NVIDIA GPU"):
        token_logprobs(params, cfg, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool))


def test_cudnn_refuses_float32(monkeypatch):
    monkeypatch.setattr(attn, "_is_cuda", lambda: True)
    assert attn.resolve("auto", "bfloat16") == "cudnn"
    assert attn.resolve("auto", "float32") == "xla"
    with pytest.raises(JaxsqlError, match="compute_dtype bfloat16 or float16"):
        attn.resolve("cudnn", "float32")


@pytest.mark.slow  # splash in interpret mode through the prefill and an extend of two layers
def test_sampler_prefill_runs_splash_under_the_parameters_mesh(monkeypatch):
    """The sampler's prefill (`generate`, `start`) and `extend` run under the mesh the parameters
    live on, here a sampler's own 4 devices (not the default 8, as `sampling_devices` may pick),
    so the splash kernel is placed per device (shard_map), and the samples equal xla's."""
    from jax.sharding import NamedSharding, PartitionSpec

    from models import sampler

    placed = []
    original = attn._shard_over
    monkeypatch.setattr(attn, "_shard_over", lambda *a: placed.append(dict(a[1].shape)) or original(*a))
    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[4:])
    params = jax.device_put(init_params(_tiny("xla"), jax.random.key(0), std=0.2), NamedSharding(mesh, PartitionSpec()))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18], [3, 4]]
    out = {}
    for name in ("xla", "splash"):
        cfg = _tiny(name)
        with attn.interpret_kernels():
            sample = sampler.generate(params, cfg, prompts, key=jax.random.key(1), max_new_tokens=3, greedy=True,
                                      num_samples=2)
            model = sampler.sampler_model(params, cfg)
            state = sampler.start(model, prompts, key=jax.random.key(1))
            state = sampler.extend(model, state, [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29]])
            state = sampler.decode(model, state, 2, greedy=True)
        out[name] = (np.asarray(sample.tokens), np.asarray(sample.logprobs), *sampler.tokens(state))
    assert placed and all(m == dict(mesh.shape) for m in placed)  # the kernel ran under the sampler's mesh
    assert len(placed) >= 3  # generate's prefill, start's prefill, extend
    np.testing.assert_array_equal(out["splash"][0], out["xla"][0])
    np.testing.assert_allclose(out["splash"][1], out["xla"][1], atol=1e-5)
    for a, b in zip(out["splash"][2:], out["xla"][2:]):
        np.testing.assert_allclose(a, b, atol=1e-5)
