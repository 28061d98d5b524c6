"""Process rewards in GRPO (rl.process): step placement on tokens, both forms, golden values,
and short real `jaxsql train` runs with a random PRM directory."""

import json

import numpy as np
import pytest

from jaxsql.cocte import split_completion
from jaxsql.errors import ConfigError
from jaxsql.rewards import PROCESS_ADVANTAGES, PROCESS_AGGREGATIONS, RewardConfig
from rl.process import (STEP_ADVANTAGES, StepScores, completion_step_ends, step_advantages, token_end_offsets,
                        trajectory_rewards)
from rl.prm_score import AGGREGATIONS

# Two completions of one group (G = 2), in the policy's CoCTE layout.
THREE = "WITH a AS (SELECT 1),\n\nb AS (SELECT 2)\n\nSELECT * FROM b"  # steps [0,21) [23,38) [40,55)
TWO = "WITH a AS (SELECT 3)\n\nSELECT * FROM a"  # steps [0,20) [22,37)
EOS = 2  # the byte test tokenizer: <pad>=0 <bos>=1 <eos>=2, byte b is id 3 + b


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from models.testing import save_test_tokenizer

    return AutoTokenizer.from_pretrained(save_test_tokenizer(tmp_path_factory.mktemp("bytes")))


def _rollout(tok, texts, width):
    """Token rows as the sampler leaves them: the completion's tokens, EOS, padding."""
    tokens = np.zeros((len(texts), width), np.int32)
    lengths = []
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"] + [EOS]
        tokens[i, :len(ids)] = ids
        lengths.append(len(ids))
    return tokens, np.asarray(lengths)


def _steps(tok, scores, width=60):
    texts = [THREE, TWO]
    tokens, lengths = _rollout(tok, texts, width)
    spans = []
    for t in texts:
        off, chain = split_completion(t)
        spans.append([(off + s.start, off + s.end) for s in chain.steps])
    ends = completion_step_ends(tok, tokens, lengths, [EOS], texts, spans)
    return StepScores(tuple(map(tuple, scores)), tuple(len(s) for s in spans), tuple(map(tuple, ends)),
                      tuple(int(n) for n in lengths))


def test_steps_end_on_their_last_token(byte_tok):
    st = _steps(byte_tok, [[0.8, 0.5, 0.9], [0.4, 0.2]])
    # one byte per token: a step ends on the token of its last character
    assert st.ends == ((20, 37, 54), (19, 36)) and st.lengths == (56, 38)
    k = st.step_of_token(0, 60)
    assert (k[:21] == 0).all() and (k[21:38] == 1).all() and (k[38:56] == 2).all() and (k[56:] == -1).all()
    k = st.step_of_token(1, 60)
    assert (k[:20] == 0).all() and (k[20:38] == 1).all() and (k[38:] == -1).all()


def test_real_bpe_offsets_agree_with_prefix_decoding(tiny_env):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_env["tokenizer"])
    ex = tiny_env["bench"].train[0]
    text = "WITH step1 AS (" + ex.gold_sql + "),\n\nstep2 AS (SELECT * FROM step1)\n\nSELECT * FROM step2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    fast = token_end_offsets(tok, ids, text)
    slow = [len(tok.decode(ids[:i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    assert fast == slow and fast[-1] == len(text)
    off, chain = split_completion(text)
    ends = completion_step_ends(tok, np.asarray([ids + [tok.eos_token_id]]), np.asarray([len(ids) + 1]),
                                [tok.eos_token_id], [text], [[(off + s.start, off + s.end) for s in chain.steps]])
    # the token that ends each step decodes, with its predecessors, to the text through the step's last char
    for step, e in zip(chain.steps, ends[0]):
        assert fast[e] >= step.end and (e == 0 or fast[e - 1] < step.end)


def test_step_form_golden_token_rewards_and_advantages(byte_tok):
    st = _steps(byte_tok, [[0.8, 0.5, 0.9], [0.4, 0.2]])
    outcome = np.asarray([1.0, 0.0], np.float32)
    adv_outcome = np.asarray([0.999998, -0.999998], np.float32)  # GRPO of [1, 0]: +-0.5 / (0.5 + 1e-6)
    lam = 0.5
    r, a = step_advantages("grpo_step", outcome, adv_outcome, st, 2, lam, 60)
    # per-token rewards: R_i + lambda * s_k on step k's tokens
    assert np.allclose(r[0, :21], 1.4) and np.allclose(r[0, 21:38], 1.25) and np.allclose(r[0, 38:56], 1.45)
    assert np.allclose(r[1, :20], 0.2) and np.allclose(r[1, 20:38], 0.1)
    assert (r[0, 56:] == 0).all() and (r[1, 38:] == 0).all()
    # grpo_step: the group's 5 scores have mean 0.56 and std sqrt(0.0664) = 0.2576820; normalised
    # 0.931377, -0.232844, 1.319451, -0.620918, -1.397066; sums over this and later steps:
    # A: 2.017984, 1.086607, 1.319451; B: -2.017984, -1.397066
    want_a = [0.999998 + lam * 2.017984, 0.999998 + lam * 1.086607, 0.999998 + lam * 1.319451]
    want_b = [-0.999998 - lam * 2.017984, -0.999998 - lam * 1.397066]
    np.testing.assert_allclose(a[0, [0, 20, 21, 37, 38, 55]], np.repeat(want_a, 2), rtol=1e-5)
    np.testing.assert_allclose(a[1, [0, 19, 20, 37]], np.repeat(want_b, 2), rtol=1e-5)
    assert (a[0, 56:] == 0).all() and (a[1, 38:] == 0).all()

    r2, a2 = step_advantages("rewardsql", outcome, adv_outcome, st, 2, lam, 60)
    np.testing.assert_array_equal(r2, r)
    # released avg_unique: v = mean{1.4, 1.25, 1.45} = 1.366667, mean{0.2, 0.1} = 0.15; unbiased
    # std over the group 0.860313 -> A = +-0.707107; A > 0 and r > 1: (r - 1) A; A <= 0: (1 - r) A
    np.testing.assert_allclose(a2[0, [0, 21, 38, 55]], [0.282843, 0.176777, 0.318198, 0.318198], rtol=1e-5)
    np.testing.assert_allclose(a2[1, [0, 19, 20, 37]], [-0.565685, -0.565685, -0.636396, -0.636396], rtol=1e-5)
    assert (a2[0, 56:] == 0).all() and (a2[1, 38:] == 0).all()


def test_trajectory_form_is_outcome_plus_lambda_times_aggregate(byte_tok):
    st = _steps(byte_tok, [[0.8, 0.5, 0.9], [0.4, 0.2]])
    outcome = np.asarray([1.0, -1.0], np.float32)
    want = {"min": [1 + 0.25 * 0.5, -1 + 0.25 * 0.2], "product": [1 + 0.25 * 0.36, -1 + 0.25 * 0.08],
            "mean": [1 + 0.25 * 2.2 / 3, -1 + 0.25 * 0.3], "last": [1 + 0.25 * 0.9, -1 + 0.25 * 0.2]}
    for how, w in want.items():
        np.testing.assert_allclose(trajectory_rewards(outcome, st, 0.25, how), w, rtol=1e-6)
    # a completion without scored steps adds 0; one cut by the PRM's length aggregates what it read
    cut = StepScores(((), (0.3,)), (0, 2), ((), (19, 36)), (5, 38))
    np.testing.assert_allclose(trajectory_rewards(outcome, cut, 0.25, "min"), [1.0, -1 + 0.25 * 0.3], rtol=1e-6)
    r, a = step_advantages("grpo_step", outcome, np.asarray([1.0, -1.0], np.float32), cut, 2, 0.25, 40)
    assert (r[0, :5] == 1.0).all() and np.allclose(r[1, 20:38], -1.0)  # the unread step scores 0


def test_names_and_config_validation():
    assert set(PROCESS_AGGREGATIONS) <= set(AGGREGATIONS) and set(PROCESS_ADVANTAGES) == set(STEP_ADVANTAGES)
    from jaxsql.config import from_dict

    cfg = from_dict(RewardConfig, {"weights": {"execution": 1.0, "process": 0.5},
                                   "process": {"prm": "d", "form": "step", "advantage": "rewardsql"}})
    assert cfg.process_weight == 0.5 and dict(cfg.outcome_weights) == {"execution": 1.0}
    bad = [({"weights": {"execution": 1.0, "process": 1.0}}, "weights.process"),
           ({"weights": {"process": 1.0}, "process": {"prm": "d"}}, "RewardConfig.weights"),
           ({"weights": {"execution": 1.0}, "process": {"prm": "d"}}, "RewardConfig.process"),
           ({"weights": {"execution": 1.0, "process": 1.0}, "process": {"prm": ""}}, "process.prm"),
           ({"weights": {"execution": 1.0, "process": 1.0}, "process": {"prm": "d", "form": "x"}}, "process.form"),
           ({"weights": {"execution": 1.0, "process": 1.0}, "process": {"prm": "d", "aggregation": "entropy"}},
            "process.aggregation"),
           ({"weights": {"execution": 1.0, "process": 1.0}, "process": {"prm": "d", "advantage": "x"}},
            "process.advantage"),
           ({"weights": {"execution": 1.0, "process": 1.0}, "process": {"prm": "d", "bogus": 1}}, "process"),
           ({"weights": {"execution": 1.0, "process": 1.0}, "params": {"process": {}}, "process": {"prm": "d"}},
            "params.process")]
    for d, field in bad:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            from_dict(RewardConfig, d)


def test_score_batch_leaves_the_process_reward_to_the_trainer(tiny_env):
    from jaxsql.config import from_dict
    from jaxsql.rewards import score_batch
    from jaxsql.sql import SqlPool

    ex = tiny_env["bench"].train[0]
    cfg = from_dict(RewardConfig, {"weights": {"execution": 1.0, "process": 0.5}, "process": {"prm": "d"}})
    with SqlPool() as pool:
        out = score_batch(pool, [ex.gold_sql, "nope"], [ex, ex], cfg)
    assert out.rewards.tolist() == [1.0, -1.0] and set(out.components) == {"execution"}


# --- real runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prm_dir(tiny_env, tmp_path_factory):
    from jaxsql.cli import main

    out = tmp_path_factory.mktemp("prm") / "prm"
    assert main(["prm", "init", "--policy", tiny_env["model"], "--out", str(out)]) == 0
    return out


def _train(tiny_env, run, prm, *extra):
    from jaxsql.cli import main
    from tests.rl.conftest import grpo_overrides

    over = grpo_overrides(tiny_env, run, **{"data.prompt_format": "cocte", "data.max_prompt_len": 64,
                                            "sampling.max_new_tokens": 24, "steps": 2, "algo.beta": 0.001,
                                            "reward.weights.process": 0.5, "reward.process.prm": str(prm)})
    empty = run.parent / f"{run.name}.yaml"
    empty.write_text("{}\n")
    return main(["train", "--config", str(empty), *over, *extra])


@pytest.mark.parametrize("form", ["trajectory", "step"])
def test_train_with_process_rewards(tiny_env, prm_dir, tmp_path, capsys, form):
    extra = [f"reward.process.form={form}", "reward.process.aggregation=mean"]
    if form == "step":
        extra.append("reward.process.advantage=grpo_step")
    assert _train(tiny_env, tmp_path / "run", prm_dir, *extra) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert len(rows) == 2
    for m in rows:
        assert m["time/prm_s"] > 0 and 0 < m["reward/process_mean"] < 1 and m["reward/steps_mean"] >= 1
        assert np.isfinite(m["train/loss"])
        if form == "trajectory":  # mean over completions of R_i + 0.5 * mean_k s_ik
            assert m["reward/mean"] == pytest.approx(m["reward/outcome_mean"] + 0.5 * m["reward/process_mean"],
                                                     abs=1e-5)
        else:
            assert m["reward/mean"] == pytest.approx(m["reward/outcome_mean"], abs=1e-6)


def test_missing_or_foreign_prm_is_one_line(tiny_env, tmp_path, capsys):
    from models.testing import save_random_checkpoint, save_test_tokenizer

    assert _train(tiny_env, tmp_path / "a", tmp_path / "nope") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reward.process.prm" in err[0] and "does not exist" in err[0]
    tok = save_test_tokenizer(tmp_path / "bytes")
    other = save_random_checkpoint(tmp_path / "other", "tiny", tokenizer_dir=tok, vocab_size=320, hidden_size=32,
                                   intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    assert _train(tiny_env, tmp_path / "b", other) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different tokenizers" in err[0]


def test_per_token_advantages_in_the_loss_and_the_batch():
    """[B, T] advantages equal to a broadcast [B] give the scalar path's loss; other per-token
    values weight tokens one by one; grouped micro-batches split them with their rows."""
    import jax.numpy as jnp

    from rl import algo
    from rl.batch import Batch

    rng = np.random.default_rng(0)
    logp, old = (jnp.asarray(rng.normal(size=(4, 5)) * 0.1 - 1.0, jnp.float32) for _ in range(2))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], jnp.float32)
    adv = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    cfg = algo.PolicyLossConfig(loss_agg="token_mean", beta=0.0)
    scalar = algo.policy_loss(logp, old, adv, mask, cfg)
    tokens = algo.policy_loss(logp, old, jnp.broadcast_to(adv[:, None], (4, 5)), mask, cfg)
    assert float(scalar[0]) == float(tokens[0]) and float(scalar[1]) == float(tokens[1])
    # at ratio 1 the surrogate is -A per token: the token-mean loss is -mean of the masked A_t
    per = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    s, d, _ = algo.policy_loss(logp, logp, per, mask, cfg)
    assert float(s / d) == pytest.approx(-float((per * mask).sum() / mask.sum()), rel=1e-6)
    b = Batch(prompt_tokens=np.zeros((2, 3), np.int32), prompt_mask=np.ones((2, 3), np.int32),
              completion_tokens=np.zeros((4, 5), np.int32), completion_mask=np.asarray(mask, np.int32),
              advantages=np.asarray(per))
    mb = b.micro_batches(2)
    assert mb.advantages.shape == (2, 2, 5)
    np.testing.assert_array_equal(mb.advantages[1], np.asarray(per)[[2, 3]])


@pytest.mark.slow  # splash in Pallas interpret mode through a PRM forward on 8 devices
def test_prm_step_scores_run_splash_under_the_trainer_mesh(tiny_env, monkeypatch):
    """The PRM's step scores in a GRPO step (`PrmScorer.dispatch`) run under the mesh the PRM
    lives on (the trainer's), so `auto` attention places the splash kernel per chip there too."""
    import dataclasses

    from jaxsql.sharding import ShardingRules, make_mesh
    from models import attention as attn
    from models.prm import load_prm
    from rl.prm import PrmRow
    from rl.process import PrmScorer

    placed = []
    original = attn._shard_over
    monkeypatch.setattr(attn, "_shard_over", lambda *a: placed.append(dict(a[1].shape)) or original(*a))
    mesh = make_mesh(2, 2, 2)
    prm = load_prm(tiny_env["model"], mesh=mesh, rules=ShardingRules())
    rng = np.random.default_rng(0)
    rows = [PrmRow(tuple(int(t) for t in rng.integers(3, 200, n)), (n // 2, n - 1)) for n in (9, 14, 6, 11)]
    out = {}
    for name in ("xla", "splash"):
        scorer = PrmScorer(dataclasses.replace(prm, model_config=prm.model_config.replace(attention=name)), mesh,
                           ShardingRules())
        with attn.interpret_kernels():
            out[name] = np.asarray(scorer.dispatch(rows))
    assert placed and all(m == dict(mesh.shape) for m in placed)
    np.testing.assert_allclose(out["splash"], out["xla"], atol=1e-5)


def test_grouped_prm_scores_equal_whole_rows(tiny_env):
    """A GRPO draw's PRM rows run each prompt once (`PrmScorer.dispatch` with prompts and G):
    the scores equal the whole rows' (`models.prm.step_scores`) for ragged prompts, rests and
    step counts, on one device and with rows over a 2-device data axis; rows that are not
    groups of G sharing a prompt are scored whole."""
    import jax

    from jaxsql.sharding import ShardingRules, make_mesh
    from models.prm import load_prm, score_steps
    from rl.prm import PrmRow, assemble, assemble_grouped, rows_share_prompts
    from rl.process import PrmScorer

    rng = np.random.default_rng(1)
    prompts3 = [tuple(int(t) for t in rng.integers(3, 200, n)) for n in (7, 12, 4)]

    def rows_for(G):
        rows, prompts = [], []
        for p in prompts3:
            for _ in range(G):
                rest = tuple(int(t) for t in rng.integers(3, 200, int(rng.integers(0, 9))))
                tags = tuple(sorted(len(p) + int(x) for x in rng.choice(len(rest), min(len(rest), 3), replace=False)))
                rows.append(PrmRow(p + rest, tags))
                prompts.append(list(p))
        return rows, prompts

    for mesh in (make_mesh(1, 1, 1, devices=jax.devices()[:1]), make_mesh(2, 1, 1, devices=jax.devices()[:2])):
        prm = load_prm(tiny_env["model"], mesh=mesh, rules=ShardingRules())
        scorer = PrmScorer(prm, mesh, ShardingRules())
        for G in (2, 3):
            rows, prompts = rows_for(G)
            assert rows_share_prompts(rows, prompts, G) and not rows_share_prompts(rows, prompts, G + 1)
            b = assemble(rows, pad_id=0)
            whole = np.asarray(score_steps(prm.params, prm.model_config, prm.config.head, prm.candidates,
                                           b.tokens, b.mask, b.positions))
            grouped = np.asarray(scorer.dispatch(rows, prompts, G))
            K = max(len(r.positions) for r in rows)
            np.testing.assert_allclose(grouped[:, :K], whole[:, :K], atol=2e-6)
            assert np.all(grouped[:, K:] == 0) and np.all(grouped[b.positions[:, :grouped.shape[1]] < 0] == 0)
            # the grouped layout holds each prompt once
            arrays = assemble_grouped(rows, prompts, G, pad_id=0, prompt_len=12, rest_len=8, steps=3)
            assert arrays[0].shape[0] == 3 and arrays[2].shape[0] == 3 * G
            # not groups of G: one prompt differs inside a group -> scored whole, same values
            bad = list(prompts)
            bad[1] = bad[1][:-1]
            assert not rows_share_prompts(rows, bad, G)
            np.testing.assert_allclose(np.asarray(scorer.dispatch(rows, bad, G))[:, :K], whole[:, :K], atol=2e-6)
