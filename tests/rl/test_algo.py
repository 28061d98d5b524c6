"""Golden values for every advantage and loss variant, computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import algo
from jaxsql.errors import ConfigError

REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # two groups of 4


def test_grpo_advantage_golden():
    # group 1: mean .5, population std .5; group 2: mean .25, std sqrt(.25*.75)
    s2 = math.sqrt(0.25 * 0.75)
    want = [1, -1, -1, 1, -0.25 / s2, -0.25 / s2, -0.25 / s2, 0.75 / s2]
    got = algo.compute_advantages("grpo", REWARDS, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_batch_advantage_golden():
    sb = math.sqrt(3 / 8 * 5 / 8)  # population std of all 8 rewards
    want = [0.5 / sb, -0.5 / sb, -0.5 / sb, 0.5 / sb, -0.25 / sb, -0.25 / sb, -0.25 / sb, 0.75 / sb]
    np.testing.assert_allclose(algo.compute_advantages("batch", REWARDS, 4), want, rtol=1e-5)


def test_drgrpo_and_none_advantage_golden():
    want = [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]
    np.testing.assert_allclose(algo.compute_advantages("drgrpo", REWARDS, 4), want, atol=1e-7)
    np.testing.assert_allclose(algo.compute_advantages("none", REWARDS, 4), REWARDS)


def test_equal_group_gives_zero_advantage():
    got = algo.compute_advantages("grpo", [0.3] * 4, 4)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="advantage"):
        algo.get_advantage("nope")
    with pytest.raises(ConfigError, match="loss_agg"):
        algo.get_loss_aggregation("nope")


# Two completions of 3 tokens; ratios rho = [1.5, 0.5, 1.0] in both rows;
# advantages +1 and -2; the second row's last token is padding.
RATIOS = np.log(np.array([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]], np.float32))
OLD = np.full((2, 3), -1.0, np.float32)
LOGP = OLD + RATIOS
ADV = np.array([1.0, -2.0], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
# By hand with eps_low=.2, eps_high=.28 (clip range [.8, 1.28]):
#   row 0 (A=+1): min(1.5, 1.28)=1.28 ; min(.5, .8)=.5 ; 1       -> losses -1.28, -.5, -1
#   row 1 (A=-2): min(-3, -2.56)=-3   ; min(-1, -1.6)=-1.6       -> losses 3, 1.6
ROW_LOSSES = [[-1.28, -0.5, -1.0], [3.0, 1.6]]


def _cfg(**kw):
    base = dict(eps_low=0.2, eps_high=0.28, beta=0.0, max_len=4)
    base.update(kw)
    return algo.PolicyLossConfig(**base)


def test_token_mean_golden():
    s, d, m = algo.policy_loss(LOGP, OLD, ADV, MASK, _cfg(loss_agg="token_mean"))
    assert float(d) == 5.0
    np.testing.assert_allclose(float(s), sum(map(sum, ROW_LOSSES)), rtol=1e-5)  # 1.82
    assert float(m["clipped"]) == 2.0  # row0 tok0 (upper clip), row1 tok1 (lower clip)
    assert "kl" not in m


def test_seq_mean_token_mean_golden():
    s, d, _ = algo.policy_loss(LOGP, OLD, ADV, MASK, _cfg(loss_agg="seq_mean_token_mean"))
    assert float(d) == 2.0
    np.testing.assert_allclose(float(s), -2.78 / 3 + 4.6 / 2, rtol=1e-5)


def test_drgrpo_constant_normalisation_golden():
    s, d, _ = algo.policy_loss(LOGP, OLD, ADV, MASK, _cfg(loss_agg="seq_mean_token_sum_norm"))
    assert float(d) == 2.0
    np.testing.assert_allclose(float(s), 1.82 / 4, rtol=1e-5)


def test_k3_kl_golden():
    # ref - logp = log 2 at one token: k3 = 2 - log 2 - 1
    ref = LOGP.copy()
    ref[0, 0] += math.log(2.0)
    k3 = 2.0 - math.log(2.0) - 1.0
    s, d, m = algo.policy_loss(LOGP, OLD, ADV, MASK, _cfg(beta=0.1), ref_logp_BT=ref)
    np.testing.assert_allclose(float(m["kl"]), k3, rtol=1e-5)
    np.testing.assert_allclose(float(s), 1.82 + 0.1 * k3, rtol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        algo.policy_loss(LOGP, OLD, ADV, MASK, _cfg(beta=0.1))


def test_truncated_importance_sampling_golden():
    # sampler log-probs lower than trainer's by log 3 on row 0 -> weight min(3, C=2) = 2
    sampler = OLD.copy()
    sampler[0] -= math.log(3.0)
    s, _, m = algo.policy_loss(LOGP, OLD, ADV, MASK, _cfg(tis_cap=2.0), sampler_logp_BT=sampler)
    np.testing.assert_allclose(float(s), 2 * (-2.78) + 4.6, rtol=1e-5)
    np.testing.assert_allclose(float(m["mismatch_abs"]), 3 * math.log(3.0), rtol=1e-5)
    mm = algo.mismatch_metric(OLD, sampler, MASK)
    np.testing.assert_allclose(mm["mismatch/mean_abs"], 3 * math.log(3.0) / 5, rtol=1e-6)
    np.testing.assert_allclose(mm["mismatch/max_abs"], math.log(3.0), rtol=1e-6)


def test_sft_loss_golden():
    s, d = algo.sft_loss(jnp.asarray(LOGP), MASK)
    assert float(d) == 5.0
    np.testing.assert_allclose(float(s), -float((LOGP * MASK).sum()), rtol=1e-6)


def test_informative_groups():
    keep = algo.informative_groups(np.array([1, 1, 1, 1, 0, 1, 0, 0, 0.5, 0.5, 0.5, 0.5]), 4)
    assert keep.tolist() == [False, True, False]


@pytest.mark.parametrize("agg", sorted(algo.LOSS_AGGREGATIONS))
def test_micro_batch_gradients_equal_full_batch(agg):
    """sum of micro-batch grads of loss_sum / total denominator == grad of the full mean."""
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    W = jax.random.normal(k1, (5, 7))
    x_BTD = jax.random.normal(k2, (4, 6, 5))
    tok_BT = jax.random.randint(k3, (4, 6), 0, 7)
    mask = np.ones((4, 6), np.float32)
    mask[0, 4:] = 0
    mask[2, 1:] = 0  # very unequal lengths so a per-micro-batch mean would differ
    adv = jnp.array([1.0, -0.5, 2.0, -1.0])
    cfg = algo.PolicyLossConfig(loss_agg=agg, beta=0.05, max_len=6)

    def logp_fn(W, x, tok):
        lp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", x, W))
        return jnp.take_along_axis(lp, tok[..., None], -1)[..., 0]

    old = jax.lax.stop_gradient(logp_fn(W, x_BTD, tok_BT)) - 0.1
    ref = old + 0.05

    def loss_parts(W, sl):
        s, d, _ = algo.policy_loss(
            logp_fn(W, x_BTD[sl], tok_BT[sl]), old[sl], adv[sl], mask[sl], cfg, ref_logp_BT=ref[sl]
        )
        return s, d

    full = jax.grad(lambda W: (lambda s, d: s / d)(*loss_parts(W, slice(0, 4))))(W)
    g_sum, d_sum = 0.0, 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        g = jax.grad(lambda W: loss_parts(W, sl)[0])(W)
        g_sum = g_sum + g
        d_sum = d_sum + loss_parts(W, sl)[1]
    np.testing.assert_allclose(g_sum / d_sum, full, rtol=1e-5, atol=1e-7)
