"""KV-cache decoding and sampling against the full forward pass and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import hf_io
from models.model import forward, hidden_states, init_cache, positions_from_mask, token_logprobs, unstack_layers
from models.sampler import bucket_length, categorical, generate


@pytest.fixture(scope="module")
def qwen3(hf_dirs):
    return hf_io.load_hf_checkpoint(hf_dirs["qwen3"])


@pytest.fixture(scope="module")
def llama(hf_dirs):
    return hf_io.load_hf_checkpoint(hf_dirs["llama3"])


def test_cached_decoding_equals_teacher_forcing(llama):
    cfg, params = llama
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, cfg.vocab_size, (2, 14)))
    mask = jnp.ones((2, 14), bool).at[0, :4].set(False)
    pos = positions_from_mask(mask)
    full, _ = forward(params, tokens, pos, cfg, mask_BT=mask)
    cache = init_cache(cfg, 2, 16)
    step = jax.jit(forward, static_argnums=3)
    logits, cache = step(params, tokens[:, :8], pos[:, :8], cfg, mask_BT=mask[:, :8], cache=cache)
    pieces = [logits]
    for t in range(8, 14):
        logits, cache = step(params, tokens[:, t:t + 1], pos[:, t:t + 1], cfg, mask_BT=mask[:, t:t + 1], cache=cache)
        pieces.append(logits)
    cached = jnp.concatenate(pieces, axis=1)
    assert int(cache.index) == 14
    diff = jnp.abs(cached - full)[mask]
    assert float(diff.max()) < 1e-5


@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
def test_prefill_fills_the_cache_the_step_path_would(hf_dirs, variant):
    """fill_cache + last_only (prompts attend among themselves; the last layer finishes only the
    last position) gives the hidden state and cache of a cached forward, stacked or unstacked and
    fused (qkv biases for qwen2, q/k norms for qwen3)."""
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs[variant])
    rng = np.random.RandomState(1)
    tokens = jnp.asarray(rng.randint(3, cfg.vocab_size, (3, 9)))
    mask = jnp.ones((3, 9), bool).at[1, :5].set(False)
    pos = positions_from_mask(mask)
    ref_h, ref_cache = hidden_states(params, tokens, pos, cfg, mask_BT=mask, cache=init_cache(cfg, 3, 13))
    for p in (params, unstack_layers(params), unstack_layers(params, fuse=True)):
        h, cache = hidden_states(p, tokens, pos, cfg, mask_BT=mask, fill_cache=13, last_only=True)
        assert h.shape == (3, 1, cfg.hidden_size) and int(cache.index) == 9
        np.testing.assert_allclose(np.asarray(h), np.asarray(ref_h[:, -1:]), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(cache.mask_BS), np.asarray(ref_cache.mask_BS))
        k, v = (jnp.stack(x) if isinstance(x, tuple) else x for x in (cache.k, cache.v))
        assert k.shape == ref_cache.k.shape and v.shape == ref_cache.v.shape  # keys [L, B, K, H, S]
        real = np.asarray(mask)[None, :, None, :]  # pad slots hold pad keys, never attended
        kd = np.abs(np.asarray(k - ref_cache.k))[..., :9] * real[:, :, :, None, :]
        vd = np.abs(np.asarray(v - ref_cache.v))[:, :, :, :9] * real[..., None]
        assert kd.max() < 1e-5 and vd.max() < 1e-5
        assert not np.asarray(k)[..., 9:].any() and not np.asarray(v)[:, :, :, 9:].any()
    with pytest.raises(ValueError, match="shorter than the 9 tokens"):
        hidden_states(params, tokens, pos, cfg, mask_BT=mask, fill_cache=8)


@pytest.mark.parametrize("variant", ["qwen2", "llama3"])
def test_greedy_matches_transformers_generate(hf_dirs, variant):
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs[variant])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[variant]).eval()
    prompts = [[5, 17, 99, 3, 42, 8, 7], [11, 12]]
    out = generate(params, cfg, prompts, key=jax.random.key(0), max_new_tokens=12, greedy=True, stop_ids=())
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert np.asarray(out.tokens[i]).tolist() == ref[0, len(p):].tolist()
    assert np.asarray(out.lengths).tolist() == [12, 12]


def test_logprobs_are_model_logprobs_at_temperature(qwen3):
    cfg, params = qwen3
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = generate(params, cfg, prompts, key=jax.random.key(1), max_new_tokens=6, num_samples=3,
                   temperature=0.7, top_p=0.9, top_k=50, ignore_stop=True)
    assert out.tokens.shape == (6, 6) and out.prompt_tokens.shape == (6, bucket_length(4))
    full = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    mask = jnp.concatenate([out.prompt_mask, jnp.ones(out.tokens.shape, bool)], axis=1)
    recomputed = token_logprobs(params, cfg, full, mask, temperature=0.7)[:, -6:]
    assert float(jnp.abs(recomputed - out.logprobs).max()) < 1e-5
    # G samples of one prompt share the prompt
    assert np.array_equal(np.asarray(out.prompt_tokens[0]), np.asarray(out.prompt_tokens[2]))


def test_num_samples_share_prefill_and_differ(qwen3):
    cfg, params = qwen3
    out = generate(params, cfg, [[5, 6, 7]], key=jax.random.key(2), max_new_tokens=8, num_samples=4)
    rows = {tuple(r) for r in np.asarray(out.tokens).tolist()}
    assert len(rows) > 1
    greedy = generate(params, cfg, [[5, 6, 7]], key=jax.random.key(2), max_new_tokens=8, num_samples=3,
                      greedy=True, stop_ids=())
    g = np.asarray(greedy.tokens)
    assert (g == g[0]).all()
    top1 = generate(params, cfg, [[5, 6, 7]], key=jax.random.key(3), max_new_tokens=8, top_k=1, stop_ids=())
    assert np.array_equal(np.asarray(top1.tokens[0]), g[0])


def test_stop_tokens_and_ignore_stop(qwen3):
    cfg, params = qwen3
    greedy = generate(params, cfg, [[5, 6, 7]], key=jax.random.key(0), max_new_tokens=10, greedy=True, stop_ids=())
    seq = np.asarray(greedy.tokens[0]).tolist()
    stop_a, stop_b = seq[3], seq[6]
    first = min(seq.index(stop_a), seq.index(stop_b))
    out = generate(params, cfg, [[5, 6, 7]], key=jax.random.key(0), max_new_tokens=10, greedy=True,
                   stop_ids=(stop_a, stop_b), pad_id=0)
    assert int(out.lengths[0]) == first + 1
    got = np.asarray(out.tokens[0]).tolist()
    assert got[: first + 1] == seq[: first + 1] and got[first + 1:] == [0] * (9 - first)
    assert np.all(np.asarray(out.logprobs[0, first + 1:]) == 0)
    ignored = generate(params, cfg, [[5, 6, 7]], key=jax.random.key(0), max_new_tokens=10, greedy=True,
                       stop_ids=(stop_a, stop_b), ignore_stop=True)
    toks = np.asarray(ignored.tokens[0]).tolist()
    assert int(ignored.lengths[0]) == 10 and stop_a not in toks and stop_b not in toks
    one = generate(params, cfg, [[5, 6, 7]], key=jax.random.key(0), max_new_tokens=1, greedy=True, stop_ids=())
    assert np.asarray(one.tokens).tolist() == [seq[:1]] and int(one.lengths[0]) == 1


def test_inverse_cdf_categorical_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4] + [0.0] * 300)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (40000, 304))
    draws = np.asarray(categorical(jax.random.key(0), logits))
    freq = np.bincount(draws, minlength=304) / len(draws)
    assert np.abs(freq[:4] - probs[:4]).max() < 0.01 and freq[4:].sum() == 0


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 2048, 2049)] == [16, 16, 32, 2048, 4096]


def test_stacked_and_unstacked_decoding_agree(llama):
    cfg, params = llama
    kw = dict(key=jax.random.key(4), max_new_tokens=7, num_samples=2, temperature=0.9, ignore_stop=True)
    a = generate(params, cfg, [[4, 5, 6], [7]], unstack=True, **kw)
    b = generate(params, cfg, [[4, 5, 6], [7]], unstack=False, **kw)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_first_argmax_matches_argmax_with_ties():
    from models.sampler import first_argmax

    x = jax.random.normal(jax.random.key(0), (64, 4096))
    x = x.at[3, 10].set(9.0).at[3, 20].set(9.0).at[5].set(0.0)  # a tie, and an all-equal row
    np.testing.assert_array_equal(np.asarray(first_argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
    assert int(first_argmax(x)[3]) == 10 and int(first_argmax(x)[5]) == 0


@pytest.mark.parametrize("greedy", [False, True])
def test_sample_token_logprob_is_the_unmasked_models(greedy):
    """The log-prob is the unmasked model's log_softmax(logits / T)[token], also when the masked stop
    tokens dominate, and no masked token is drawn."""
    from models.sampler import SamplingParams, sample_token

    logits = jax.random.normal(jax.random.key(5), (6, 300)) * 3
    logits = logits.at[0, 7].set(500.0).at[1, 8].set(-500.0)  # a stop token 500 nats above the rest
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, greedy=greedy, stop_ids=(7, 8), ignore_stop=True)
    token, logprob = sample_token(logits, jax.random.key(6), sp)
    scaled = logits / (1.0 if greedy else 0.7)
    expected = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    assert not np.isin(np.asarray(token), [7, 8]).any()
    np.testing.assert_allclose(np.asarray(logprob), np.asarray(expected), rtol=1e-5, atol=1e-4)
    assert float(logprob[0]) < -400  # the model wanted to stop; the forced token is that unlikely
