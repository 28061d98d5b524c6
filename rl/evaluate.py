"""Evaluate a policy: generate SQL for every example, pick one per example, score it.

`evaluate(params, cfg, tokenizer, examples, pool, ...)` renders each
example's prompt (schema serialised from its database), generates with
`models.sampler.generate` (sharded over the mesh the parameters live on),
picks one prediction per example with a selection strategy (`SELECTORS`:
``greedy``; ``vote``: self-consistency over N samples), and scores it with
`jaxsql.scoring.score_predictions`, the path ``jaxsql eval --predictions``
uses too. The demo and ``jaxsql eval --model`` both call `evaluate`.

The result's summary has every metric of `jaxsql.compare.METRICS` (see
`jaxsql.scoring` for how means are taken), ``error_rate`` and ``qatch``;
rows carry the completion and its score. Gold SQL is used here for
measurement only; a weak-supervision reward never sees it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from data.records import Example
from jaxsql.errors import JaxsqlError
from jaxsql.extract import extract_sql
from jaxsql.scoring import (  # noqa: F401 - re-exported: the demo and its tests import them from here
    EvalResult, Prediction, ResultsLog, ScoringOptions, ScoringRun, breakdown, result_of, score_predictions,
    summarise,
)
from jaxsql.sql.result import ExecResult

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


# ---------------------------------------------------------------------------
# selection strategies
@dataclasses.dataclass(frozen=True)
class Candidate:
    """One sampled completion of an example: its text, SQL, mean token log-prob, if run its result,
    and for the PRM strategies whether every CoCTE step executes and its trajectory score."""

    completion: str
    sql: str
    logprob: float
    result: ExecResult | None = None
    executable: bool | None = None
    score: float | None = None


@dataclasses.dataclass(frozen=True)
class SelectionStrategy:
    """How one prediction is chosen among sampled candidates.

    ``greedy``: argmax decoding, one candidate. ``needs_results``: candidates
    are executed before `choose` is called. ``needs_prm``: every candidate's
    CoCTE steps are executed and scored by a PRM (``executable`` and ``score``
    filled in) before `choose`. ``search``: the strategy generates its own
    candidates step by step (``prm-beam``, `rl.prm_search.beam_search`) and
    `choose` is not used. ``choose(candidates) -> index``.
    """

    name: str
    greedy: bool
    needs_results: bool
    choose: Callable[[Sequence[Candidate]], int]
    description: str
    needs_prm: bool = False
    search: bool = False


def _result_key(r: ExecResult) -> Any:
    from jaxsql.compare import normalize_value

    rows = collections.Counter(tuple(normalize_value(v) for v in row) for row in r.rows)
    return frozenset(rows.items())


def choose_by_vote(candidates: Sequence[Candidate]) -> int:
    """Self-consistency: the result most executed candidates agree on; ties by the best mean log-prob.

    Results agree when their bags of rows are equal after value normalisation
    (``ex_bag``). Returns that group's candidate with the highest mean
    log-prob; when nothing executes, the candidate with the highest mean log-prob.
    """
    groups: dict[Any, list[int]] = collections.defaultdict(list)
    for i, c in enumerate(candidates):
        if c.result is not None and c.result.ok:
            groups[_result_key(c.result)].append(i)
    if not groups:
        return max(range(len(candidates)), key=lambda i: (candidates[i].logprob, -i))
    best = max(groups.values(), key=lambda g: (len(g), max(candidates[i].logprob for i in g), -min(g)))
    return max(best, key=lambda i: (candidates[i].logprob, -i))


def _choose_by_prm(candidates: Sequence[Candidate]) -> int:
    from rl.prm_search import choose_by_prm

    return choose_by_prm(candidates)


@dataclasses.dataclass(frozen=True)
class PrmGuide:
    """What the PRM strategies need: a step scorer and how its scores are aggregated.

    Attributes:
      scorer: a `rl.prm_search.StepScorer` (`prm_step_scorer` of a loaded PRM, or a stub).
      aggregate: a `rl.prm_score.AGGREGATIONS` name.
      tau: temperature of the ``entropy`` aggregation.
      beam_width, beam_expand, beam_max_steps: the ``prm-beam`` settings.
    """

    scorer: Callable[[Sequence[Any], Sequence[Any]], list[list[float]]]
    aggregate: str = "min"
    tau: float = 1.0
    beam_width: int = 2
    beam_expand: int = 4
    beam_max_steps: int = 8

    def __post_init__(self) -> None:
        from jaxsql.config import require
        from rl.prm_score import AGGREGATIONS

        require(self.aggregate in AGGREGATIONS, "PrmGuide", "aggregate",
                f"must be one of {sorted(AGGREGATIONS)}, got {self.aggregate!r}")
        require(self.tau > 0, "PrmGuide", "tau", f"must be > 0, got {self.tau}")
        for f in ("beam_width", "beam_expand", "beam_max_steps"):
            require(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, "PrmGuide", f,
                    f"must be an integer >= 1, got {getattr(self, f)!r}")


SELECTORS: dict[str, SelectionStrategy] = {
    "greedy": SelectionStrategy("greedy", greedy=True, needs_results=False, choose=lambda cands: 0,
                                description="argmax decoding"),
    "vote": SelectionStrategy("vote", greedy=False, needs_results=True, choose=choose_by_vote,
                              description="self-consistency: sample N, execute, majority result, ties by "
                                          "mean log-prob"),
    "prm-best-of-n": SelectionStrategy("prm-best-of-n", greedy=False, needs_results=False, choose=_choose_by_prm,
                                       description="sample N CoCTE completions, drop those that do not execute, "
                                                   "keep the best PRM trajectory score", needs_prm=True),
    "prm-beam": SelectionStrategy("prm-beam", greedy=False, needs_results=False, choose=lambda cands: 0,
                                  description="step-level beam search: expand k next steps per beam, execute, "
                                              "keep the best b by PRM score", needs_prm=True, search=True),
}


def get_selector(name: str) -> SelectionStrategy:
    """The registered `SelectionStrategy` called `name` (one clear error otherwise)."""
    try:
        return SELECTORS[name]
    except KeyError:
        raise JaxsqlError(f"unknown selection strategy {name!r}; expected one of {sorted(SELECTORS)}") from None


# ---------------------------------------------------------------------------
# the model side
def evaluate(params: Any, cfg: Any, tokenizer: Any, examples: Sequence[Example], pool: Any, *,
             prompt_format: str = "plain", schema: SchemaFn | None = None, max_new_tokens: int = 64,
             batch_size: int = 64, max_prompt_len: int | None = None,
             buckets: Sequence[int] | None = None, select: str = "greedy", num_samples: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             scoring: ScoringOptions = ScoringOptions(), log: ResultsLog | None = None,
             progress: bool = False, prm: PrmGuide | None = None, multi_turn: bool = False,
             tools: Any = None) -> EvalResult:
    """Generate a prediction for every example, score it, and summarise.

    Args:
      params, cfg: the policy (`models.model` pytree and its `ModelConfig`); on
        a mesh with data-parallel axes `generate` splits the prompts over it.
      tokenizer: a `transformers` tokenizer (its chat template is used if it has one).
      examples: the split; gold SQL and/or gold answers.
      pool: a `jaxsql.sql.SqlPool`.
      prompt_format: ``plain``, ``think`` or ``cocte`` (SQL extracted by `extract_sql`).
      schema: ``db_path -> schema text``; default compact schemas without samples.
      max_new_tokens: completion cap.
      batch_size: prompts per `generate` call; examples are chunked in input
        order and the last chunk is padded, so every call has one shape and a
        resumed run sees the same chunks (and samples) as an uninterrupted one.
      select: a `SELECTORS` name; `num_samples`, `temperature`, `top_p`, `seed`
        are its sampling settings (``greedy`` takes one argmax sample).
      scoring: `ScoringOptions`.
      log: a `ResultsLog`: examples already in it are not generated again, new
        rows are appended as each chunk finishes.
      progress: show a progress bar (stderr).
      prm: the `PrmGuide` of ``prm-best-of-n`` / ``prm-beam`` (which need ``cocte`` prompts).
      multi_turn: generate with `rl.multiturn.multi_turn_rollout` (the ``tool`` prompt
        format): the model may run SQL while it answers; the final answer's SQL is the
        prediction (none: an empty prediction). Rows get ``turns``, ``tool_errors``,
        ``tool_end`` and ``calls``; the summary gets `jaxsql.tools.episode_metrics` of the
        chosen episodes (`tool_summary`) and this call's loop counters summed over its
        batches: ``tool/decode_s``, ``tool/tool_s``, ``tool/extend_s``, ``tool/total_s``,
        ``tool/rounds``, ``tool/decode_steps``, ``tool/false_stops``, ``tool/model_tokens``,
        ``tool/observation_tokens`` (every sampled episode, padding rows included).
      tools: the `jaxsql.tools.ToolConfig` of `multi_turn` (tags, budgets; default ``ToolConfig()``).
    """
    import jax

    from models.sampler import DEFAULT_BUCKETS, generate
    from rl.rollout import decode_completions

    strategy = get_selector(select)
    if (strategy.greedy or strategy.search) and num_samples != 1:
        raise JaxsqlError(f"selection {select!r} takes num_samples=1; got num_samples={num_samples}")
    if strategy.needs_prm:
        if prm is None:
            raise JaxsqlError(f"selection {select!r} needs a process reward model (--prm DIR)")
        if prompt_format != "cocte":
            raise JaxsqlError(f"selection {select!r} scores CoCTE steps: the policy must answer in the cocte "
                              f"prompt format, got {prompt_format!r}")
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise JaxsqlError("evaluate: num_samples, batch_size and max_new_tokens must be >= 1")
    if multi_turn and (prompt_format != "tool" or strategy.needs_prm):
        raise JaxsqlError(f"multi-turn evaluation needs the tool prompt format and a greedy or vote selection; got "
                          f"prompt format {prompt_format!r} and selection {select!r}")
    if prompt_format == "tool" and not multi_turn:
        raise JaxsqlError("the tool prompt format runs the model's SQL calls: evaluate it with multi_turn=True "
                          "(jaxsql eval --multi-turn)")
    schema = schema or schema_cache()
    stop = {int(s) for s in cfg.eos_token_ids}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stop.add(int(tokenizer.eos_token_id))
    stop_ids = tuple(sorted(stop))
    chunks = [list(range(s, min(s + batch_size, len(examples)))) for s in range(0, len(examples), batch_size)]
    prompt_cache: dict[int, list[int]] = {}

    def prompt_of(ex: Example) -> list[int]:
        if id(ex) not in prompt_cache:
            prompt_cache[id(ex)] = encode_prompts([ex], tokenizer, schema, prompt_format, max_prompt_len)[0]
        return prompt_cache[id(ex)]

    entropies = None
    if prm is not None and prm.aggregate == "entropy":
        from rl.prm_score import policy_step_entropies

        def entropies(exs, completions, spans):
            return policy_step_entropies(params, cfg, tokenizer, [prompt_of(e) for e in exs], completions, spans,
                                         temperature=temperature)
    searcher = None
    if strategy.search:
        from models.sampler import sampler_model
        from rl.prm_search import boundary_rule

        searcher = (sampler_model(params, cfg), boundary_rule(tokenizer, cfg.vocab_size, stop_ids))
    looper = None
    if multi_turn:
        from jaxsql.tools import ToolConfig, ToolRunner
        from models.sampler import sampler_model

        looper = (sampler_model(params, cfg), ToolRunner(pool, tools or ToolConfig()), collections.Counter())
    with ScoringRun(examples, log, progress) as run:
        for k, idx in enumerate(chunks):
            keep = [j for j, i in enumerate(idx) if not run.is_done(examples[i])]
            if not keep:
                continue
            chunk = [examples[i] for i in idx]
            prompts = [prompt_of(ex) for ex in chunk]
            key = jax.random.fold_in(jax.random.PRNGKey(seed), k)
            if searcher is not None:
                preds = _beam_predictions(searcher, tokenizer, chunk, prompts, pool, prm, key, max_new_tokens,
                                          stop_ids, temperature, top_p, entropies)
                run.add(score_predictions(pool, [chunk[j] for j in keep], [preds[j] for j in keep], scoring))
                continue
            if looper is not None:
                preds = _multi_turn_predictions(looper, tokenizer, strategy, pool, chunk, prompts, key, batch_size,
                                                num_samples, temperature, top_p, max_new_tokens, stop_ids)
                run.add(score_predictions(pool, [chunk[j] for j in keep], [preds[j] for j in keep], scoring))
                continue
            padded = prompts + [prompts[-1]] * (batch_size - len(prompts))
            out = generate(params, cfg, padded, key=key, max_new_tokens=max_new_tokens, num_samples=num_samples,
                           greedy=strategy.greedy, temperature=temperature, top_p=top_p, stop_ids=stop_ids,
                           buckets=buckets or DEFAULT_BUCKETS)
            tokens, logprobs, lengths = jax.device_get((out.tokens, out.logprobs, out.lengths))
            texts = decode_completions(tokenizer, tokens, lengths, stop_ids)
            mean_lp = [float(np.sum(logprobs[r, : max(int(lengths[r]), 1)]) / max(int(lengths[r]), 1))
                       for r in range(len(texts))]
            preds = _select(strategy, pool, chunk, texts, mean_lp, num_samples, prm, entropies)
            run.add(score_predictions(pool, [chunk[j] for j in keep], [preds[j] for j in keep], scoring))
        result = run.result()
    if looper is not None:
        timing = {f"tool/{k}": round(v, 3) for k, v in looper[2].items()}
        result = dataclasses.replace(result, summary={**result.summary, **tool_summary(result.rows), **timing})
    return result


def tool_summary(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`jaxsql.tools.episode_metrics` of the multi-turn rows of an evaluation (their ``calls``
    and ``tool_end`` fields), so a resumed run summarises every row, not only the new ones."""
    from jaxsql.tools import Episode, ToolCall, episode_metrics

    eps = [Episode("", calls=[ToolCall(c["sql"], c["error"], "") for c in r["calls"]], end=r.get("tool_end"))
           for r in rows if "calls" in r]
    if not eps:
        return {}
    out = episode_metrics(eps)
    return {k: v for k, v in out.items() if not k.startswith("tool/end/") or v}


def _multi_turn_predictions(looper: tuple[Any, Any, Any], tokenizer: Any, strategy: SelectionStrategy, pool: Any,
                            chunk: Sequence[Example], prompts: Sequence[Sequence[int]], key: Any, batch_size: int,
                            n: int, temperature: float, top_p: float, max_new_tokens: int,
                            stop_ids: Sequence[int]) -> list[Prediction]:
    """One `Prediction` per example of the chunk from `n` multi-turn episodes each
    (`rl.multiturn.multi_turn_rollout`; the chunk is padded to `batch_size` prompts, rounded
    up to the batch devices, so every call has one shape)."""
    from rl.multiturn import multi_turn_rollout

    model, runner, timing = looper
    rows = -(-batch_size // model.shards) * model.shards
    padded = list(prompts) + [prompts[-1]] * (rows - len(prompts))
    dbs = [ex.db_path for ex in chunk] + [chunk[-1].db_path] * (rows - len(chunk))
    out = multi_turn_rollout(model, padded, dbs, runner, tokenizer, key=key, num_samples=n,
                             greedy=strategy.greedy, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    for name in ("decode_s", "tool_s", "extend_s", "total_s", "rounds", "decode_steps", "false_stops",
                 "model_tokens", "observation_tokens"):
        timing[name] += out.stats[name]
    sampled = out.sampled_mask.sum(1)
    mean_lp = out.logprobs.sum(1) / np.maximum(sampled, 1)
    m = len(chunk) * n
    texts = [e.text for e in out.episodes[:m]]
    sqls = [e.answer if e.end == "answer" else "" for e in out.episodes[:m]]
    preds = _select(strategy, pool, chunk, texts, [float(x) for x in mean_lp[:m]], n, sqls=sqls)
    res = []
    for e, p in enumerate(preds):
        ep = out.episodes[e * n + int(p.extra.get("selected", 0))]
        extra = {**p.extra, "turns": ep.turns, "tool_errors": sum(1 for c in ep.calls if c.error is not None),
                 "tool_end": ep.end, "calls": [{"sql": c.sql, "error": c.error} for c in ep.calls]}
        res.append(dataclasses.replace(p, extra=extra))
    return res


def _beam_predictions(searcher: tuple[Any, Any], tokenizer: Any, chunk: Sequence[Example],
                      prompts: Sequence[Sequence[int]], pool: Any, prm: PrmGuide, key: Any, max_new_tokens: int,
                      stop_ids: Sequence[int], temperature: float, top_p: float, entropies: Any) -> list[Prediction]:
    """``prm-beam``: one `Prediction` per example of the chunk (`rl.prm_search.beam_search`)."""
    from rl.prm_search import beam_search

    model, boundary = searcher
    found = beam_search(model, tokenizer, chunk, prompts, pool, prm.scorer, key=key, width=prm.beam_width,
                        expand=prm.beam_expand, max_steps=prm.beam_max_steps, max_new_tokens=max_new_tokens,
                        eos_ids=stop_ids, boundary=boundary, aggregate=prm.aggregate, tau=prm.tau,
                        temperature=temperature, top_p=top_p, entropies=entropies)
    return [Prediction(sql=extract_sql(r.best.text), completion=r.best.text,
                       extra={"prm_score": round(r.best.score, 6), "steps": len(r.best.step_scores),
                              "finished": r.best.finished, "executable": r.best.executable,
                              "candidates": r.candidates, "depth": len(r.kept)})
            for r in found]


def _select(strategy: SelectionStrategy, pool: Any, chunk: Sequence[Example], texts: Sequence[str],
            mean_lp: Sequence[float], n: int, prm: PrmGuide | None = None, entropies: Any = None,
            sqls: Sequence[str] | None = None) -> list[Prediction]:
    """One `Prediction` per example of the chunk from its `n` sampled completions (their SQL:
    `sqls`, default `extract_sql` of each text)."""
    sqls = sqls if sqls is not None else [extract_sql(t) for t in texts]
    cands = [[Candidate(texts[e * n + g], sqls[e * n + g], mean_lp[e * n + g]) for g in range(n)]
             for e in range(len(chunk))]
    if strategy.needs_results:
        jobs = [(ex.db_path, c.sql) for ex, cs in zip(chunk, cands) for c in cs]
        results = iter(pool.execute_batch(jobs))
        cands = [[dataclasses.replace(c, result=next(results)) for c in cs] for cs in cands]
    if strategy.needs_prm:
        cands = _prm_scored(pool, chunk, cands, prm, entropies)
    out = []
    for cs in cands:
        i = strategy.choose(cs)
        extra: dict[str, Any] = {}
        if n > 1:
            keys = [_result_key(c.result) if c.result is not None and c.result.ok else None for c in cs]
            extra = {"selected": i, "samples": n}
            if strategy.needs_results:
                extra["votes"] = sum(1 for k in keys if k is not None and k == keys[i])
        if strategy.needs_prm:
            extra.update(executable=sum(1 for c in cs if c.executable),
                         prm_score=None if cs[i].score is None else round(cs[i].score, 6))
        out.append(Prediction(sql=cs[i].sql, completion=cs[i].completion, extra=extra))
    return out


def _prm_scored(pool: Any, chunk: Sequence[Example], cands: list[list[Candidate]], prm: PrmGuide,
                entropies: Any) -> list[list[Candidate]]:
    """Candidates with ``executable`` (every CoCTE step runs: one pool call for the chunk) and,
    for the executable ones, their PRM trajectory ``score`` (the others are not scored)."""
    from jaxsql.cocte import execute_completions
    from rl.prm_search import trajectory_scores

    flat = [(e, g) for e, cs in enumerate(cands) for g in range(len(cs))]
    trajs = execute_completions(pool, [(chunk[e].db_path, cands[e][g].completion) for e, g in flat])
    ok = [i for i, t in enumerate(trajs) if t.executable]
    _, scores = trajectory_scores([chunk[flat[i][0]] for i in ok], [trajs[i] for i in ok], prm.scorer,
                                  prm.aggregate, entropies=entropies, tau=prm.tau)
    score_of = dict(zip(ok, scores))
    out = [list(cs) for cs in cands]
    for i, (e, g) in enumerate(flat):
        out[e][g] = dataclasses.replace(out[e][g], executable=i in score_of, score=score_of.get(i))
    return out
