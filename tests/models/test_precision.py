"""Mixed precision: float32 master weights, bfloat16 matmuls, float32 norms / softmax / log-probs,
a bf16 copy for sampling, and HF export in the checkpoint's dtype."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxsql.sharding import make_mesh
from models import hf_io
from models.config import ModelConfig
from models.model import cast_params, forward, init_params, positions_from_mask, token_logprobs
from models.safetensors_io import SafetensorsReader

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
                  compute_dtype="bfloat16")


def _eqns(jaxpr):
    """Every equation of a jaxpr, inside scans, loops, remat and nested jits too."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_forward_computes_in_the_compute_dtype_from_float32_params():
    params = init_params(CFG, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    tokens = jnp.ones((2, 6), jnp.int32)
    mask = jnp.ones((2, 6), jnp.bool_)

    def run(p):
        logits, _ = forward(p, tokens, positions_from_mask(mask), CFG, mask_BT=mask)
        return logits, token_logprobs(p, CFG, tokens, mask, chunk=4)

    jaxpr = jax.make_jaxpr(run)(params).jaxpr
    eqns = list(_eqns(jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    # per layer q, k, v, o, gate, up, down, scores, probs @ v; vocabulary projections
    assert len(dots) >= 9
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16], e
    # softmax / logsumexp / RMSNorm statistics in float32
    for name in ("exp", "rsqrt", "log"):
        found = [e for e in eqns if e.primitive.name == name]
        assert found, name
        for e in found:
            assert e.invars[0].aval.dtype == jnp.float32, e
    logits, lp = run(params)
    assert logits.dtype == jnp.float32 and lp.dtype == jnp.float32
    # and the bf16 forward stays close to the float32 one
    ref_logits, _ = forward(params, tokens, positions_from_mask(mask), CFG.replace(compute_dtype="float32"),
                            mask_BT=mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=0.05)


def test_optimizer_state_is_float32_with_bf16_compute():
    from rl.config import OptimSection
    from rl.train_step import init_state, make_optimizer

    params = init_params(CFG, jax.random.key(0))
    state = init_state(params, make_optimizer(OptimSection(), 10))
    floats = [x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)


def test_cast_params_keeps_shardings_and_never_aliases():
    mesh = make_mesh(1, 4, 2)
    params = init_params(CFG, jax.random.key(0), mesh)
    half = cast_params(params, "bfloat16")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(half)):
        assert b.dtype == jnp.bfloat16 and b.sharding == a.sharding
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(ml_dtypes.bfloat16))
    same = cast_params(params, "float32")
    want = [np.asarray(a) for a in jax.tree.leaves(params)]
    for a in jax.tree.leaves(params):
        a.delete()  # as a donated train state's buffers are
    for w, b in zip(want, jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(b), w)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_export_writes_and_declares_its_dtype(tmp_path, dtype):
    import torch
    import transformers

    params = init_params(CFG, jax.random.key(3))
    out = hf_io.save_hf_checkpoint(tmp_path / dtype, CFG, params, dtype=dtype, max_shard_bytes=20_000)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype and config["torch_dtype"] == dtype
    code = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 1
    for f in files:
        r = SafetensorsReader(f)
        assert {r.header[k]["dtype"] for k in r.keys()} == {code}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == getattr(torch, dtype)
    cfg_back, back = hf_io.load_hf_checkpoint(out)
    assert cfg_back.param_dtype == dtype
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a).astype(b.dtype), np.asarray(b))
    # the default is the master weights' dtype
    default = hf_io.save_hf_checkpoint(tmp_path / "default", CFG, params)
    assert json.loads((default / "config.json").read_text())["dtype"] == "float32"
