"""Trajectory scores from PRM step scores, and scoring completions with a PRM end to end.

Aggregations (registry `AGGREGATIONS`, pure functions of a trajectory's step
scores) are those of the released best-of-N evaluator
(``evaluation/utils/request_api.py: calculate_scores``): ``min``,
``product``, ``mean`` (``average`` there) and ``last`` (``last_step``), plus
``entropy``, the entropy-weighted mean below (the later paper version
weights steps by entropy without publishing the formula). A trajectory with
no scored step (not CoCTE text that is empty, too long, or whose steps all
fell past the PRM's length limit) scores 0: a defined value, never an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from jaxsql.errors import ConfigError

AGGREGATIONS: dict[str, Callable[..., float]] = {}


def register_aggregation(name: str):
    """Register ``fn(scores_K, entropies_K=None, **params) -> float``."""

    def deco(fn):
        AGGREGATIONS[name] = fn
        return fn

    return deco


@register_aggregation("min")
def min_score(scores: Sequence[float], entropies: Sequence[float] | None = None) -> float:
    """The weakest step: ``min_k s_k`` (the released default for best-of-N)."""
    return float(np.min(scores))


@register_aggregation("product")
def product_score(scores: Sequence[float], entropies: Sequence[float] | None = None) -> float:
    """Every step right at once, steps taken as independent: ``prod_k s_k``."""
    return float(np.prod(np.asarray(scores, np.float64)))


@register_aggregation("mean")
def mean_score(scores: Sequence[float], entropies: Sequence[float] | None = None) -> float:
    """``(1/K) sum_k s_k``."""
    return float(np.mean(scores))


@register_aggregation("last")
def last_score(scores: Sequence[float], entropies: Sequence[float] | None = None) -> float:
    """The final step's score ``s_K`` (the PRM's judgement of the whole query)."""
    return float(scores[-1])


@register_aggregation("entropy")
def entropy_weighted_score(scores: Sequence[float], entropies: Sequence[float] | None = None,
                           tau: float = 1.0) -> float:
    """Entropy-weighted mean of step scores: ``S = sum_k w_k s_k`` with
    ``w_k = exp(H_k / tau) / sum_j exp(H_j / tau)``.

    ``H_k`` is the policy's mean token entropy (nats) over step k's tokens.
    Derivation: a step the policy wrote with low entropy was nearly forced
    (boilerplate, a copy of an earlier step) and its PRM score says little
    about this particular trajectory; the high-entropy steps are where the
    policy chose among alternatives and where a wrong choice is likely, so
    their scores should count most. A softmax over the trajectory's steps
    turns entropies into weights that sum to one (scale-free in K), and the
    temperature `tau` switches between the plain mean (``tau -> inf``) and
    the score of the most uncertain step alone (``tau -> 0``); 1 nat is the
    default. Without entropies (or with equal ones) this is the mean.
    """
    s = np.asarray(scores, np.float64)
    if entropies is None:
        return float(s.mean())
    h = np.asarray(entropies, np.float64)
    if h.shape != s.shape:
        raise ValueError(f"entropy weighting: {len(h)} entropies for {len(s)} steps")
    if not tau > 0:
        raise ConfigError(f"entropy weighting: tau must be > 0, got {tau}")
    z = h / tau
    w = np.exp(z - z.max())
    return float((w / w.sum() * s).sum())


def aggregate(scores: Sequence[float], how: str = "min", *, entropies: Sequence[float] | None = None,
              **params: Any) -> float:
    """Trajectory score of step `scores` by the aggregation named `how` (0.0 for no steps)."""
    if how not in AGGREGATIONS:
        raise ConfigError(f"unknown step-score aggregation {how!r}; known: {sorted(AGGREGATIONS)}")
    if len(scores) == 0:
        return 0.0
    if how == "entropy":
        return entropy_weighted_score(scores, entropies, **params)
    if params:
        raise ConfigError(f"aggregation {how!r} takes no parameters, got {sorted(params)}")
    return AGGREGATIONS[how](scores)


def step_mean_entropies(token_entropies: Sequence[float], token_spans: Sequence[tuple[int, int]],
                        step_spans: Sequence[tuple[int, int]]) -> list[float]:
    """Mean entropy of the tokens of each step.

    `token_spans[i]` is token i's (start, end) character span in the
    completion and `step_spans[k]` step k's; a token belongs to the step
    that holds its last character. A step with no token of its own (it
    shares one token with its neighbour) takes the entropy of the token that
    holds its last character, so every step gets a value.
    """
    ends = np.asarray([max(e - 1, s) for s, e in token_spans], np.int64)
    ent = np.asarray(token_entropies, np.float64)
    out = []
    for s, e in step_spans:
        inside = (ends >= s) & (ends < e)
        if inside.any():
            out.append(float(ent[inside].mean()))
        else:
            holder = np.nonzero(ends >= e - 1)[0]
            out.append(float(ent[holder[0]]) if len(holder) else 0.0)
    return out


@dataclasses.dataclass(frozen=True)
class ScoredTrajectory:
    """A completion's steps, each step's PRM score, and trajectory scores by every aggregation."""

    completion: str
    steps: tuple[str, ...]
    ok: tuple[bool, ...]
    step_scores: tuple[float, ...]
    executable: bool
    problems: tuple[str, ...]
    scores: dict[str, float]
    entropies: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        scores = [round(s, 6) for s in self.step_scores] + [None] * (len(self.steps) - len(self.step_scores))
        out = {"completion": self.completion, "executable": self.executable, "problems": list(self.problems),
               "steps": [{"text": t, "ok": ok, "score": s} for t, ok, s in zip(self.steps, self.ok, scores)],
               "scores": {k: round(v, 6) for k, v in self.scores.items()}}
        if self.entropies is not None:
            for step, h in zip(out["steps"], self.entropies):
                step["entropy"] = round(h, 6)
        return out


def score_completions(prm: Any, examples: Sequence[Any], completions: Sequence[str], pool: Any, *,
                      prompt_ids: Callable[[Any], Sequence[int]], max_len: int = 2048, batch_size: int = 16,
                      entropies: Sequence[Sequence[float]] | None = None, tau: float = 1.0
                      ) -> list[ScoredTrajectory]:
    """Execute every completion's steps (one pool call), score the steps with the PRM, aggregate.

    Args:
      prm: a loaded `models.prm.Prm`.
      examples, completions: the i-th completion answers the i-th example.
      pool: a `jaxsql.sql.SqlPool`.
      prompt_ids: example -> the PRM's prompt token ids (the policy's prompt, PRM tokenizer).
      max_len: longest PRM row (steps past it get no score).
      batch_size: rows per device call.
      entropies: per completion, the policy's mean token entropy of each step (enables ``entropy``).
      tau: temperature of the entropy weighting.
    """
    from jaxsql.cocte import execute_completions

    trajs = execute_completions(pool, [(ex.db_path, c) for ex, c in zip(examples, completions)])
    step_scores = score_trajectories(prm, examples, trajs, prompt_ids=prompt_ids, max_len=max_len,
                                     batch_size=batch_size)
    result = []
    for i, (t, s) in enumerate(zip(trajs, step_scores)):
        ent = None if entropies is None else list(entropies[i])[:len(s)]
        scores = {name: aggregate(s, name) for name in ("min", "product", "mean", "last")}
        if ent is not None:
            scores["entropy"] = aggregate(s, "entropy", entropies=ent, tau=tau)
        result.append(ScoredTrajectory(t.completion, tuple(st.text for st in t.steps), tuple(r.ok for r in t.results),
                                       tuple(s), t.executable, t.chain.problems, scores,
                                       None if ent is None else tuple(ent)))
    return result


def encode_rows(prm: Any, prompts: Sequence[Sequence[int]], trajectories: Sequence[Any], max_len: int) -> list:
    """The PRM's rows (`rl.prm.PrmRow`) of executed trajectories after their prompt ids: each
    step, its rendered result and the step tag (`jaxsql.cocte.trajectory_segments`)."""
    from jaxsql.cocte import trajectory_segments
    from rl.prm import encode_row

    return [encode_row(prm.tokenizer, p, trajectory_segments(t, tag=prm.config.step_tag,
                                                             max_result_chars=prm.config.max_result_chars),
                       max_len=max_len) for p, t in zip(prompts, trajectories)]


def score_trajectories(prm: Any, examples: Sequence[Any], trajectories: Sequence[Any], *,
                       prompt_ids: Callable[[Any], Sequence[int]], max_len: int = 2048, batch_size: int = 16
                       ) -> list[list[float]]:
    """The PRM's score of every step of executed trajectories (`jaxsql.cocte.Trajectory`).

    Each row is the example's prompt (`prompt_ids`, PRM tokenizer) followed by the steps,
    their rendered results and step tags (`jaxsql.cocte.trajectory_segments`); steps past
    `max_len` tokens get no score (the list is shorter). `batch_size` rows per device call.
    """
    from rl.prm import assemble

    rows = encode_rows(prm, [prompt_ids(ex) for ex in examples], trajectories, max_len)
    pad = prm.tokenizer.pad_token_id if prm.tokenizer.pad_token_id is not None else 0
    step_scores: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if not any(r.positions for r in chunk):
            step_scores += [[] for _ in chunk]
            continue
        batch = assemble(chunk, pad_id=pad)
        out = np.asarray(prm.scores(batch.tokens, batch.mask, batch.positions))
        step_scores += [[float(x) for x in out[i, :len(r.positions)]] for i, r in enumerate(chunk)]
    return step_scores


def policy_step_entropies(params: Any, cfg: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                          completions: Sequence[str], step_spans: Sequence[Sequence[tuple[int, int]]], *,
                          batch_size: int = 16, temperature: float = 1.0) -> list[list[float]]:
    """The policy's mean token entropy over each step of each completion (for ``entropy``).

    Each completion is re-tokenized with character offsets, laid after its
    left-padded prompt, and `rl.policy.logprobs_and_entropy` gives the
    entropy of the distribution each completion token was drawn from (at
    `temperature`); `step_mean_entropies` averages them per step.
    """
    import jax.numpy as jnp

    from rl.policy import logprobs_and_entropy

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[float]] = []
    for start in range(0, len(completions), batch_size):
        encs = [tokenizer(c, add_special_tokens=False, return_offsets_mapping=True)
                for c in completions[start:start + batch_size]]
        ps = [list(p) for p in prompts[start:start + batch_size]]
        P = max(len(p) for p in ps)
        C = max(1, max(len(e["input_ids"]) for e in encs))
        tokens = np.full((len(ps), P + C), pad, np.int32)
        mask = np.zeros((len(ps), P + C), np.int32)
        for i, (p, e) in enumerate(zip(ps, encs)):
            ids = e["input_ids"]
            tokens[i, P - len(p):P] = p
            tokens[i, P:P + len(ids)] = ids
            mask[i, P - len(p):P + len(ids)] = 1
        _, ent = logprobs_and_entropy(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), C,
                                      temperature=temperature, with_entropy=True)
        ent = np.asarray(ent)
        for i, e in enumerate(encs):
            n = len(e["input_ids"])
            spans = step_spans[start + i]
            out.append(step_mean_entropies(ent[i, :n], e["offset_mapping"], spans) if n and spans else
                       [0.0] * len(spans))
    return out
