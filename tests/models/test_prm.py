"""The PRM's two heads against transformers (PyTorch, CPU, float32), and PRM directories."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsql.errors import JaxsqlError
from jaxsql.sharding import make_mesh
from models import hf_io
from models.prm import (SIDECAR, PrmConfig, check_matches_policy, load_prm, save_prm, score_steps, step_scores,
                        value_head_from_lm)

from .conftest import VARIANTS


def _rows(vocab, seed=0):
    """Four rows: full, left-padded, right-padded, short; step positions with -1 padding."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (4, 16))
    mask = np.ones((4, 16), np.int64)
    mask[1, :6] = 0
    mask[2, 11:] = 0
    mask[3, :13] = 0
    tokens[mask == 0] = 0
    positions = np.array([[3, 9, 15, -1], [6, 10, 15, -1], [0, 4, 10, -1], [13, 15, -1, -1]], np.int32)
    return tokens, mask, positions


def _hf_outputs(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy().astype(np.float64)


def _at(values_BT, positions):
    out = np.zeros(positions.shape)
    for b, k in zip(*np.nonzero(positions >= 0)):
        out[b, k] = values_BT[b, positions[b, k]]
    return out


def _hf_lm_scores(model_dir, cands, tokens, mask, positions):
    """The released scoring: softmax of the logits of the two candidates, the first one's probability."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    logits = _hf_outputs(hf, tokens, mask)[..., list(cands)]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return _at((p / p.sum(-1, keepdims=True))[..., 0], positions)


def _hf_value_scores(model_dir, tokens, mask, positions):
    hf = transformers.AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    assert hf.num_labels == 1 and hf.score.bias is not None
    return _at(1.0 / (1.0 + np.exp(-_hf_outputs(hf, tokens, mask)[..., 0])), positions)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_both_heads_exported_give_transformers_step_scores(hf_dirs, variant, tmp_path):
    src = hf_dirs[variant]
    lm = load_prm(src)  # a plain causal LM is the released form with the default tokens
    assert lm.config.head == "lm"
    tokens, mask, positions = _rows(lm.model_config.vocab_size)
    ours_lm = np.asarray(lm.scores(tokens, mask, positions))
    assert np.all(ours_lm[positions < 0] == 0)

    lm_dir = save_prm(tmp_path / "lm", lm.config, lm.model_config, lm.params, tokenizer_dir=src)
    ref_lm = _hf_lm_scores(lm_dir, lm.candidates, tokens, mask, positions)
    assert np.abs(ours_lm - ref_lm).max() < 1e-4

    cfg_v, params_v = value_head_from_lm(lm.params, lm.model_config, lm.candidates)
    value_dir = save_prm(tmp_path / "value", PrmConfig(head="value"), cfg_v, params_v, tokenizer_dir=src)
    ref_v = _hf_value_scores(value_dir, tokens, mask, positions)
    ours_v = np.asarray(load_prm(value_dir, head="value").scores(tokens, mask, positions))
    print(f"\n{variant}: |jax lm - hf causal LM| {np.abs(ours_lm - ref_lm).max():.2e}, |jax value - hf token "
          f"classification| {np.abs(ours_v - ref_v).max():.2e}, |hf value - hf lm| {np.abs(ref_v - ref_lm).max():.2e}")
    assert np.abs(ours_v - ref_v).max() < 1e-4
    assert np.abs(ref_v - ref_lm).max() < 1e-4  # both heads, loaded by transformers, score the same
    spread = ref_lm[positions >= 0]
    assert spread.max() - spread.min() > 1e-3  # the scores differ between steps: the check can fail


def test_random_value_head_matches_transformers(hf_dirs, tmp_path):
    src = hf_dirs["qwen2"]
    lm = load_prm(src)
    cfg_v, params_v = value_head_from_lm(lm.params, lm.model_config, lm.candidates)
    key_w, key_b = jax.random.split(jax.random.key(3))
    params_v["score"] = {"kernel": 0.3 * jax.random.normal(key_w, (cfg_v.hidden_size, 1)),
                         "bias": jax.random.normal(key_b, (1,))}
    out = save_prm(tmp_path / "v", PrmConfig(head="value"), cfg_v, params_v, tokenizer_dir=src)
    tokens, mask, positions = _rows(cfg_v.vocab_size, seed=1)
    ours = np.asarray(load_prm(out).scores(tokens, mask, positions))
    assert np.abs(ours - _hf_value_scores(out, tokens, mask, positions)).max() < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForTokenClassification"] and config["num_labels"] == 1


def test_step_scores_jit_sharded_equals_one_device(hf_dirs):
    lm = load_prm(hf_dirs["qwen2_tied"])
    tokens, mask, positions = _rows(lm.model_config.vocab_size, seed=2)
    tokens, mask, positions = (np.concatenate([a, a]) for a in (tokens, mask, positions))
    ref = np.asarray(step_scores(lm.params, lm.model_config, "lm", lm.candidates, jnp.asarray(tokens),
                                 jnp.asarray(mask), jnp.asarray(positions)))
    mesh = make_mesh(data=8)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    args = [jax.device_put(a, rows) for a in (tokens, mask, positions)]
    params = jax.device_put(lm.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    out = score_steps(params, lm.model_config, "lm", lm.candidates, *args)
    assert np.abs(np.asarray(out) - ref).max() < 1e-5


def test_mismatched_directories_are_one_clear_error(hf_dirs, tmp_path):
    src = hf_dirs["qwen2"]
    lm = load_prm(src)
    cfg_v, params_v = value_head_from_lm(lm.params, lm.model_config, lm.candidates)
    value_dir = save_prm(tmp_path / "value", PrmConfig(head="value"), cfg_v, params_v, tokenizer_dir=src)

    with pytest.raises(JaxsqlError, match="unsupported architectures"):
        hf_io.load_hf_checkpoint(value_dir)  # a value-head PRM is not a policy
    with pytest.raises(JaxsqlError, match="'value' head, a 'lm' head was asked"):
        load_prm(value_dir, head="lm")

    side = json.loads((value_dir / SIDECAR).read_text())
    (value_dir / SIDECAR).write_text(json.dumps(dict(side, head="lm")))
    with pytest.raises(JaxsqlError, match="says head 'lm'"):
        load_prm(value_dir)
    (value_dir / SIDECAR).write_text(json.dumps(dict(side, ids={"candidates": [5, 6]})))
    with pytest.raises(JaxsqlError, match="does not belong"):
        load_prm(value_dir)
    (value_dir / SIDECAR).write_text(json.dumps(side))

    config = json.loads((value_dir / "config.json").read_text())
    (value_dir / "config.json").write_text(json.dumps(dict(config, num_labels=2, id2label={"0": "a", "1": "b"})))
    with pytest.raises(JaxsqlError, match="num_labels = 1"):
        load_prm(value_dir)

    other = tmp_path / "other_tok"
    other.mkdir()
    from data.tokenizer import train_tokenizer

    tok = train_tokenizer(["SELECT name FROM t WHERE a = 1"] * 4, vocab_size=300, out_dir=other)
    with pytest.raises(JaxsqlError, match="different tokenizers"):
        check_matches_policy(lm, tok, "other")
    check_matches_policy(lm, lm.tokenizer)

    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(JaxsqlError, match="tokenizer files"):
        load_prm(bare)


def test_prm_config_validates():
    with pytest.raises(JaxsqlError, match="PrmConfig.head"):
        PrmConfig(head="critic")
    with pytest.raises(JaxsqlError, match="PrmConfig.bad_token"):
        PrmConfig(good_token="+", bad_token="+")
