"""SFT on multi-turn tool traces: observation tokens are context, never targets."""

import jax
import numpy as np

from models.config import ModelConfig
from models.model import init_params
from rl.batch import Batch
from rl.losses import LOSSES, LossContext
from rl.policy import batch_logprobs

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


def _row(completion, loss_mask) -> Batch:
    c = np.array([completion], np.int32)
    return Batch(prompt_tokens=np.array([[5, 6, 7]], np.int32), prompt_mask=np.ones((1, 3), np.int32),
                 completion_tokens=c, completion_mask=np.ones_like(c), loss_mask=np.array([loss_mask], np.int32))


def test_sft_loss_ignores_observation_tokens():
    params = init_params(CFG, jax.random.PRNGKey(0))
    ctx = LossContext(CFG)
    sft = LOSSES["sft"]
    # model, model, observation, observation
    base = _row([10, 11, 12, 13], [1, 1, 0, 0])
    s0, d0, _ = sft(params, base.flat(), ctx)
    # golden: the loss is -(log p at the two model positions), the denominator 2
    lp, _ = batch_logprobs(params, CFG, base.replace(loss_mask=None).flat(), temperature=1.0)
    lp = np.asarray(lp)[0]
    np.testing.assert_allclose(float(s0), -(lp[0] + lp[1]), rtol=1e-6)
    assert float(d0) == 2.0
    # changing an observation token's target leaves the loss as it is ...
    s1, _, _ = sft(params, _row([10, 11, 12, 40], [1, 1, 0, 0]).flat(), ctx)
    assert float(s1) == float(s0)
    # ... while changing a model token's target changes it
    s2, _, _ = sft(params, _row([10, 40, 12, 13], [1, 1, 0, 0]).flat(), ctx)
    assert abs(float(s2) - float(s0)) > 1e-4
    # a model token after an observation is scored, the observation between is not
    s3, d3, _ = sft(params, _row([10, 11, 12, 13], [1, 0, 0, 1]).flat(), ctx)
    np.testing.assert_allclose(float(s3), -(lp[0] + lp[3]), rtol=1e-6)
    assert float(d3) == 2.0


def test_sft_batch_masks_the_observations_of_tool_traces(tiny_env):
    from transformers import AutoTokenizer

    from data.multiturn import trace_segments
    from rl.rollout import PromptEncoder
    from rl.sft import sft_batch

    tok = AutoTokenizer.from_pretrained(tiny_env["tokenizer"])
    examples = tiny_env["bench"].train[:8]
    enc = PromptEncoder(tok, "tool", 64)
    b = sft_batch(examples, enc, 160, tok.eos_token_id, tok.pad_token_id)
    assert b.loss_mask is not None
    with_obs = 0
    for i, ex in enumerate(examples):
        segs = trace_segments(ex)
        n = int(b.completion_mask[i].sum())
        row, lm = b.completion_tokens[i, :n], b.loss_mask[i, :n]
        assert not b.loss_mask[i, n:].any()
        obs_text = "".join(s for s, o in segs if o)
        assert tok.decode([t for t, m in zip(row, lm) if not m]) == obs_text
        assert tok.decode(row[:-1]) == "".join(s for s, _ in segs) and row[-1] == tok.eos_token_id
        with_obs += bool(obs_text)
    assert with_obs >= 2
    # plain formats keep the batch as it was: no loss mask
    assert sft_batch(examples, PromptEncoder(tok, "plain", 64), 32, tok.eos_token_id, tok.pad_token_id).loss_mask is None


def test_sft_cli_trains_on_tool_traces_and_grpo_refuses_them(tiny_env, tmp_path, capsys):
    import json

    import pytest

    from jaxsql.cli import main
    from jaxsql.errors import ConfigError
    from rl.config import load_train_config

    run = tmp_path / "sft"
    args = {"run_dir": str(run), "model.path": tiny_env["model"], "data.path": tiny_env["synthetic"],
            "data.prompt_format": "tool", "data.batch_size": 2, "data.max_prompt_len": 48,
            "data.max_target_len": 96, "steps": 2, "progress": False, "tensorboard": False,
            "checkpoint.export_hf": False, "mesh.data": 1, "checkpoint.async_save": False}
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert main(["sft", "--config", str(empty), *[f"{k}={v}" for k, v in args.items()]]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any("train/nll" in x and np.isfinite(x["train/nll"]) for x in lines)
    with pytest.raises(ConfigError, match="DataSection.prompt_format"):
        load_train_config(None, [f"run_dir={tmp_path / 'g'}", f"model.path={tiny_env['model']}",
                                 "data.prompt_format=tool"])
