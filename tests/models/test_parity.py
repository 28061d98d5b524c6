"""Parity with transformers (PyTorch, CPU, float32) for every supported family."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from models import hf_io
from models.model import forward, positions_from_mask, token_logprobs

from .conftest import VARIANTS


def _batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :5] = 0  # left padding
    mask[2, :11] = 0  # a single real token
    tokens[mask == 0] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.numpy()


def _our_logits(cfg, params, tokens, mask):
    m = jnp.asarray(mask, bool)
    logits, _ = forward(params, jnp.asarray(tokens), positions_from_mask(m), cfg, mask_BT=m)
    return np.asarray(logits)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_logits_match_transformers(hf_dirs, variant):
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs[variant])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[variant]).eval()
    tokens, mask = _batch(cfg.vocab_size)
    ours, ref = _our_logits(cfg, params, tokens, mask), _hf_logits(hf, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() < 1e-4
    # the padded row computes what the unpadded sequence computes
    alone = _our_logits(cfg, params, tokens[1:2, 5:], mask[1:2, 5:])
    assert np.abs(alone[0] - ours[1, 5:]).max() < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_is_bitwise_and_loads_in_transformers(hf_dirs, variant, tmp_path):
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs[variant])
    out = hf_io.save_hf_checkpoint(tmp_path / "out", cfg, params, tokenizer_dir=hf_dirs[variant],
                                   max_shard_bytes=50_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / hf_io.INDEX_NAME).is_file()
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    orig = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[variant]).eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    sd_orig, sd_back = orig.state_dict(), back.state_dict()
    assert sorted(sd_orig) == sorted(sd_back)
    for name, t in sd_orig.items():
        assert torch.equal(t, sd_back[name]), name
    tokens, mask = _batch(cfg.vocab_size, seed=1)
    assert np.array_equal(_hf_logits(orig, tokens, mask), _hf_logits(back, tokens, mask))
    transformers.AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "llama3"])
def test_export_after_optimizer_step(hf_dirs, variant, tmp_path):
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs[variant])
    tokens, mask = _batch(cfg.vocab_size, seed=2)
    tokens_j, mask_j = jnp.asarray(tokens), jnp.asarray(mask, bool)

    def loss(p):
        return -token_logprobs(p, cfg, tokens_j, mask_j, chunk=4).sum() / mask.sum()

    opt = optax.adam(1e-2)
    grads = jax.grad(loss)(params)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(loss(new)) < float(loss(params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # every tensor moved
    out = hf_io.save_hf_checkpoint(tmp_path / "step1", cfg, new)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours, ref = _our_logits(cfg, new, tokens, mask), _hf_logits(hf, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() < 1e-4


def test_bfloat16_import_and_export(hf_dirs, tmp_path):
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs["qwen2"], param_dtype="bfloat16")
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = hf_io.save_hf_checkpoint(tmp_path / "bf16", cfg, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    cfg2, params2 = hf_io.load_hf_checkpoint(out)
    assert cfg2.param_dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    tokens, mask = _batch(cfg.vocab_size)
    f32 = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["qwen2"]).eval()
    real = mask.astype(bool)
    # bf16 weights and activations: loose agreement only
    assert np.abs(_our_logits(cfg, params, tokens, mask)[real] - _hf_logits(f32, tokens, mask)[real]).max() < 0.1
