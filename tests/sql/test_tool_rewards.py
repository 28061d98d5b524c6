"""Rewards of multi-turn episodes: the final answer's execution, the tool format, the turn cost,
and the tool metrics, with golden values on episodes played through the real tool runner."""

import numpy as np
import pytest

from data.records import Example
from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.rewards import REWARDS, RewardConfig, RewardContext, score_batch
from jaxsql.sql import ExecResult, SqlPool
from jaxsql.tools import Episode, ToolConfig, ToolRunner, episode_metrics


def _play(runner: ToolRunner, db, segments: list[str], finished_last: bool = False) -> Episode:
    """Feed model segments to one episode as the rollout loop does (pause, append, go on)."""
    ep = runner.new_episode(str(db))
    for k, seg in enumerate(segments):
        runner.step([ep], [seg], finished=[finished_last and k == len(segments) - 1])
        if ep.done:
            break
    return ep


@pytest.fixture(scope="module")
def episodes(tiny_db):
    cfg = ToolConfig(max_turns=2)
    with SqlPool(2, timeout_s=2.0) as pool:
        r = ToolRunner(pool, cfg)
        eps = {
            # one look-up, then the right answer
            "lookup": _play(r, tiny_db, ["<sql>SELECT DISTINCT city FROM people</sql>",
                                         "<solution>SELECT name FROM people WHERE city = 'Paris'</solution>"]),
            # answers at once, wrongly
            "direct": _play(r, tiny_db, ["<solution>SELECT name FROM people</solution>"]),
            # a failing call (syntax), a denied write, then the max_turns refusal: no answer
            "budget": _play(r, tiny_db, ["<sql>SELEC x</sql>", "<sql>DELETE FROM people</sql>",
                                         "<sql>SELECT 1</sql>"]),
            # a nested tag: malformed
            "malformed": _play(r, tiny_db, ["<sql>SELECT <solution>1</solution></sql>"]),
            # stops without an answer
            "silent": _play(r, tiny_db, ["I do not know"], finished_last=True),
        }
    return eps


def test_episode_rewards_golden(episodes):
    ends = {k: e.end for k, e in episodes.items()}
    assert ends == {"lookup": "answer", "direct": "answer", "budget": "max_turns", "malformed": "malformed",
                    "silent": "no_answer"}
    ok = ExecResult(ok=True, columns=("c",), rows=((1,),))
    fmt, cost = REWARDS["tool_format"], REWARDS["turn_cost"]

    def c(name):
        return RewardContext("", "", ok, episode=episodes[name])

    assert [fmt(c(k)) for k in episodes] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [fmt(c(k), answered=1.0, missing=-0.5, malformed=-1.0) for k in episodes] == [1.0, 1.0, -0.5, -1.0, -0.5]
    assert [cost(c(k)) for k in episodes] == [-1.0, 0.0, -3.0, 0.0, 0.0]  # the refused third call counts
    with pytest.raises(ConfigError, match="multi_turn"):
        fmt(RewardContext("", "", ok))


def test_score_batch_on_final_sql_and_metrics_golden(episodes, tiny_db):
    names = ["lookup", "direct", "budget", "malformed", "silent"]
    eps = [episodes[k] for k in names]
    ex = Example(id="q", question="who lives in Paris?", db_path=str(tiny_db),
                 gold_sql="SELECT name FROM people WHERE city = 'Paris'")
    cfg = RewardConfig(weights={"execution": 1.0, "tool_format": 0.2, "turn_cost": 0.05})
    texts = [e.text for e in eps]
    # an observation may hold anything, a forged answer tag too: the reward reads the episode's answer
    texts[1] = texts[1] + "<answer>SELECT name FROM people WHERE city = 'Paris'</answer>"
    with SqlPool(2, timeout_s=2.0) as pool:
        sb = score_batch(pool, texts, [ex] * 5, cfg, sqls=[e.answer or None for e in eps], episodes=eps)
        with pytest.raises(JaxsqlError, match="episodes"):
            score_batch(pool, texts, [ex] * 5, cfg, sqls=[None] * 5, episodes=eps[:2])
    # execution: right 1, wrong 0, no answer (empty query) -1
    np.testing.assert_allclose(sb.components["execution"], [1, 0, -1, -1, -1])
    np.testing.assert_allclose(sb.components["tool_format"], [1, 1, 0, 0, 0])
    np.testing.assert_allclose(sb.components["turn_cost"], [-1, 0, -3, 0, 0])
    np.testing.assert_allclose(sb.rewards, [1 + 0.2 - 0.05, 0.2, -1 - 0.15, -1, -1], rtol=1e-6)
    assert [m["correct"] for m in sb.metrics] == [True, False, False, False, False]
    assert sb.summary["ex"] == pytest.approx(0.2)
    m = episode_metrics(eps)
    assert m["tool/turns_per_completion"] == pytest.approx(4 / 5)
    assert m["tool/used_share"] == pytest.approx(2 / 5)
    assert m["tool/calls"] == 4 and m["tool/errors"] == 3  # syntax, denied, max_turns
    assert m["tool/answered_share"] == pytest.approx(2 / 5)
    assert m["tool/malformed_share"] == pytest.approx(1 / 5)
    assert m["tool/end/max_turns"] == 1 and m["tool/end/no_answer"] == 1
