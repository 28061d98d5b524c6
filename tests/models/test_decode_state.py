"""The continuable sampler (`models.sampler.start / decode / extend / fork`) against `generate`."""

import jax
import numpy as np
import pytest

from models import hf_io
from models.sampler import (
    decode, extend, fork, generate, reseed, resume, sampler_model, start, stop_rule, tokens,
)

PROMPTS = [[5, 17, 99, 3, 42, 8, 7], [11, 12], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def qwen2(hf_dirs):
    return hf_io.load_hf_checkpoint(hf_dirs["qwen2_tied"])  # GQA with one KV head, tied embeddings


def _rows(state):
    t, sampled, n = tokens(state)
    return [t[r, :n[r]].tolist() for r in range(len(n))], sampled, n


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("unstack", [True, False])
@pytest.mark.parametrize("cut", [1, 5])
def test_resumed_decode_equals_one_generate_call(qwen2, greedy, unstack, cut):
    """Stop after `cut` tokens, continue: the same tokens and log-probs as one uninterrupted
    `generate` call with the same key (greedy and sampled, stop tokens included)."""
    cfg, params = qwen2
    kw = dict(greedy=greedy, temperature=0.8, top_p=0.95)
    ref = generate(params, cfg, PROMPTS, key=jax.random.key(7), max_new_tokens=12, num_samples=2,
                   stop_ids=(), unstack=unstack, **kw)
    first = np.asarray(ref.tokens)[:, 8].tolist()  # a stop token some rows reach at step 8
    ref = generate(params, cfg, PROMPTS, key=jax.random.key(7), max_new_tokens=12, num_samples=2,
                   stop_ids=(first[0],), unstack=unstack, **kw)
    model = sampler_model(params, cfg, unstack=unstack)
    state = start(model, PROMPTS, key=jax.random.key(7), num_samples=2)  # smallest capacity: it grows
    state = decode(model, state, cut, stop_ids=(first[0],), **kw)
    state = decode(model, state, 12 - cut, stop_ids=(first[0],), **kw)
    got, sampled, n = _rows(state)
    want_n = np.asarray(ref.lengths)
    assert n.tolist() == want_n.tolist() and want_n.min() < 12  # some row stopped early
    assert got == [np.asarray(ref.tokens)[r, :want_n[r]].tolist() for r in range(len(n))]
    lp = np.asarray(state.logprobs_BM)[:, :12]
    np.testing.assert_allclose(lp, np.asarray(ref.logprobs), atol=1e-5)
    assert all(sampled[r, :n[r]].all() and not sampled[r, n[r]:].any() for r in range(len(n)))


@pytest.mark.parametrize("unstack", [True, False])
def test_extend_then_decode_equals_start_with_the_longer_prompt(qwen2, unstack):
    """Appending X (ragged, one row appends nothing) then decoding == starting on prompt + X."""
    cfg, params = qwen2
    model = sampler_model(params, cfg, unstack=unstack)
    extra = [[60, 61, 62], [], [70, 71, 72, 73, 74, 75, 76, 77, 78]]
    state = start(model, PROMPTS, key=jax.random.key(0))
    state = decode(model, state, 3, greedy=True, stop_ids=())
    first3, _, _ = _rows(state)
    state = extend(model, state, extra)
    joined = [p + f + x for p, f, x in zip(PROMPTS, first3, extra)]
    ref = start(model, joined, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(state.logits_BV), np.asarray(ref.logits_BV), atol=2e-4)
    assert np.asarray(state.positions_B).tolist() == [len(j) for j in joined]
    got, sampled, n = _rows(decode(model, state, 6, greedy=True, stop_ids=()))
    want, _, _ = _rows(decode(model, ref, 6, greedy=True, stop_ids=()))
    assert [g[len(f) + len(x):] for g, f, x in zip(got, first3, extra)] == want
    assert [g[:len(f) + len(x)] for g, f, x in zip(got, first3, extra)] == [f + x for f, x in zip(first3, extra)]
    for r, (f, x) in enumerate(zip(first3, extra)):  # appended tokens are marked as not sampled
        assert sampled[r, :3].all() and not sampled[r, 3:3 + len(x)].any() and sampled[r, 3 + len(x):n[r]].all()


def test_extend_restarts_done_rows_and_resume(qwen2):
    cfg, params = qwen2
    model = sampler_model(params, cfg)
    state = start(model, PROMPTS, key=jax.random.key(0))
    probe, _, _ = _rows(decode(model, fork(model, state, [0, 1, 2]), 4, greedy=True, stop_ids=()))
    stop = probe[1][1]  # row 1 stops at its second token
    state = decode(model, state, 4, greedy=True, stop_ids=(stop,))
    assert bool(state.done_B[1]) and _rows(state)[2][1] == probe[1].index(stop) + 1
    state = extend(model, state, [[], [9], []])
    assert not bool(state.done_B[1])
    state = decode(model, state, 2, greedy=True, stop_ids=())
    assert _rows(state)[2][1] == probe[1].index(stop) + 1 + 1 + 2
    state = resume(decode(model, state, 1, greedy=True, stop_ids=(), max_length=1))
    assert not np.asarray(state.done_B).any()


@pytest.mark.parametrize("greedy", [True, False])
def test_fork_then_decode_equals_decoding_those_rows(qwen2, greedy):
    cfg, params = qwen2
    model = sampler_model(params, cfg)
    kw = dict(greedy=greedy, temperature=0.9, stop_ids=())
    state = decode(model, start(model, PROMPTS, key=jax.random.key(3), num_samples=2), 4, **kw)
    rows = [5, 0, 0, 3]
    forked = decode(model, fork(model, state, rows), 5, **kw)
    whole = decode(model, state, 5, **kw)
    a, _, _ = _rows(forked)
    b, _, _ = _rows(whole)
    assert a == [b[r] for r in rows]
    np.testing.assert_allclose(np.asarray(forked.logits_BV), np.asarray(whole.logits_BV)[rows], atol=1e-5)


def test_reseeded_copies_differ_and_repeat(qwen2):
    cfg, params = qwen2
    model = sampler_model(params, cfg)
    base = decode(model, start(model, [[5, 6, 7]], key=jax.random.key(0)), 2, stop_ids=())
    copies = [_rows(decode(model, reseed(fork(model, base, [0] * 4), jax.random.key(9)), 8, stop_ids=()))[0]
              for _ in range(2)]
    assert copies[0] == copies[1]  # the same key: the same draws
    assert len({tuple(r) for r in copies[0]}) > 1  # four streams: different rows
    same = _rows(decode(model, fork(model, base, [0] * 3), 8, stop_ids=()))[0]
    assert same[0] == same[1] == same[2]  # without reseed the copies share the row's stream


def test_stop_rule_strings_inside_and_across_tokens():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<pad>": 0, "a": 1, "\n": 2, "\n\n": 3, "b\n": 4, "\nc": 5, "b": 6, "c": 7}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")))
    rule = stop_rule(tok, ["\n\n"], 10, ids=(1,))
    ids = np.asarray(rule.ids_V)
    assert ids.tolist() == [False, True, False, True, False, False, False, False, False, False]
    after, before = np.asarray(rule.after_PV), np.asarray(rule.before_PV)
    assert after.shape == (1, 10) and np.nonzero(after[0])[0].tolist() == [2, 3, 4]
    assert np.nonzero(before[0])[0].tolist() == [2, 3, 5]


def test_stop_rule_in_the_loop(qwen2):
    """A row stops right after a single stop token, or after the second token of a stop pair (the
    first may be the prompt's last token); the loop agrees with the rule applied by hand."""
    from models.sampler import StopRule

    cfg, params = qwen2
    model = sampler_model(params, cfg)
    state = start(model, PROMPTS, key=jax.random.key(0))
    free, _, _ = _rows(decode(model, fork(model, state, [0, 1, 2]), 8, greedy=True, stop_ids=()))
    V = cfg.vocab_size
    ids = np.zeros(V, bool)
    after = np.zeros((2, V), bool)
    before = np.zeros((2, V), bool)
    ids[free[2][5]] = True
    after[0, free[0][2]], before[0, free[0][3]] = True, True
    after[1, PROMPTS[1][-1]], before[1, free[1][0]] = True, True
    rule = StopRule(*(jax.numpy.asarray(x) for x in (ids, after, before)))
    got, _, n = _rows(decode(model, state, 8, greedy=True, stop_ids=(), stop=rule))

    def expected(prompt, seq):
        prev = prompt[-1]
        for i, t in enumerate(seq):
            if ids[t] or (after[:, prev] & before[:, t]).any():
                return i + 1
            prev = t
        return len(seq)

    want = [expected(p, f) for p, f in zip(PROMPTS, free)]
    assert n.tolist() == want and got == [f[:k] for f, k in zip(free, want)]
    assert want[1] == 1 and min(want) < 8


def test_state_on_a_data_mesh_matches_one_device(hf_dirs):
    """Parameters on a 2-way data mesh: start / decode / extend / fork give the one-device tokens."""
    from jaxsql.sharding import make_mesh

    cfg, params = hf_io.load_hf_checkpoint(hf_dirs["qwen2_tied"])
    _, params_d = hf_io.load_hf_checkpoint(hf_dirs["qwen2_tied"], mesh=make_mesh(2, 1, 1, devices=jax.devices()[:2]))
    prompts = PROMPTS + [[4, 4, 4]]
    out = []
    for p in (params, params_d):
        model = sampler_model(p, cfg)
        st = decode(model, start(model, prompts, key=jax.random.key(1)), 3, temperature=0.9, stop_ids=())
        st = extend(model, st, [[7], [], [8, 9], []])
        st = decode(model, fork(model, st, [3, 1]), 4, temperature=0.9, stop_ids=())
        out.append(_rows(st)[0])
    assert model.shards == 2 and out[0] == out[1]
    with pytest.raises(Exception, match="do not split"):
        start(model, PROMPTS, key=jax.random.key(1))
