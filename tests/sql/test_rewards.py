"""Golden values for every reward, the config, and the batch bridge."""

import math

import numpy as np
import pytest

from data.records import Example
from jaxsql.config import load_config
from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.rewards import REWARDS, RewardConfig, RewardContext, combined_reward, is_correct, score_batch
from jaxsql.sql import ExecResult, SqlPool

GOOD_FORMAT = "<think>plan</think><answer>SELECT a, b FROM t</answer>"
BAD_FORMAT = "SELECT a, b FROM t"


def res(*rows):
    return ExecResult(ok=True, columns=("c",) * (len(rows[0]) if rows else 1), rows=tuple(rows))


FAILED = ExecResult.failure("syntax", "near x")
GOLD = res((1, "a"), (2, "b"))
DUP = res((1, "a"), (2, "b"), (2, "b"))  # ex_set right, ex_bag wrong; cp_cr_tc = round((1 + 1 + 0.667) / 3, 3)
FAR = res((9, "z"))  # nothing shared with a 20-row gold: cp_cr_tc = round((0 + 0 + 0.05) / 3, 3) = 0.017
Q_DUP, Q_FAR = 0.889, 0.017  # Think2SQL's released QATCH score rounds every part and the mean to 3 decimals
GOLD20 = res(*[(100 + i, "g") for i in range(20)])


def ctx(pred, gold=GOLD, completion=GOOD_FORMAT, answers=None, gold_sql="SELECT a, b FROM t", pred_sql="SELECT a, b FROM t"):
    return RewardContext(completion, pred_sql, pred, gold, gold_sql, answers)


def test_registry_names():
    assert set(REWARDS) == {"execution", "qatch", "gated", "format", "arctic", "tool_format", "turn_cost"}
    assert "process" not in REWARDS


def test_execution_reward():
    f = REWARDS["execution"]
    assert f(ctx(GOLD)) == 1.0
    assert f(ctx(FAR)) == 0.0
    assert f(ctx(FAILED)) == -1.0
    assert f(ctx(DUP)) == 0.0  # default comparison ex_bag counts the duplicate
    assert f(ctx(DUP), match="ex_set") == 1.0
    assert f(ctx(FAILED), correct=2.0, wrong=0.5, failed=-3.0) == -3.0
    assert f(ctx(FAR), correct=2.0, wrong=0.5, failed=-3.0) == 0.5
    # weak supervision: no gold SQL, only answers
    assert f(ctx(res((4,)), gold=None, gold_sql=None, answers=("4",))) == 1.0
    assert f(ctx(res((5,)), gold=None, gold_sql=None, answers=("4",))) == 0.0
    # gold SQL that fails never makes a prediction correct
    assert f(ctx(GOLD, gold=FAILED)) == 0.0
    with pytest.raises(ConfigError):
        f(ctx(GOLD), match="nope")


def test_qatch_reward():
    f = REWARDS["qatch"]
    assert f(ctx(GOLD)) == 1.0
    assert f(ctx(DUP)) == Q_DUP
    assert f(ctx(FAR, gold=GOLD20)) == Q_FAR
    assert f(ctx(FAILED)) == 0.0
    assert f(ctx(GOLD, gold=FAILED)) == 0.0
    assert f(ctx(res(("Paris",)), gold=None, gold_sql=None, answers=("Paris", "Rome"))) == 0.5


def test_gated_reward():
    f = REWARDS["gated"]
    assert f(ctx(FAILED)) == 0.0
    assert f(ctx(GOLD, gold=FAILED)) == 0.0
    assert f(ctx(GOLD)) == 1.0
    assert f(ctx(GOLD, completion=BAD_FORMAT)) == 1.0  # exact wins regardless of format
    assert f(ctx(DUP)) == Q_DUP
    assert f(ctx(DUP, completion=BAD_FORMAT)) == 0.0
    assert f(ctx(FAR, gold=GOLD20)) == pytest.approx(0.1)  # max(0.017, 0.1)
    assert f(ctx(FAR, gold=GOLD20), floor=0.2) == pytest.approx(0.2)
    assert f(ctx(DUP, completion=BAD_FORMAT), require_format=False) == Q_DUP
    custom = "<r>x</r><sql>SELECT 1</sql>"
    assert f(ctx(DUP, completion=custom), think_tag="r", answer_tag="sql") == Q_DUP


def test_format_reward():
    f = REWARDS["format"]
    assert f(ctx(FAILED)) == 1.0
    assert f(ctx(GOLD, completion=BAD_FORMAT)) == 0.0
    cocte = "WITH s AS (SELECT a, b FROM t) SELECT a, b FROM s"
    assert f(ctx(GOLD, pred_sql=cocte), shape="cocte") == 1.0
    assert f(ctx(GOLD), shape="cocte") == 0.0
    assert f(ctx(GOLD, pred_sql=cocte, completion=BAD_FORMAT), shape="think_answer+cocte") == 0.0
    assert f(ctx(GOLD, pred_sql=cocte), shape="think_answer+cocte") == 1.0


def test_arctic_reward():
    f = REWARDS["arctic"]
    assert (f(ctx(GOLD)), f(ctx(FAR)), f(ctx(FAILED))) == (1.0, 0.1, 0.0)


def test_context_comparison_computed_once():
    c = ctx(DUP)
    assert c.comparison is c.comparison
    assert is_correct(c, "ex_set") and not is_correct(c, "ex_bag")


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="weights.nope: unknown reward 'nope'"):
        RewardConfig(weights={"nope": 1.0})
    # ``process`` is real now (issue 14); without its PRM section it still fails naming the field
    with pytest.raises(ConfigError, match="weights.process: the process reward needs a reward.process"):
        RewardConfig(weights={"execution": 1.0, "process": 1.0})
    with pytest.raises(ConfigError, match=r"params.execution: unknown parameter\(s\) \['bogus'\]"):
        RewardConfig(weights={"execution": 1.0}, params={"execution": {"bogus": 1}})
    with pytest.raises(ConfigError, match="params.qatch: has no weight"):
        RewardConfig(weights={"execution": 1.0}, params={"qatch": {}})
    with pytest.raises(ConfigError, match="params.execution.match"):
        RewardConfig(weights={"execution": 1.0}, params={"execution": {"match": "exact"}})
    with pytest.raises(ConfigError, match="weights.execution"):
        RewardConfig(weights={"execution": math.inf})
    with pytest.raises(ConfigError, match="weights"):
        RewardConfig(weights={})
    with pytest.raises(ConfigError, match="answer_tag"):
        RewardConfig(answer_tag="<bad>")


def test_config_from_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("weights: {gated: 0.95, format: 0.05}\nparams: {gated: {floor: 0.2}}\n")
    cfg = load_config(RewardConfig, p, ["answer_tag=sql"])
    assert dict(cfg.weights) == {"gated": 0.95, "format": 0.05}
    assert cfg.kwargs("gated") == {"think_tag": "think", "answer_tag": "sql", "floor": 0.2}
    assert cfg.kwargs("qatch") == {}
    with pytest.raises(ConfigError, match="weights.gatd"):
        load_config(RewardConfig, None, ["weights.gatd=1"])


def test_combined_reward_think2sql_mix():
    cfg = RewardConfig(weights={"gated": 0.95, "format": 0.05})
    total, parts = combined_reward(ctx(DUP), cfg)
    assert parts == {"gated": Q_DUP, "format": 1.0}
    assert total == pytest.approx(0.95 * Q_DUP + 0.05)


def test_score_batch_end_to_end(tiny_db):
    db = str(tiny_db)
    sql_ex = Example(id="q1", db_path=db, question="who lives in Paris?",
                     gold_sql="SELECT name FROM people WHERE city = 'Paris'")
    qa_ex = Example(id="q2", db_path=db, question="how many people?", gold_answers=("4",))
    completions = [
        "<think>p</think><answer>SELECT name FROM people WHERE city = 'Paris'</answer>",  # exact
        "<think>p</think><answer>SELECT name FROM people</answer>",  # CP 2/4, CR 1, TC 2/4
        "SELECT nme FROM people",  # fails
        "```sql\nSELECT count(*) FROM people\n```",  # right by denotation
    ]
    cfg = RewardConfig(weights={"execution": 1.0, "qatch": 0.5})
    with SqlPool(2) as pool:
        out = score_batch(pool, completions, [sql_ex, sql_ex, sql_ex, qa_ex], cfg)
        assert pool.stats()["gold_misses"] == 1 and pool.stats()["gold_hits"] == 2
    q2 = 0.667  # round((0.5 + 1.0 + 0.5) / 3, 3)
    np.testing.assert_allclose(out.components["execution"], [1, 0, -1, 1])
    np.testing.assert_allclose(out.components["qatch"], [1, q2, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(out.rewards, [1.5, 0.5 * q2, -1, 1.5], rtol=1e-6)
    assert out.rewards.dtype == np.float32 and out.rewards.shape == (4,)
    m = out.metrics
    assert [x["executed"] for x in m] == [True, True, False, True]
    assert [x["error"] for x in m] == [None, None, "syntax", None]
    assert [x["correct"] for x in m] == [True, False, False, True]
    assert m[0]["ex_set"] is True and m[1]["ex_bag"] is False and m[3]["ex_set"] is None
    assert m[1]["cell_precision"] == 0.5 and m[3]["denotation_exact"] is True
    assert m[0]["format_ok"] and not m[2]["format_ok"]
    s = out.summary
    assert s["ex"] == 0.5 and s["error_rate"] == 0.25 and s["errors/syntax"] == 0.25
    assert s["ex_set"] == pytest.approx(1 / 3) and s["reward/execution"] == 0.25


def test_score_batch_length_mismatch(tiny_db):
    ex = Example(id="q", db_path=str(tiny_db), question="q", gold_sql="SELECT 1")
    with SqlPool(1) as pool, pytest.raises(JaxsqlError, match="2 completions but 1 examples"):
        score_batch(pool, ["a", "b"], [ex], RewardConfig())


EMPTY = res()


def test_gated_reward_as_released():
    f = REWARDS["gated"]
    # the gate opens at a QATCH score of exactly 1, not at EX: reordered columns score 1 here
    assert f(ctx(res(("a", 1), ("b", 2)))) == 1.0
    assert f(ctx(DUP), buckets=True) == 0.9 and f(ctx(FAR, gold=GOLD20), buckets=True) == 0.1
    assert f(ctx(res((1, "a"), (7, "q"))), buckets=True) == 0.8  # cp_cr_tc 0.667 -> the 0.5..0.8 bucket
    assert f(ctx(DUP), score="bird_ex") == 1.0 and f(ctx(FAR), score="bird_ex") == 0.1
    released_format = "<THINK>plan</THINK>\n<answer></answer>"  # case-insensitive, empty answer allowed
    assert f(ctx(DUP, completion=released_format)) == Q_DUP
    with pytest.raises(ConfigError, match="score"):
        RewardConfig(weights={"gated": 1.0}, params={"gated": {"score": "ex"}})


def test_format_shapes():
    f = REWARDS["format"]
    loose = "<think>a</think><answer></answer>"
    assert f(ctx(GOLD, completion=loose)) == 1.0  # Think2SQL's released check
    assert f(ctx(GOLD, completion=loose), shape="think_answer_strict") == 0.0  # ours: non-empty answer


def test_arctic_judges_with_bird_set_ex():
    f = REWARDS["arctic"]
    swapped = res(("a", 1), ("b", 2))
    assert f(ctx(swapped)) == 0.1  # BIRD's set EX: column order matters
    assert f(ctx(swapped), match="ex_bag_rowfree") == 1.0
    assert f(ctx(DUP)) == 1.0  # ... and duplicates do not


@pytest.mark.parametrize("guard,expected", [
    ("correct", {"execution": 1.0, "qatch": 1.0, "gated": 1.0, "arctic": 1.0}),
    ("wrong", {"execution": 0.0, "qatch": 0.0, "gated": 0.1, "arctic": 0.1}),
    ("neutral", {"execution": 0.25, "qatch": 0.25, "gated": 0.25, "arctic": 0.25}),
])
def test_empty_result_guard(guard, expected):
    cfg = RewardConfig(weights=dict.fromkeys(expected, 1.0), empty_result=guard, empty_value=0.25)
    c = RewardContext(GOOD_FORMAT, "SELECT a FROM t WHERE 0", EMPTY, EMPTY, "SELECT a FROM t WHERE 0", None,
                      cfg.empty_result, cfg.empty_value)
    assert combined_reward(c, cfg)[1] == expected
    assert is_correct(c) is (guard == "correct")
    # a non-empty gold result is unaffected
    d = RewardContext(GOOD_FORMAT, "x", GOLD, GOLD, "SELECT a FROM t", None, guard, 0.25)
    assert combined_reward(d, cfg)[1] == dict.fromkeys(expected, 1.0)
    with pytest.raises(ConfigError, match="empty_result"):
        RewardConfig(empty_result="ignore")
