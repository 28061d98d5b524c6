"""GRPO on multi-turn rollouts: observation tokens are context, never actions.

Golden values: the policy loss, the ratio, the KL, the length normalisation and the
sampler/trainer mismatch count the model's sampled tokens only (the batch's ``loss_mask``),
whatever the observation tokens' log-probs, advantages or reference values are.
"""

import math

import jax
import numpy as np
import pytest

from models.config import ModelConfig
from models.model import init_params
from rl import algo
from rl.batch import Batch
from rl.losses import LOSSES, LossContext
from rl.policy import batch_logprobs

# two rows of 6 completion tokens: model (1) / observation (0) / padding (cm 0)
SAMPLED = np.array([[1, 1, 0, 0, 1, 0],
                    [1, 0, 0, 1, 1, 1]], np.float32)
REAL = np.array([[1, 1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 1, 1]], np.float32)
LOGP = np.log(np.array([[0.5, 0.4, 0.9, 0.8, 0.25, 0.3],
                        [0.2, 0.7, 0.6, 0.5, 0.4, 0.1]], np.float32))
OLD = np.log(np.array([[0.4, 0.4, 0.5, 0.5, 0.5, 0.5],
                       [0.25, 0.5, 0.5, 0.5, 0.5, 0.2]], np.float32))
REF = np.log(np.array([[0.5, 0.2, 0.3, 0.3, 0.5, 0.5],
                       [0.4, 0.3, 0.3, 0.3, 0.4, 0.2]], np.float32))
ADV = np.array([[1.0, 1.0, 7.0, -3.0, 1.0, 0.0],   # per token: observation values are noise
                [-0.5, 9.0, 2.0, -0.5, -0.5, -0.5]], np.float32)


def _hand(agg: str, cfg: algo.PolicyLossConfig) -> tuple[float, float, float, float]:
    """(loss_sum, denominator, kl_sum, mismatch_sum) over the sampled tokens, in plain Python."""
    per_row, kl_sum, mism = [], 0.0, 0.0
    for i in range(2):
        terms = []
        for t in range(6):
            if not SAMPLED[i, t]:
                continue
            rho = math.exp(float(LOGP[i, t]) - float(OLD[i, t]))
            a = float(ADV[i, t])
            clip = min(max(rho, 1 - cfg.eps_low), 1 + cfg.eps_high)
            d = float(REF[i, t]) - float(LOGP[i, t])
            k3 = math.exp(d) - d - 1
            kl_sum += k3
            mism += abs(float(OLD[i, t]) - float(OLD[i, t] - 0.1))
            terms.append(-min(rho * a, clip * a) + cfg.beta * k3)
        per_row.append(terms)
    if agg == "token_mean":
        return sum(map(sum, per_row)), float(SAMPLED.sum()), kl_sum, mism
    if agg == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in per_row), 2.0, kl_sum, mism
    assert agg == "seq_mean_token_sum_norm"
    return sum(map(sum, per_row)) / cfg.max_len, 2.0, kl_sum, mism


def _noisy(x: np.ndarray, seed: int) -> np.ndarray:
    """`x` with every non-sampled position replaced by noise."""
    r = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32) - 1.0
    return np.where(SAMPLED > 0, x, r)


@pytest.mark.parametrize("agg", sorted(algo.LOSS_AGGREGATIONS))
def test_policy_loss_counts_sampled_tokens_only_golden(agg):
    assert set(algo.LOSS_AGGREGATIONS) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"}
    cfg = algo.PolicyLossConfig(loss_agg=agg, eps_low=0.2, eps_high=0.28, beta=0.05, max_len=8)
    sampler = OLD - 0.1
    s, d, m = algo.policy_loss(LOGP, OLD, ADV, SAMPLED, cfg, ref_logp_BT=REF, sampler_logp_BT=sampler)
    want_s, want_d, want_kl, want_mm = _hand(agg, cfg)
    np.testing.assert_allclose(float(s), want_s, rtol=1e-5)
    assert float(d) == want_d
    np.testing.assert_allclose(float(m["kl"]), want_kl, rtol=1e-5)
    np.testing.assert_allclose(float(m["mismatch_abs"]), want_mm, rtol=1e-5)
    assert float(m["tokens"]) == SAMPLED.sum() == 7
    # every observation (and padding) value changed: log-probs, old, ref, sampler, advantages
    s2, d2, m2 = algo.policy_loss(_noisy(LOGP, 1), _noisy(OLD, 2), _noisy(ADV, 3), SAMPLED, cfg,
                                  ref_logp_BT=_noisy(REF, 4), sampler_logp_BT=_noisy(sampler, 5))
    assert float(s2) == float(s) and float(d2) == float(d)
    for k in ("kl", "ratio", "clipped", "mismatch_abs", "tokens"):
        assert float(m2[k]) == float(m[k]), k
    # the same data scored on every real token gives another loss: the mask is what decides
    s3, _, _ = algo.policy_loss(LOGP, OLD, ADV, REAL, cfg, ref_logp_BT=REF, sampler_logp_BT=sampler)
    assert abs(float(s3) - float(s)) > 1e-3
    mm = algo.mismatch_metric(OLD, _noisy(sampler, 6), SAMPLED)
    np.testing.assert_allclose(mm["mismatch/mean_abs"], 0.1, rtol=1e-4)


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


def _batch(tokens, adv, ref, sampler) -> Batch:
    return Batch(prompt_tokens=np.array([[0, 5, 6, 7]], np.int32), prompt_mask=np.array([[0, 1, 1, 1]], np.int32),
                 completion_tokens=np.asarray(tokens, np.int32), completion_mask=REAL.astype(np.int32),
                 loss_mask=SAMPLED.astype(np.int32), advantages=np.asarray(adv, np.float32),
                 ref_logp=np.asarray(ref, np.float32), sampler_logp=np.asarray(sampler, np.float32))


TOKENS = np.array([[10, 11, 12, 13, 14, 0], [20, 21, 22, 23, 24, 25]], np.int32)


@pytest.mark.parametrize("agg", sorted(algo.LOSS_AGGREGATIONS))
def test_grpo_objective_on_a_real_model_masks_observations(agg):
    """The registered loss on a real decoder: grouped and full rows give the hand value over the
    sampled tokens; observation log-probs, advantages, reference and sampler values do not count,
    yet the observations are attended to (changing one changes the next model token's log-prob)."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    pcfg = algo.PolicyLossConfig(loss_agg=agg, beta=0.1, max_len=8)
    ctx = LossContext(CFG, settings=pcfg)
    loss = LOSSES["grpo"]
    base = _batch(TOKENS, ADV, REF, OLD - 0.1)
    s, d, m = loss(params, base, ctx)
    sf, df, mf = loss(params, base.flat(), ctx)
    np.testing.assert_allclose(float(sf), float(s), rtol=1e-5)
    assert float(df) == float(d)
    # hand value: the policy's own log-probs (mu = 1: old = current), so rho = 1 and the
    # surrogate is -A per sampled token; the KL against REF and the mismatch against the sampler
    lp, _ = batch_logprobs(params, CFG, base.replace(loss_mask=None), temperature=1.0)
    lp = np.asarray(lp, np.float64)
    rows = []
    kl = mism = 0.0
    for i in range(2):
        terms = []
        for t in range(6):
            if SAMPLED[i, t]:
                dd = float(REF[i, t]) - lp[i, t]
                k3 = math.exp(dd) - dd - 1
                kl += k3
                mism += abs(lp[i, t] - (float(OLD[i, t]) - 0.1))
                terms.append(-float(ADV[i, t]) + 0.1 * k3)
        rows.append(terms)
    want = {"token_mean": (sum(map(sum, rows)), 7.0),
            "seq_mean_token_mean": (sum(sum(r) / len(r) for r in rows), 2.0),
            "seq_mean_token_sum_norm": (sum(map(sum, rows)) / 8, 2.0)}[agg]
    np.testing.assert_allclose(float(s), want[0], rtol=1e-5)
    assert float(d) == want[1]
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(m["mismatch_abs"]), mism, rtol=1e-4)
    assert float(m["tokens"]) == 7.0
    # noise on every observation position of the per-token inputs: the loss does not move
    s2, d2, m2 = loss(params, _batch(TOKENS, _noisy(ADV, 7), _noisy(REF, 8), _noisy(OLD - 0.1, 9)), ctx)
    assert float(s2) == float(s) and float(d2) == float(d)
    assert float(m2["kl"]) == float(m["kl"]) and float(m2["mismatch_abs"]) == float(m["mismatch_abs"])
    # an observation token is context: changing it changes the model token after it
    other = TOKENS.copy()
    other[0, 3] = 40  # observation; row 0 token 4 is a model token
    lp2, _ = batch_logprobs(params, CFG, _batch(other, ADV, REF, OLD).replace(loss_mask=None), temperature=1.0)
    assert abs(float(lp2[0, 4]) - lp[0, 4]) > 1e-6


def test_multi_turn_batch_layout():
    """`rl.rollout.multi_turn_batch`: prompts left-padded once per group, completions padded to the
    fixed width, loss_mask = sampled tokens, sampler log-probs only on them."""
    import dataclasses

    from rl.rollout import multi_turn_batch

    @dataclasses.dataclass
    class Hand:  # the shape of rl.multiturn.MultiTurnRollout's arrays
        completion_tokens: np.ndarray
        sampled_mask: np.ndarray
        completion_mask: np.ndarray
        logprobs: np.ndarray

    toks = np.array([[9, 8, 7, 0], [9, 6, 0, 0], [5, 5, 5, 5], [4, 0, 0, 0]], np.int32)
    cm = (toks > 0).astype(np.int32)
    sm = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]], np.int32)
    lp = np.where(sm > 0, -0.5, -9.0).astype(np.float32)
    b = multi_turn_batch(Hand(toks, sm, cm, lp), [[3, 4], [3]], group=2, pad_id=0, width=6)
    assert b.group_size == 2 and b.prompt_tokens.shape[0] == 2
    np.testing.assert_array_equal(b.prompt_tokens[:, -2:], [[3, 4], [0, 3]])
    np.testing.assert_array_equal(b.prompt_mask[:, -2:], [[1, 1], [0, 1]])
    assert b.completion_tokens.shape == (4, 6) and not b.completion_tokens[:, 4:].any()
    np.testing.assert_array_equal(b.completion_mask[:, :4], cm)
    np.testing.assert_array_equal(b.loss_mask[:, :4], sm)
    np.testing.assert_array_equal(b.scored_mask, b.loss_mask)
    np.testing.assert_array_equal(b.sampler_logp[:, :4], np.where(sm > 0, -0.5, 0.0))
    with pytest.raises(ValueError, match="outside the completion mask"):
        multi_turn_batch(Hand(toks, np.ones_like(sm), cm, lp), [[3], [3]], 2, 0)
    with pytest.raises(ValueError, match="completion rows"):
        multi_turn_batch(Hand(toks, sm, cm, lp), [[3]], 2, 0)


def test_config_multi_turn_and_tool_format_go_together(tmp_path):
    from jaxsql.errors import ConfigError
    from jaxsql.tools import ToolConfig
    from rl.config import load_train_config

    base = [f"run_dir={tmp_path / 'r'}", "model.preset=tiny"]
    c = load_train_config(None, base + ["rollout.mode=multi_turn", "data.prompt_format=tool",
                                        "tool.max_sql_s=3", "tool.max_cell_chars=20",
                                        "reward.weights.execution=1", "reward.weights.tool_format=0.1",
                                        "reward.weights.turn_cost=0.02"])
    assert c.rollout.multi_turn and c.tool == ToolConfig(max_sql_s=3.0, max_cell_chars=20)
    assert load_train_config(None, base).rollout.mode == "single_turn"
    bad = {
        ("data.prompt_format=tool",): "DataSection.prompt_format",
        ("rollout.mode=multi_turn",): "RolloutSection.mode",
        ("rollout.mode=multi_turn", "data.prompt_format=think"): "RolloutSection.mode",
        ("rollout.mode=sometimes",): "RolloutSection.mode",
        ("reward.weights.tool_format=1",): "RewardConfig.weights.tool_format",
        ("reward.weights.turn_cost=1",): "RewardConfig.weights.turn_cost",
        ("rollout.mode=multi_turn", "data.prompt_format=tool", "tool.max_rows=0"): "ToolConfig.max_rows",
        ("rollout.mode=multi_turn", "data.prompt_format=tool", "tool.max_turns=5"): "ToolConfig.max_turns",
        ("rollout.mode=multi_turn", "data.prompt_format=tool", "tool.max_sql_s=-1"): "ToolConfig.max_sql_s",
        ("rollout.mode=multi_turn", "data.prompt_format=tool", "tool.nope=1"): "nope",
    }
    for extra, field in bad.items():
        with pytest.raises(ConfigError, match=field):
            load_train_config(None, base + list(extra))


def test_jaxsql_train_multi_turn_from_a_tool_sft_model(tiny_env, tmp_path):
    """A real `jaxsql sft` (tool traces) then `jaxsql train` in multi_turn mode: the metrics
    carry the tool keys and the timing breakdown, and the sampler's log-probs on the sampled
    tokens equal the trainer's (the mismatch metric is ~0), observations in the rows or not."""
    import json

    from jaxsql.cli import main
    from tests.rl.conftest import grpo_overrides

    common = {"model.path": tiny_env["model"], "data.path": tiny_env["synthetic"], "data.prompt_format": "tool",
              "data.batch_size": 2, "data.max_prompt_len": 48, "progress": False, "tensorboard": False,
              "mesh.data": 1, "checkpoint.async_save": False}
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    sft = dict(common, run_dir=str(tmp_path / "sft"), **{"data.max_target_len": 96, "steps": 3,
                                                           "optim.learning_rate": 3e-3})
    assert main(["sft", "--config", str(empty), *[f"{k}={v}" for k, v in sft.items()]]) == 0
    run = tmp_path / "grpo"
    args = grpo_overrides(tiny_env, run, **{
        "model.path": str(tmp_path / "sft" / "hf"), "data.prompt_format": "tool", "rollout.mode": "multi_turn",
        "sampling.max_new_tokens": 48, "sampling.num_generations": 2, "steps": 2, "algo.beta": 0.04,
        "sampling.temperature": 1.0, "reward.weights.tool_format": 0.1, "reward.weights.turn_cost": 0.01,
        "tool.max_sql_s": 5})
    assert main(["train", "--config", str(empty), *args]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "train/loss" in x]
    assert len(steps) == 2
    for m in steps:
        for k in ("tool/turns_per_completion", "tool/errors", "tool/used_share", "tool/observation_share",
                  "tool/answered_share", "time/decode_s", "time/tool_s", "time/extend_s", "time/logprobs_s",
                  "time/update_s", "reward/tool_format", "reward/turn_cost", "train/kl"):
            assert k in m and np.isfinite(m[k]), k
        assert 0.0 <= m["tool/observation_share"] < 1.0
        assert m["train/mismatch_abs"] < 2e-3, m["train/mismatch_abs"]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2


def test_sampler_and_trainer_logprobs_agree_across_observations():
    """Rows decoded by the continuable sampler with observation tokens appended mid-row
    (`models.sampler.extend`, as `rl.multiturn` does), laid out by `multi_turn_batch`: the
    trainer's log-probs of the sampled tokens (grouped and full rows) equal the sampler's,
    and the registered loss reports a mismatch of ~0 over them."""
    from models.sampler import decode, extend, resume, sampler_model, start, tokens
    from rl.rollout import completion_logprobs, multi_turn_batch

    params = init_params(CFG, jax.random.PRNGKey(1))
    model = sampler_model(params, CFG, pad_id=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    temp = 0.7
    state = start(model, prompts, key=jax.random.PRNGKey(3), num_samples=2, capacity=32)
    state = decode(model, state, 4, temperature=temp, stop_ids=(63,))
    state = extend(model, state, [[30, 31, 32], [], [40, 41], [50]])  # observations on three rows
    state = resume(state)
    state = decode(model, state, 5, temperature=temp, stop_ids=(63,))
    toks, sampled, n = tokens(state)

    class Rollout:  # the arrays of rl.multiturn.MultiTurnRollout
        C = int(n.max())
        completion_tokens = toks[:, :C]
        sampled_mask = sampled[:, :C].astype(np.int32)
        completion_mask = (np.arange(C)[None, :] < n[:, None]).astype(np.int32)
        logprobs = np.where(sampled[:, :C], np.asarray(state.logprobs_BM)[:, :C], 0.0).astype(np.float32)

    b = multi_turn_batch(Rollout, prompts, group=2, pad_id=0, width=24)
    sm = np.asarray(b.loss_mask, bool)
    assert (np.asarray(b.completion_mask) - sm).sum() == 6 and sm.sum() >= 8
    for rows in (b, b.flat()):
        lp, _ = completion_logprobs(params, rows, CFG, temp)
        np.testing.assert_allclose(np.asarray(lp)[sm], np.asarray(b.sampler_logp)[sm], atol=2e-5)
        assert not np.asarray(lp)[~sm].any()
    ctx = LossContext(CFG, temperature=temp, settings=algo.PolicyLossConfig(max_len=24))
    _, _, m = LOSSES["grpo"](params, b.replace(advantages=np.ones(4, np.float32)), ctx)
    assert float(m["tokens"]) == sm.sum()
    assert float(m["mismatch_abs"]) / float(m["tokens"]) < 2e-5


def test_bench_grpo_multi_turn_breakdown_keys(tiny_env, capsys):
    """`jaxsql bench grpo --multi-turn`: the step-time breakdown has decode, tool execution,
    observation extend, reward, reference log-probs and update (keys, not timings)."""
    import json

    from jaxsql.cli import main

    assert main(["bench", "grpo", "--multi-turn", "--model", tiny_env["model"], "--steps", "1", "--warmup", "0",
                 "--prompts", "2", "--generations", "2", "--new-tokens", "16", "--prompt-len", "48"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["jaxsql_breakdown"]) == {"rollout_s", "decode_s", "tool_s", "extend_s", "reward_s",
                                          "ref_logprobs_s", "update_s", "step_s"}
    assert all(v >= 0 for v in r["jaxsql_breakdown"].values())
    assert r["workload"]["mode"] == "multi_turn"
    assert set(r["tool"]) == {"turns_per_completion", "used_share", "errors", "observation_share", "answered_share"}
    assert main(["bench", "grpo", "--multi-turn", "--compare-trl", "--model", tiny_env["model"]]) == 1
    assert "--compare-trl" in capsys.readouterr().err
