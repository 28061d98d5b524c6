"""Greedy evaluation of a policy on a split: EX (set), refined EX (bag), error rate, QATCH.

`evaluate(params, cfg, tokenizer, examples, pool)` renders each example's
prompt (schema serialised from its database), decodes greedily with
`models.sampler.generate`, executes the extracted SQL through the host
`SqlPool` and compares it with the gold SQL's result (`jaxsql.rewards.score_batch`).

Metrics (means over the examples, in [0, 1]):

- ``ex_set``: execution accuracy with set semantics (BIRD, Li et al. 2023):
  ``set(rows(pred)) == set(rows(gold))``;
- ``ex_bag``: Think2SQL's refined EX (Papicchio et al. 2025): the multisets of
  rows are equal, each row's values compared order-free;
- ``error_rate``: fraction of predictions that do not execute (any error kind);
- ``cell_precision`` / ``cell_recall`` / ``tuple_cardinality`` and ``qatch``
  (their mean): QATCH (Papicchio et al. 2023) averaged over the examples;
- ``denotation_exact``: the prediction's cells match the gold answers
  (the weak-supervision criterion) when the examples carry answers.

Gold SQL is used here, for measurement only; a training reward never sees it
in the weak-supervision setting.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from data.records import Example
from rl.rollout import decode_completions

SchemaFn = Callable[[str], str]


def schema_cache(style: str = "compact", sample_values: int = 0) -> SchemaFn:
    """A ``db_path -> schema text`` function that serialises each database once."""
    from data.schema import serialize_schema

    cache: dict[str, str] = {}

    def get(db_path: str) -> str:
        if db_path not in cache:
            cache[db_path] = serialize_schema(db_path, style=style, sample_values=sample_values)
        return cache[db_path]

    return get


def encode_prompts(examples: Sequence[Example], tokenizer: Any, schema: SchemaFn,
                   prompt_format: str = "plain", max_prompt_len: int | None = None) -> list[list[int]]:
    """Token ids of each example's prompt (chat template when the tokenizer has one).

    Prompts longer than `max_prompt_len` keep their last tokens (the question
    and the assistant turn), dropping the start of the instruction.
    """
    from data.prompts import render_prompt

    out = []
    for ex in examples:
        text = render_prompt(ex, schema(ex.db_path), prompt_format, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            ids = ids[-max_prompt_len:]
        out.append(list(ids))
    return out


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Summary metrics (see the module docstring) and one row per example."""

    summary: dict[str, float]
    rows: tuple[dict[str, Any], ...]


def summarise(metrics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means of the per-example metrics of `score_batch` (None values count as 0)."""
    n = len(metrics)
    if n == 0:
        return {"n": 0.0}

    def mean(key: str) -> float:
        return float(np.mean([float(m.get(key) or 0.0) for m in metrics]))

    out = {"n": float(n), "ex_set": mean("ex_set"), "ex_bag": mean("ex_bag"),
           "error_rate": 1.0 - mean("executed"), "cell_precision": mean("cell_precision"),
           "cell_recall": mean("cell_recall"), "tuple_cardinality": mean("tuple_cardinality")}
    out["qatch"] = (out["cell_precision"] + out["cell_recall"] + out["tuple_cardinality"]) / 3.0
    if any(m.get("denotation_exact") is not None for m in metrics):
        out["denotation_exact"] = mean("denotation_exact")
    return out


def evaluate(params: Any, cfg: Any, tokenizer: Any, examples: Sequence[Example], pool: Any, *,
             prompt_format: str = "plain", schema: SchemaFn | None = None, max_new_tokens: int = 64,
             batch_size: int = 64, max_prompt_len: int | None = None,
             buckets: Sequence[int] | None = None) -> EvalResult:
    """Greedy-decode every example and score it against its gold SQL result.

    Args:
      params, cfg: the policy (`models.model` pytree and its `ModelConfig`).
      tokenizer: a `transformers` tokenizer (its chat template is used if it has one).
      examples: the split; each needs ``gold_sql`` (EX / QATCH) and may carry answers.
      pool: a `jaxsql.sql.SqlPool`.
      prompt_format: ``plain``, ``think`` or ``cocte`` (SQL extracted by its rule).
      schema: ``db_path -> schema text``; default compact schemas without samples.
      max_new_tokens: completion cap.
      batch_size: prompts per `generate` call (the last batch is padded so
        every call has the same shape and compiles once).
    """
    import jax

    from jaxsql.rewards import RewardConfig, score_batch
    from models.sampler import DEFAULT_BUCKETS, generate

    schema = schema or schema_cache()
    reward_cfg = RewardConfig(weights={"execution": 1.0})
    prompts = encode_prompts(examples, tokenizer, schema, prompt_format, max_prompt_len)
    stop_ids = tuple(cfg.eos_token_ids)
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        out = generate(params, cfg, padded, key=jax.random.PRNGKey(0), max_new_tokens=max_new_tokens,
                       greedy=True, stop_ids=stop_ids, buckets=buckets or DEFAULT_BUCKETS)
        tokens, lengths = jax.device_get((out.tokens, out.lengths))
        completions.extend(decode_completions(tokenizer, tokens, lengths, stop_ids)[: len(chunk)])
    scored = score_batch(pool, completions, examples, reward_cfg)
    rows = tuple(dict(m, completion=c) for m, c in zip(scored.metrics, completions))
    return EvalResult(summary=summarise(scored.metrics), rows=rows)
