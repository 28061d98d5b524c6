"""Execution rewards for RL on text-to-SQL, registered by name and mixed by weights.

Every reward is a pure function ``fn(ctx: RewardContext, **params) -> float``
in `REWARDS`; a `RewardConfig` names rewards with weights and per-reward
parameters, and `score_batch` executes a batch of completions through a
`SqlPool` and returns the weighted sum per completion, within a deadline.

Rewards named after a paper follow its released code (each docstring names
the file and commit); ``execution`` is the weak-supervision reward of
Kulkarni & Srikumar (no code released), ``arctic`` follows the Arctic paper.

The name ``process`` is the process reward of Reward-SQL: its weight is the
``lambda`` of the PRM's contribution and `ProcessConfig` (``reward.process``)
says which PRM and in which form. It is not a host function: the PRM runs on
the device inside the GRPO rollout (`rl.process`, docs/rewardsql.md), so
`score_batch` computes the outcome rewards only and leaves it out.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from jaxsql.compare import METRIC_NAMES, compare_all
from jaxsql.config import require
from jaxsql.deadline import NEVER, Deadline, ScoringTimeout
from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.extract import cocte_format_ok, extract_sql, format_ok, format_ok_think2sql
from jaxsql.sql.pool import SqlPool
from jaxsql.sql.result import ExecResult

#: Comparisons that can decide "correct" against a gold result (all computed from the raw execution).
MATCHES = ("ex_bag_rowfree", "ex_bag", "ex_set", "ex_ordered", "bird_ex", "think2sql_ex")
FORMAT_SHAPES = ("think_answer", "think_answer_strict", "cocte", "think_answer+cocte")
GATED_SCORES = ("cp_cr_tc", "bird_ex")
#: What a prediction whose result is empty, like the gold result, counts as.
EMPTY_RESULT = ("correct", "wrong", "neutral")
#: Metrics computed for rewards (``spider_ex`` needs its own executions: evaluation only).
REWARD_METRICS = tuple(m for m in METRIC_NAMES if m != "spider_ex")
DEFAULT_SCORE_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """Everything a reward may look at for one completion.

    `gold` is the gold SQL's result (None without gold SQL); `gold_answers`
    are gold answer strings (None without them). `episode` is the
    `jaxsql.tools.Episode` of a multi-turn rollout (None in single-turn: the
    episode rewards `tool_format` and `turn_cost` need it). `comparison` is computed once,
    on first use, by `jaxsql.compare.compare_all`. `empty_result` says what a
    prediction counts as when its result and the gold result are both empty
    (`EMPTY_RESULT`) and `empty_value` is the reward it then gets when that is
    ``"neutral"``.
    """

    completion: str
    pred_sql: str
    pred: ExecResult
    gold: ExecResult | None = None
    gold_sql: str | None = None
    gold_answers: tuple[str, ...] | None = None
    empty_result: str = "correct"
    empty_value: float = 0.0
    deadline: Deadline = dataclasses.field(default=NEVER, compare=False, repr=False)
    episode: Any = dataclasses.field(default=None, compare=False, repr=False)

    @functools.cached_property
    def comparison(self) -> dict[str, Any]:
        return compare_all(self.pred, self.gold, self.gold_answers, self.gold_sql, self.pred_sql,
                           metrics=REWARD_METRICS, deadline=self.deadline)

    @property
    def both_empty(self) -> bool:
        """The prediction ran and returned no rows, and so did the gold query."""
        return (self.pred.ok and self.gold is not None and self.gold.ok
                and len(self.pred.rows) == 0 and len(self.gold.rows) == 0)

    @property
    def neutral(self) -> bool:
        """The empty-result guard is ``neutral`` and applies to this completion."""
        return self.empty_result == "neutral" and self.both_empty


def is_correct(ctx: RewardContext, match: str = "ex_bag_rowfree") -> bool:
    """Whether the prediction is right: against the gold SQL result with the
    comparison `match` (``ex_bag_rowfree`` by default: strict on duplicates yet
    free of column order) when a gold result exists, else by the exact
    denotation match against the gold answers (weak supervision). With
    ``empty_result="wrong"`` (or ``"neutral"``) an empty result is never correct
    against an empty gold result."""
    if match not in MATCHES:
        raise ConfigError(f"reward parameter match: must be one of {list(MATCHES)}, got {match!r}")
    if not ctx.pred.ok:
        return False
    if ctx.gold is not None:
        if ctx.both_empty and ctx.empty_result != "correct":
            return False
        return bool(ctx.gold.ok and ctx.comparison[match])
    if ctx.gold_answers is not None:
        return bool(ctx.comparison["denotation_exact"])
    return False


def _gold_failed(ctx: RewardContext) -> bool:
    return ctx.gold_sql is not None and (ctx.gold is None or not ctx.gold.ok)


def execution(ctx: RewardContext, correct: float = 1.0, wrong: float = 0.0, failed: float = -1.0,
              match: str = "ex_bag_rowfree") -> float:
    """Execution reward: `correct` if right (`is_correct`), `failed` if the SQL
    does not run, `wrong` otherwise.

    Source: Kulkarni & Srikumar 2025, execution-based GRPO with weak
    supervision (reward against gold answers; a failing query is penalised).
    """
    if not ctx.pred.ok:
        return failed
    if ctx.neutral:
        return ctx.empty_value
    return correct if is_correct(ctx, match) else wrong


def _dense_score(ctx: RewardContext) -> float:
    """Think2SQL's QATCH score (``cp_cr_tc``) against the gold result; the relaxed
    denotation score with gold answers only (ours); 0 when the guard says wrong."""
    if ctx.gold is not None or ctx.gold_sql is not None:
        if ctx.gold is None or not ctx.gold.ok or (ctx.both_empty and ctx.empty_result == "wrong"):
            return 0.0
        return float(ctx.comparison["cp_cr_tc"])
    if ctx.gold_answers is not None:
        return float(ctx.comparison["denotation_relaxed"]) if ctx.pred.ok else 0.0
    return 0.0


def qatch(ctx: RewardContext) -> float:
    """Dense QATCH reward, Think2SQL's ``QATCH`` reward as released: ``cp_cr_tc``,
    ``round((CP + CR + TC) / 3, 3)``, 0 when the predicted or gold SQL fails.
    With gold answers only, the relaxed denotation score stands in (ours).

    Source: spapicchio/Think2SQL e099208 ``grpo/rewards/get_rewards_fun.py``
    (``qatch_reward_fn`` = ``nl2sql_reward`` with ``QATCHEvaluator``, metric
    ``cp_cr_tc``; nl2sqlevaluator 1.3.4 ``evaluator_nodes/qatch_metrics.py``).
    """
    if ctx.neutral:
        return ctx.empty_value
    return _dense_score(ctx)


def _buckets(score: float) -> float:
    """Think2SQL's ``is_discrete_buckets`` mapping, as its code has it."""
    if score < 0.1:
        return 0.1
    if score < 0.5:
        return 0.5
    if score < 0.8:
        return 0.8
    return 0.9


def gated(ctx: RewardContext, think_tag: str = "think", answer_tag: str = "answer", score: str = "cp_cr_tc",
          floor: float = 0.1, require_format: bool = True, buckets: bool = False) -> float:
    """Think2SQL's gated reward as released (``reward_small_update``).

    0 if the predicted or gold SQL fails; 1 if the score is exactly 1; else,
    when the completion has Think2SQL's format (`format_ok_think2sql`, or
    always with ``require_format=False``), ``max(score, floor)`` (``floor`` is
    the released 0.1; ``buckets``: the released discrete buckets), and 0 when
    it does not. ``score``: ``cp_cr_tc`` (the ``qatch_small_update*`` rewards)
    or ``bird_ex`` (``ex_small_update*``). With gold answers only (ours): exact
    denotation = 1, the relaxed denotation score otherwise.

    Source: spapicchio/Think2SQL e099208 ``grpo/rewards/rewards_answer_content.py``
    ``reward_small_update`` with ``include_format_reward=True``
    (``qatch_small_update_with_fm``, trained by ``scripts/slurm/train_grpo_multi_node.sh``).
    """
    if score not in GATED_SCORES:
        raise ConfigError(f"reward parameter score: must be one of {list(GATED_SCORES)}, got {score!r}")
    if not ctx.pred.ok or _gold_failed(ctx):
        return 0.0
    if ctx.neutral:
        return ctx.empty_value
    if ctx.gold is None and ctx.gold_answers is not None:
        value = 1.0 if is_correct(ctx) else _dense_score(ctx)
    elif score == "bird_ex":
        value = 0.0 if ctx.both_empty and ctx.empty_result == "wrong" else float(ctx.comparison["bird_ex"])
    else:
        value = _dense_score(ctx)
    if value == 1:
        return 1.0
    if require_format and not format_ok_think2sql(ctx.completion, think_tag, answer_tag):
        return 0.0
    if buckets:
        return _buckets(value)
    return value if value > floor else floor


def format(ctx: RewardContext, think_tag: str = "think", answer_tag: str = "answer",
           shape: str = "think_answer") -> float:
    """Format reward: 1 if the completion has the expected shape, else 0.

    ``think_answer``: Think2SQL's ``format_reward`` as released
    (`format_ok_think2sql`: case-insensitive tags, an empty answer allowed;
    source spapicchio/Think2SQL e099208 ``grpo/rewards/rewards_reasoning_content.py``);
    ``think_answer_strict``: our `format_ok` (each tag once, non-empty answer);
    ``cocte``: the extracted SQL is a chain of CTEs (Reward-SQL);
    ``think_answer+cocte``: both ``think_answer`` and ``cocte``.
    """
    if shape not in FORMAT_SHAPES:
        raise ConfigError(f"reward parameter shape: must be one of {list(FORMAT_SHAPES)}, got {shape!r}")
    ok = True
    if shape in ("think_answer", "think_answer+cocte"):
        ok = ok and format_ok_think2sql(ctx.completion, think_tag, answer_tag)
    if shape == "think_answer_strict":
        ok = ok and format_ok(ctx.completion, think_tag, answer_tag)
    if shape in ("cocte", "think_answer+cocte"):
        ok = ok and cocte_format_ok(ctx.pred_sql)
    return 1.0 if ok else 0.0


def arctic(ctx: RewardContext, correct: float = 1.0, executes: float = 0.1, failed: float = 0.0,
           match: str = "bird_ex") -> float:
    """Arctic-Text2SQL-R1 reward: 1 if correct, 0.1 if it only executes, 0 otherwise.

    Correct is judged as Arctic evaluates: BIRD's set EX (``bird_ex``), as in
    its released evaluator (snowflakedb/ArcticTraining 803ca29
    ``projects/arctic_text2sql_r1/bird_eval/evaluate_bird.py``, ``compare_sql``:
    ``set(predicted_res) == set(ground_truth_res)``). The reward is the paper's
    (Yao et al. 2025, arXiv 2505.20315); its training code is not released.
    """
    if not ctx.pred.ok:
        return failed
    if ctx.neutral:
        return ctx.empty_value
    return correct if is_correct(ctx, match) else executes


def _episode(ctx: RewardContext, reward: str):
    if ctx.episode is None:
        raise ConfigError(f"reward {reward}: reads the tool episode; it needs rollout.mode: multi_turn")
    return ctx.episode


def tool_format(ctx: RewardContext, answered: float = 1.0, missing: float = 0.0,
                malformed: float = 0.0) -> float:
    """Format reward of a multi-turn episode (ours, `jaxsql.tools`): `answered` when it ended
    with a final answer (every call before it well formed), `malformed` when a segment was
    malformed (a nested, empty, stray, unclosed or forged tag, text over the cap), `missing`
    otherwise (no answer: the row stopped, or a turn or SQL-time budget ended the episode)."""
    end = _episode(ctx, "tool_format").end
    if end == "answer":
        return answered
    return malformed if end == "malformed" else missing


def turn_cost(ctx: RewardContext) -> float:
    """Per-turn cost of a multi-turn episode (ours): ``-(tool calls made)``, refused calls
    included; its weight is the cost of one call (``weights: {turn_cost: 0.05}``)."""
    return -float(_episode(ctx, "turn_cost").turns)


RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {
    "execution": execution,
    "qatch": qatch,
    "gated": gated,
    "format": format,
    "arctic": arctic,
    "tool_format": tool_format,
    "turn_cost": turn_cost,
}
#: Rewards that read `RewardContext.episode` (multi-turn rollouts only).
EPISODE_REWARDS = ("tool_format", "turn_cost")
#: The process reward's name in `RewardConfig.weights` (computed by the trainer, not here).
PROCESS = "process"
#: Forms of the process reward: a trajectory score added to the outcome reward, or step rewards on tokens.
PROCESS_FORMS = ("trajectory", "step")
#: Step-score aggregations usable in training (`rl.prm_score.AGGREGATIONS` without ``entropy``).
PROCESS_AGGREGATIONS = ("min", "product", "mean", "last")
#: Per-token advantages of the ``step`` form (`rl.process.STEP_ADVANTAGES`).
PROCESS_ADVANTAGES = ("grpo_step", "rewardsql")


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """The process reward (``reward.process``): Reward-SQL's PRM inside GRPO.

    Its weight ``lambda`` is ``weights.process``. Attributes:
      prm: a PRM directory (`models.prm.load_prm`: ``jaxsql prm init`` / ``jaxsql prm train``
        output) whose tokenizer is the policy's; checked when the trainer starts.
      form: ``trajectory``: ``reward = outcome + lambda * aggregation(step scores)``, one scalar per
        completion through the configured advantage; ``step``: step rewards on each step's tokens
        and a per-token advantage (`advantage`).
      aggregation: the trajectory score (min / product / mean / last); in the ``step`` form it
        only feeds the logged ``reward/process_mean``.
      advantage: the ``step`` form's per-token advantage: ``grpo_step`` (the outcome advantage plus
        lambda times the sum of the group-normalised scores of this and the later steps, after
        DeepSeekMath's process supervision) or ``rewardsql`` (the released
        ``compute_grpo_process_advantage_avg_unique``).
      max_len: longest PRM row in tokens (prompt + steps with results and tags); steps past it
        get no score.
    """

    prm: str = ""
    form: str = "trajectory"
    aggregation: str = "min"
    advantage: str = "grpo_step"
    max_len: int = 1024

    def __post_init__(self) -> None:
        name = "RewardConfig.process"
        require(isinstance(self.prm, str) and self.prm.strip() != "", name, "prm",
                "set the PRM directory (jaxsql prm init / jaxsql prm train output)")
        require(self.form in PROCESS_FORMS, name, "form", f"must be one of {list(PROCESS_FORMS)}, got {self.form!r}")
        require(self.aggregation in PROCESS_AGGREGATIONS, name, "aggregation",
                f"must be one of {list(PROCESS_AGGREGATIONS)}, got {self.aggregation!r}")
        require(self.advantage in PROCESS_ADVANTAGES, name, "advantage",
                f"must be one of {list(PROCESS_ADVANTAGES)}, got {self.advantage!r}")
        require(isinstance(self.max_len, int) and self.max_len >= 16, name, "max_len",
                f"must be an integer >= 16, got {self.max_len!r}")


def _param_names(fn: RewardFn) -> set[str]:
    return set(list(inspect.signature(fn).parameters)[1:])


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Which rewards to sum, with weights and parameters.

    ``reward = Σ_name weights[name] * REWARDS[name](ctx, **params[name])``.
    `think_tag` / `answer_tag` are passed to every reward that takes them
    (unless its params set them) and to SQL extraction. `empty_result`:
    what a prediction counts as when its result and the gold result are both
    empty: ``correct`` (default, as every official evaluator scores it),
    ``wrong`` (a wrong answer that runs), or ``neutral`` (every execution
    reward gives `empty_value`; the format reward is unaffected).
    `score_timeout_s`: deadline of host-side scoring for one `score_batch`
    call; completions not scored by then count as failed queries.
    Example (YAML): ``{weights: {gated: 0.95, format: 0.05}}`` (Think2SQL mix).
    """

    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"execution": 1.0})
    params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    think_tag: str = "think"
    answer_tag: str = "answer"
    empty_result: str = "correct"
    empty_value: float = 0.0
    score_timeout_s: float = DEFAULT_SCORE_TIMEOUT_S
    process: ProcessConfig | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        require(len(self.weights) > 0, name, "weights", "name at least one reward")
        for reward, w in self.weights.items():
            require(reward in REWARDS or reward == PROCESS, name, f"weights.{reward}",
                    f"unknown reward {reward!r}; known rewards are {sorted([*REWARDS, PROCESS])}")
            require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w),
                    name, f"weights.{reward}", f"must be a finite number, got {w!r}")
        if PROCESS in self.weights:
            require(self.process is not None, name, f"weights.{PROCESS}",
                    "the process reward needs a reward.process section naming its PRM (process.prm)")
            require(len(self.outcome_weights) > 0, name, "weights",
                    "the process reward is added to an outcome reward: name one besides process")
        else:
            require(self.process is None, name, "process", f"is set but weights.{PROCESS} (its lambda) is not")
        for reward, p in self.params.items():
            require(reward in self.weights, name, f"params.{reward}", "has no weight in weights")
            require(reward != PROCESS, name, f"params.{reward}", "the process reward's settings go in reward.process")
            unknown = sorted(set(p) - _param_names(REWARDS[reward]))
            require(not unknown, name, f"params.{reward}",
                    f"unknown parameter(s) {unknown}; {reward} takes {sorted(_param_names(REWARDS[reward]))}")
            if "match" in p:
                require(p["match"] in MATCHES, name, f"params.{reward}.match", f"must be one of {list(MATCHES)}")
            if "shape" in p:
                require(p["shape"] in FORMAT_SHAPES, name, f"params.{reward}.shape", f"must be one of {list(FORMAT_SHAPES)}")
            if "score" in p:
                require(p["score"] in GATED_SCORES, name, f"params.{reward}.score",
                        f"must be one of {list(GATED_SCORES)}")
        for tag in ("think_tag", "answer_tag"):
            value = getattr(self, tag)
            require(isinstance(value, str) and value.isidentifier(), name, tag, f"must be a tag name, got {value!r}")
        require(self.empty_result in EMPTY_RESULT, name, "empty_result",
                f"must be one of {list(EMPTY_RESULT)}, got {self.empty_result!r}")
        require(isinstance(self.empty_value, (int, float)) and math.isfinite(self.empty_value), name,
                "empty_value", f"must be a finite number, got {self.empty_value!r}")
        require(isinstance(self.score_timeout_s, (int, float)) and 0 < self.score_timeout_s < math.inf, name,
                "score_timeout_s", f"must be a positive finite number of seconds, got {self.score_timeout_s!r}")
        object.__setattr__(self, "weights", types.MappingProxyType({k: float(v) for k, v in self.weights.items()}))
        object.__setattr__(self, "params", types.MappingProxyType(
            {k: types.MappingProxyType(dict(v)) for k, v in self.params.items()}))

    @property
    def outcome_weights(self) -> dict[str, float]:
        """The host rewards' weights (every one but ``process``)."""
        return {k: v for k, v in self.weights.items() if k != PROCESS}

    @property
    def process_weight(self) -> float:
        """``lambda``, the process reward's weight (0 without one)."""
        return float(self.weights.get(PROCESS, 0.0))

    def kwargs(self, reward: str) -> dict[str, Any]:
        """Keyword arguments for `REWARDS[reward]`: the tags where it takes them, then its params."""
        names = _param_names(REWARDS[reward])
        out = {t: getattr(self, t) for t in ("think_tag", "answer_tag") if t in names}
        out.update(self.params.get(reward, {}))
        return out


def combined_reward(ctx: RewardContext, config: RewardConfig) -> tuple[float, dict[str, float]]:
    """``(Σ w_i r_i, {name: r_i})`` for one context (the host rewards; ``process`` is the trainer's)."""
    parts = {n: float(REWARDS[n](ctx, **config.kwargs(n))) for n in config.outcome_weights}
    return sum(config.weights[n] * v for n, v in parts.items()), parts


class ExampleLike(Protocol):
    """What `score_batch` needs of an example (`data.records.Example` has it)."""

    id: str
    db_path: str
    gold_sql: str | None
    gold_answers: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """Rewards of a batch of completions.

    Attributes:
      rewards: float32 ``[N]``, the weighted sum per completion.
      components: reward name -> float32 ``[N]``, unweighted.
      metrics: one dict per completion: id, pred_sql, executed, error, correct,
        format_ok, scoring_timeout, and the metrics of `ITEM_METRICS`.
      summary: batch means: ``reward_mean``, ``ex`` (fraction correct),
        ``ex_set``/``ex_bag``/``bird_ex``/``denotation_exact`` (over items that
        have them), ``executed``, ``error_rate``, ``errors/<kind>``,
        ``reward/<name>``, ``scoring/timeouts`` (fraction past the deadline).
    """

    rewards: np.ndarray
    components: dict[str, np.ndarray]
    metrics: tuple[dict[str, Any], ...]
    summary: dict[str, float]


#: Metrics reported per completion by `score_batch`.
ITEM_METRICS = ("ex_set", "ex_bag", "ex_bag_rowfree", "ex_ordered", "bird_ex", "think2sql_ex", "cell_precision",
                "cell_recall", "tuple_cardinality", "cp_cr_tc", "denotation_exact", "denotation_relaxed",
                "wikitq_accuracy")
_SCORING_TIMEOUT = ExecResult.failure("timeout", "host-side scoring passed its deadline")


def score_batch(pool: SqlPool, completions: Sequence[str], examples: Sequence[ExampleLike],
                config: RewardConfig, *, timeout_s: float | None = None,
                sqls: Sequence[str | None] | None = None, episodes: Sequence[Any] | None = None) -> ScoreBatch:
    """Score completions[i] against examples[i] (repeat each example G times for GRPO groups).

    `sqls` are the predicted queries when the caller has them already (a
    multi-turn rollout's final answers, None or "" for none: a failed query);
    by default each is extracted from its completion with ``config.answer_tag``.
    `episodes` (multi-turn) are handed to the rewards in `RewardContext.episode`.

    All predicted SQL runs in one pool batch together with the (cached) gold
    SQL. Host-side scoring (comparison and rewards) has a deadline of
    `timeout_s` seconds (default ``config.score_timeout_s``) for the whole
    batch: a completion not scored by then is scored as a failed query
    (``error="timeout"``, ``scoring_timeout=True``).
    """
    if len(completions) != len(examples):
        raise JaxsqlError(f"score_batch: {len(completions)} completions but {len(examples)} examples")
    if sqls is None:
        sqls = [extract_sql(c, config.answer_tag) for c in completions]
    else:
        sqls = [s or "" for s in sqls]
    if len(sqls) != len(completions) or (episodes is not None and len(episodes) != len(completions)):
        raise JaxsqlError(f"score_batch: {len(completions)} completions but {len(sqls)} queries"
                          + ("" if episodes is None else f" and {len(episodes)} episodes"))
    jobs = [(ex.db_path, sql) for ex, sql in zip(examples, sqls)]
    gold_idx = [i for i, ex in enumerate(examples) if ex.gold_sql is not None]
    gold_items = [(examples[i].id, examples[i].db_path, examples[i].gold_sql) for i in gold_idx]
    preds, golds_list = pool.run_batch(jobs, gold_items)
    golds: list[ExecResult | None] = [None] * len(examples)
    for i, g in zip(gold_idx, golds_list):
        golds[i] = g
    deadline = Deadline(config.score_timeout_s if timeout_s is None else timeout_s)
    n = len(completions)
    components = {name: np.zeros(n, np.float32) for name in config.outcome_weights}
    rewards = np.zeros(n, np.float32)
    metrics = []
    match = config.params.get("execution", {}).get("match", "ex_bag_rowfree")
    for i, ex in enumerate(examples):
        answers = tuple(ex.gold_answers) if ex.gold_answers is not None else None
        timed_out = False

        def context(pred: ExecResult, limit: Deadline) -> RewardContext:
            return RewardContext(completions[i], sqls[i], pred, golds[i], ex.gold_sql, answers,
                                 config.empty_result, config.empty_value, limit,
                                 None if episodes is None else episodes[i])

        try:
            deadline.check()
            ctx = context(preds[i], deadline)
            total, parts = combined_reward(ctx, config)
            c = ctx.comparison
        except ScoringTimeout:
            timed_out = True
            ctx = context(_SCORING_TIMEOUT, NEVER)  # a failed prediction is scored in O(1) (plus its text)
            total, parts = combined_reward(ctx, config)
            c = ctx.comparison
        rewards[i] = total
        for name, v in parts.items():
            components[name][i] = v
        item = {"id": ex.id, "pred_sql": sqls[i], "executed": ctx.pred.ok, "error": ctx.pred.error,
                "correct": is_correct(ctx, match), "scoring_timeout": timed_out,
                "format_ok": format_ok(completions[i], config.think_tag, config.answer_tag)}
        item.update({k: c[k] for k in ITEM_METRICS})
        metrics.append(item)
    return ScoreBatch(rewards=rewards, components=components, metrics=tuple(metrics),
                      summary=summarize_scores(rewards, components, metrics))


def summarize_scores(rewards: np.ndarray, components: Mapping[str, np.ndarray],
                     metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The batch means of `ScoreBatch.summary` from per-completion rewards, components and metrics."""
    n = len(metrics)
    summary: dict[str, float] = {"reward_mean": float(rewards.mean()) if n else 0.0}
    if n:
        summary["ex"] = float(np.mean([m["correct"] for m in metrics]))
        summary["executed"] = float(np.mean([m["executed"] for m in metrics]))
        summary["error_rate"] = 1.0 - summary["executed"]
        summary["scoring/timeouts"] = float(np.mean([m["scoring_timeout"] for m in metrics]))
        for key in ("ex_set", "ex_bag", "bird_ex", "denotation_exact"):
            vals = [m[key] for m in metrics if m[key] is not None]
            if vals:
                summary[key] = float(np.mean(vals))
        for kind in sorted({m["error"] for m in metrics if m["error"]}):
            summary[f"errors/{kind}"] = float(np.mean([m["error"] == kind for m in metrics]))
        for name, arr in components.items():
            summary[f"reward/{name}"] = float(arr.mean())
    return summary


def concat_scores(parts: Sequence[ScoreBatch]) -> ScoreBatch:
    """One `ScoreBatch` of `parts`' completions in order, its summary over all of them (e.g.
    the scores of every process of a multi-host run: the summary one process would log)."""
    if len(parts) == 1:
        return parts[0]
    rewards = np.concatenate([p.rewards for p in parts])
    components = {k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components}
    metrics = tuple(m for p in parts for m in p.metrics)
    return ScoreBatch(rewards=rewards, components=components, metrics=metrics,
                      summary=summarize_scores(rewards, components, metrics))
