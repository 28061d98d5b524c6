"""Execution rewards for RL on text-to-SQL, registered by name and mixed by weights.

Every reward is a pure function ``fn(ctx: RewardContext, **params) -> float``
in `REWARDS`; a `RewardConfig` names rewards with weights and per-reward
parameters, and `score_batch` executes a batch of completions through a
`SqlPool` and returns the weighted sum per completion.

The name ``process`` is reserved for the process reward model (Reward-SQL
PRM step scores); it is not registered yet and a config naming it is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from jaxsql.compare import compare_all
from jaxsql.config import require
from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.extract import cocte_format_ok, extract_sql, format_ok
from jaxsql.sql.pool import SqlPool
from jaxsql.sql.result import ExecResult

MATCHES = ("ex_bag", "ex_set", "ex_ordered")
FORMAT_SHAPES = ("think_answer", "cocte", "think_answer+cocte")


@dataclasses.dataclass(frozen=True)
class RewardContext:
    """Everything a reward may look at for one completion.

    `gold` is the gold SQL's result (None without gold SQL); `gold_answers`
    are gold answer strings (None without them). `comparison` is computed once,
    on first use, by `jaxsql.compare.compare_all`.
    """

    completion: str
    pred_sql: str
    pred: ExecResult
    gold: ExecResult | None = None
    gold_sql: str | None = None
    gold_answers: tuple[str, ...] | None = None

    @functools.cached_property
    def comparison(self) -> dict[str, Any]:
        return compare_all(self.pred, self.gold, self.gold_answers, self.gold_sql)


def is_correct(ctx: RewardContext, match: str = "ex_bag") -> bool:
    """Whether the prediction is right: against the gold SQL result with the
    comparison `match` (``ex_bag`` by default: Think2SQL's refined EX, strict on
    duplicates yet free of column order) when a gold result exists, else by the
    exact denotation match against the gold answers (weak supervision)."""
    if match not in MATCHES:
        raise ConfigError(f"reward parameter match: must be one of {list(MATCHES)}, got {match!r}")
    if not ctx.pred.ok:
        return False
    if ctx.gold is not None:
        return bool(ctx.gold.ok and ctx.comparison[match])
    if ctx.gold_answers is not None:
        return bool(ctx.comparison["denotation_exact"])
    return False


def _gold_failed(ctx: RewardContext) -> bool:
    return ctx.gold_sql is not None and (ctx.gold is None or not ctx.gold.ok)


def execution(ctx: RewardContext, correct: float = 1.0, wrong: float = 0.0, failed: float = -1.0,
              match: str = "ex_bag") -> float:
    """Execution reward: `correct` if right (`is_correct`), `failed` if the SQL
    does not run, `wrong` otherwise.

    Source: Kulkarni & Srikumar 2025, execution-based GRPO with weak
    supervision (reward against gold answers; a failing query is penalised).
    """
    if not ctx.pred.ok:
        return failed
    return correct if is_correct(ctx, match) else wrong


def qatch(ctx: RewardContext) -> float:
    """Dense QATCH reward: ``(CP + CR + TC) / 3`` against the gold result; 0 if
    the prediction fails. With gold answers only, the relaxed denotation score
    (fraction of gold values found) stands in for it.

    Source: Papicchio et al. 2025 (Think2SQL), metrics of QATCH (Papicchio et al. 2023).
    """
    if not ctx.pred.ok:
        return 0.0
    c = ctx.comparison
    if ctx.gold is not None:
        return float(c["qatch"]) if ctx.gold.ok else 0.0
    if ctx.gold_answers is not None:
        return float(c["denotation_relaxed"])
    return 0.0


def gated(ctx: RewardContext, think_tag: str = "think", answer_tag: str = "answer", match: str = "ex_bag",
          floor: float = 0.1, require_format: bool = True) -> float:
    """Think2SQL gated reward: 0 if the predicted or gold SQL does not execute;
    1 if the prediction is exact; else ``max(qatch, floor)`` when the completion
    has the think/answer format, and 0 when it does not.

    Source: Papicchio et al. 2025, Think2SQL (QA + SU + FM gating).
    """
    if not ctx.pred.ok or _gold_failed(ctx):
        return 0.0
    if is_correct(ctx, match):
        return 1.0
    if require_format and not format_ok(ctx.completion, think_tag, answer_tag):
        return 0.0
    return max(qatch(ctx), floor)


def format(ctx: RewardContext, think_tag: str = "think", answer_tag: str = "answer",
           shape: str = "think_answer") -> float:
    """Format reward: 1 if the completion has the expected shape, else 0.

    ``think_answer``: ``<think>...</think><answer>...</answer>`` (Think2SQL, DeepSeek-R1);
    ``cocte``: the extracted SQL is a chain of CTEs (Reward-SQL); ``think_answer+cocte``: both.
    """
    if shape not in FORMAT_SHAPES:
        raise ConfigError(f"reward parameter shape: must be one of {list(FORMAT_SHAPES)}, got {shape!r}")
    ok = True
    if shape in ("think_answer", "think_answer+cocte"):
        ok = ok and format_ok(ctx.completion, think_tag, answer_tag)
    if shape in ("cocte", "think_answer+cocte"):
        ok = ok and cocte_format_ok(ctx.pred_sql)
    return 1.0 if ok else 0.0


def arctic(ctx: RewardContext, correct: float = 1.0, executes: float = 0.1, failed: float = 0.0,
           match: str = "ex_bag") -> float:
    """Arctic-Text2SQL-R1 reward: 1 if correct, 0.1 if it only executes, 0 otherwise.

    Source: Yao et al. 2025, Arctic-Text2SQL-R1 (simple rewards).
    """
    if not ctx.pred.ok:
        return failed
    return correct if is_correct(ctx, match) else executes


RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {
    "execution": execution,
    "qatch": qatch,
    "gated": gated,
    "format": format,
    "arctic": arctic,
}
RESERVED = ("process",)


def _param_names(fn: RewardFn) -> set[str]:
    return set(list(inspect.signature(fn).parameters)[1:])


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Which rewards to sum, with weights and parameters.

    ``reward = Σ_name weights[name] * REWARDS[name](ctx, **params[name])``.
    `think_tag` / `answer_tag` are passed to every reward that takes them
    (unless its params set them) and to SQL extraction.
    Example (YAML): ``{weights: {gated: 0.95, format: 0.05}}`` (Think2SQL mix).
    """

    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"execution": 1.0})
    params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    think_tag: str = "think"
    answer_tag: str = "answer"

    def __post_init__(self) -> None:
        name = type(self).__name__
        require(len(self.weights) > 0, name, "weights", "name at least one reward")
        for reward, w in self.weights.items():
            require(reward not in RESERVED, name, f"weights.{reward}",
                    "reserved for the process reward model, which is not implemented yet")
            require(reward in REWARDS, name, f"weights.{reward}",
                    f"unknown reward {reward!r}; known rewards are {sorted(REWARDS)}")
            require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w),
                    name, f"weights.{reward}", f"must be a finite number, got {w!r}")
        for reward, p in self.params.items():
            require(reward in self.weights, name, f"params.{reward}", "has no weight in weights")
            unknown = sorted(set(p) - _param_names(REWARDS[reward]))
            require(not unknown, name, f"params.{reward}",
                    f"unknown parameter(s) {unknown}; {reward} takes {sorted(_param_names(REWARDS[reward]))}")
            if "match" in p:
                require(p["match"] in MATCHES, name, f"params.{reward}.match", f"must be one of {list(MATCHES)}")
            if "shape" in p:
                require(p["shape"] in FORMAT_SHAPES, name, f"params.{reward}.shape", f"must be one of {list(FORMAT_SHAPES)}")
        for tag in ("think_tag", "answer_tag"):
            value = getattr(self, tag)
            require(isinstance(value, str) and value.isidentifier(), name, tag, f"must be a tag name, got {value!r}")
        object.__setattr__(self, "weights", types.MappingProxyType({k: float(v) for k, v in self.weights.items()}))
        object.__setattr__(self, "params", types.MappingProxyType(
            {k: types.MappingProxyType(dict(v)) for k, v in self.params.items()}))

    def kwargs(self, reward: str) -> dict[str, Any]:
        """Keyword arguments for `REWARDS[reward]`: the tags where it takes them, then its params."""
        names = _param_names(REWARDS[reward])
        out = {t: getattr(self, t) for t in ("think_tag", "answer_tag") if t in names}
        out.update(self.params.get(reward, {}))
        return out


def combined_reward(ctx: RewardContext, config: RewardConfig) -> tuple[float, dict[str, float]]:
    """``(Σ w_i r_i, {name: r_i})`` for one context."""
    parts = {n: float(REWARDS[n](ctx, **config.kwargs(n))) for n in config.weights}
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
      metrics: one dict per completion (id, pred_sql, executed, error, correct,
        ex_set, ex_bag, ex_ordered, cell_precision, cell_recall,
        tuple_cardinality, denotation_exact, denotation_relaxed, format_ok).
      summary: batch means: ``reward_mean``, ``ex`` (fraction correct),
        ``ex_set``/``ex_bag`` (over items with a gold result), ``executed``,
        ``error_rate``, ``errors/<kind>``, ``reward/<name>``.
    """

    rewards: np.ndarray
    components: dict[str, np.ndarray]
    metrics: tuple[dict[str, Any], ...]
    summary: dict[str, float]


_ITEM_KEYS = ("ex_set", "ex_bag", "ex_ordered", "cell_precision", "cell_recall", "tuple_cardinality",
              "denotation_exact", "denotation_relaxed")


def score_batch(pool: SqlPool, completions: Sequence[str], examples: Sequence[ExampleLike],
                config: RewardConfig) -> ScoreBatch:
    """Score completions[i] against examples[i] (repeat each example G times for GRPO groups).

    All predicted SQL runs in one pool batch together with the (cached) gold SQL.
    """
    if len(completions) != len(examples):
        raise JaxsqlError(f"score_batch: {len(completions)} completions but {len(examples)} examples")
    sqls = [extract_sql(c, config.answer_tag) for c in completions]
    jobs = [(ex.db_path, sql) for ex, sql in zip(examples, sqls)]
    gold_idx = [i for i, ex in enumerate(examples) if ex.gold_sql is not None]
    gold_items = [(examples[i].id, examples[i].db_path, examples[i].gold_sql) for i in gold_idx]
    preds, golds_list = pool.run_batch(jobs, gold_items)
    golds: list[ExecResult | None] = [None] * len(examples)
    for i, g in zip(gold_idx, golds_list):
        golds[i] = g
    n = len(completions)
    components = {name: np.zeros(n, np.float32) for name in config.weights}
    rewards = np.zeros(n, np.float32)
    metrics = []
    match = config.params.get("execution", {}).get("match", "ex_bag")
    for i, ex in enumerate(examples):
        answers = tuple(ex.gold_answers) if ex.gold_answers is not None else None
        ctx = RewardContext(completions[i], sqls[i], preds[i], golds[i], ex.gold_sql, answers)
        total, parts = combined_reward(ctx, config)
        rewards[i] = total
        for name, v in parts.items():
            components[name][i] = v
        c = ctx.comparison
        item = {"id": ex.id, "pred_sql": sqls[i], "executed": preds[i].ok, "error": preds[i].error,
                "correct": is_correct(ctx, match),
                "format_ok": format_ok(completions[i], config.think_tag, config.answer_tag)}
        item.update({k: c[k] for k in _ITEM_KEYS})
        metrics.append(item)
    summary: dict[str, float] = {"reward_mean": float(rewards.mean()) if n else 0.0}
    if n:
        summary["ex"] = float(np.mean([m["correct"] for m in metrics]))
        summary["executed"] = float(np.mean([m["executed"] for m in metrics]))
        summary["error_rate"] = 1.0 - summary["executed"]
        for key in ("ex_set", "ex_bag", "denotation_exact"):
            vals = [m[key] for m in metrics if m[key] is not None]
            if vals:
                summary[key] = float(np.mean(vals))
        for kind in sorted({m["error"] for m in metrics if m["error"]}):
            summary[f"errors/{kind}"] = float(np.mean([m["error"] == kind for m in metrics]))
        for name, arr in components.items():
            summary[f"reward/{name}"] = float(arr.mean())
    return ScoreBatch(rewards=rewards, components=components, metrics=tuple(metrics), summary=summary)
