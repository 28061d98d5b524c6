"""PRM-guided inference over CoCTE completions: best-of-N and step-level beam search.

Both rank candidates by a trajectory score: the PRM's step scores (a `StepScorer`)
aggregated by one of `rl.prm_score.AGGREGATIONS`. A scorer is an interface, not a
model: ``scorer(examples, trajectories) -> step scores per trajectory``, so
`prm_step_scorer` wraps a loaded PRM and tests pass a callable with fixed scores.

**Best-of-N** (`choose_by_prm`): candidates that do not execute (a step fails, or
there is no final SELECT; `jaxsql.cocte.Trajectory.executable`) are dropped, as the
released evaluator's ``--use_ex_filter`` does; the best trajectory score wins; ties
go to the higher mean token log-prob, then to the earlier sample. When every
candidate is dropped, the candidate with the highest mean log-prob is returned (the
rule `rl.evaluate.choose_by_vote` uses when nothing executes).

**Beam search** (`beam_search`): every example starts as one beam (its prompt).
At each depth every unfinished beam is forked `expand` times (candidate j of a beam
at depth d draws from the stream ``fold_in(fold_in(key, d), j)``), each copy decodes
up to the next step boundary (a blank line, `models.sampler.stop_rule`) or EOS,
every candidate prefix is executed (`jaxsql.cocte.execute_completions`: one pool
call for the whole frontier of the batch) and scored, and the best `width` of the
finished beams kept so far plus the new candidates survive, ranked by (executes,
score, mean log-prob, order). A candidate is finished when it ended with EOS, hit
the token budget, or its last step is the final SELECT (`final_step_written`).
The search stops when every kept beam is finished or after `max_steps` depths; the
answer is the best kept beam, finished ones first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from jaxsql.errors import JaxsqlError

#: ``scorer(examples, trajectories) -> one list of step scores (in [0, 1]) per trajectory``.
StepScorer = Callable[[Sequence[Any], Sequence[Any]], list[list[float]]]
#: ``entropies(examples, completions, step_spans) -> per completion, the policy's mean token entropy per step``.
EntropyFn = Callable[[Sequence[Any], Sequence[str], Sequence[Sequence[tuple[int, int]]]], list[list[float]]]


def prm_step_scorer(prm: Any, prompt_ids: Callable[[Any], Sequence[int]], *, max_len: int = 2048,
                    batch_size: int = 16) -> StepScorer:
    """A `StepScorer` of a loaded `models.prm.Prm` (`rl.prm_score.score_trajectories`)."""
    from rl.prm_score import score_trajectories

    def score(examples: Sequence[Any], trajectories: Sequence[Any]) -> list[list[float]]:
        if not trajectories:
            return []
        return score_trajectories(prm, examples, trajectories, prompt_ids=prompt_ids, max_len=max_len,
                                  batch_size=batch_size)

    return score


def trajectory_scores(examples: Sequence[Any], trajectories: Sequence[Any], scorer: StepScorer, how: str, *,
                      entropies: EntropyFn | None = None, tau: float = 1.0) -> tuple[list[list[float]], list[float]]:
    """(step scores, aggregated score) of each trajectory; ``how == "entropy"`` needs `entropies`."""
    from rl.prm_score import aggregate

    if not trajectories:
        return [], []
    steps = scorer(examples, trajectories)
    if len(steps) != len(trajectories):
        raise JaxsqlError(f"PRM scorer returned {len(steps)} score lists for {len(trajectories)} trajectories")
    if how == "entropy":
        if entropies is None:
            raise JaxsqlError("the entropy aggregation needs the policy's step entropies")
        ent = entropies(examples, [t.completion for t in trajectories], [t.step_spans() for t in trajectories])
        return steps, [aggregate(s, how, entropies=list(e)[:len(s)], tau=tau) for s, e in zip(steps, ent)]
    return steps, [aggregate(s, how) for s in steps]


def choose_by_prm(candidates: Sequence[Any]) -> int:
    """Best-of-N: the executable candidate with the best ``score``; ties by mean log-prob,
    then the earlier one; with no executable candidate, the best mean log-prob (see the
    module docstring). Candidates carry ``executable``, ``score`` and ``logprob``."""
    keep = [i for i, c in enumerate(candidates) if c.executable]
    if not keep:
        return max(range(len(candidates)), key=lambda i: (candidates[i].logprob, -i))
    return max(keep, key=lambda i: (candidates[i].score, candidates[i].logprob, -i))


def final_step_written(completion: str) -> bool:
    """Whether the completion's SQL ends with its final step (a SELECT that is not a CTE, or a
    query that is not a chain at all): the beam is complete."""
    from jaxsql.cocte import split_completion

    _, chain = split_completion(completion)
    return chain.has_final


def boundary_rule(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    """The step boundary of CoCTE text (a blank line) plus the EOS ids, as a `StopRule`."""
    from models.sampler import stop_rule

    return stop_rule(tokenizer, ["\n\n"], vocab_size, ids=eos_ids)


@dataclasses.dataclass(frozen=True)
class Beam:
    """A kept or candidate prefix: its continuation tokens, text, score and standing."""

    example: int
    tokens: tuple[int, ...]
    text: str
    logprob: float
    score: float = 0.0
    step_scores: tuple[float, ...] = ()
    executable: bool = False
    finished: bool = False
    row: int = -1  # its row in the current decoding state (unfinished beams)
    order: int = 0

    def rank(self) -> tuple:
        return (self.executable, self.score, self.logprob, -self.order)


@dataclasses.dataclass(frozen=True)
class BeamResult:
    """The chosen beam of one example and, per depth, the texts kept (for inspection and tests)."""

    best: Beam
    kept: tuple[tuple[str, ...], ...]
    candidates: int


def _row_bucket(n: int) -> int:
    """Rows of a frontier decode: a power of two >= 8 (few shapes; divides up to 8 batch devices)."""
    return max(8, 1 << (n - 1).bit_length())


def beam_search(model: Any, tokenizer: Any, examples: Sequence[Any], prompts: Sequence[Sequence[int]], pool: Any,
                scorer: StepScorer, *, key: Any, width: int, expand: int, max_steps: int, max_new_tokens: int,
                eos_ids: Sequence[int], boundary: Any, aggregate: str = "min", tau: float = 1.0,
                temperature: float = 1.0, top_p: float = 1.0, entropies: EntropyFn | None = None,
                is_final: Callable[[str], bool] = final_step_written) -> list[BeamResult]:
    """Step-level PRM beam search for every example at once (see the module docstring).

    Args:
      model: a `models.sampler.SamplerModel` of the policy.
      tokenizer: the policy's tokenizer (candidate texts are decoded with it).
      examples, prompts: the examples and their prompt token ids.
      pool: a `jaxsql.sql.SqlPool`.
      scorer: a `StepScorer`.
      key: the search's random key.
      width, expand, max_steps: beams kept, candidates per beam, depth limit.
      max_new_tokens: token budget of a whole completion.
      eos_ids: tokens that end a completion.
      boundary: the `StopRule` that ends a step (`boundary_rule`; it includes `eos_ids`).
      aggregate, tau, entropies: how step scores become a trajectory score.
      is_final: whether a candidate text has written its final step.
    """
    import jax

    from jaxsql.cocte import execute_completions
    from models.sampler import bucket_length, decode, fork, reseed, resume, start

    if min(width, expand, max_steps, max_new_tokens) < 1:
        raise JaxsqlError("beam search: width, expand, max_steps and max_new_tokens must be >= 1")
    eos = {int(i) for i in eos_ids}
    E = len(examples)
    shards = getattr(model, "shards", 1)
    # filler rows (repeats of the last prompt) so the rows divide over the batch devices; never expanded
    state = start(model, list(prompts) + [prompts[-1]] * (-E % shards), key=key,
                  capacity=bucket_length(max_new_tokens))
    beams: list[list[Beam]] = [[Beam(e, (), "", 0.0, row=e)] for e in range(E)]
    kept_texts: list[list[tuple[str, ...]]] = [[] for _ in range(E)]
    seen = [0] * E
    for depth in range(1, max_steps + 1):
        live = [b for e in range(E) for b in beams[e] if not b.finished]
        if not live:
            break
        n = len(live) * expand
        rows = [b.row for b in live for _ in range(expand)]
        rows += [rows[-1]] * (_row_bucket(n) - n)  # padding rows, decoded and ignored
        sample_ids = [j for _ in live for j in range(expand)] + [0] * (len(rows) - n)
        st = resume(reseed(fork(model, state, rows), jax.random.fold_in(key, depth), sample_ids))
        done_len = min(len(b.tokens) for b in live)
        st = decode(model, st, max_new_tokens - done_len, temperature=temperature, top_p=top_p, stop_ids=tuple(eos),
                    stop=boundary, max_length=max_new_tokens)
        toks, lps, lens = jax.device_get((st.tokens_BM, st.logprobs_BM, st.lengths_B))
        cands: list[Beam] = []
        for i in range(n):
            parent = live[i // expand]
            seen[parent.example] += 1
            ids = [int(t) for t in toks[i, :int(lens[i])]]
            ended = bool(ids) and ids[-1] in eos or len(ids) >= max_new_tokens
            text = tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
            mean_lp = float(np.sum(lps[i, :len(ids)]) / max(len(ids), 1))
            cands.append(Beam(parent.example, tuple(ids), text, mean_lp, finished=ended or is_final(text), row=i,
                              order=seen[parent.example]))
        trajs = execute_completions(pool, [(examples[c.example].db_path, c.text) for c in cands])
        steps, scores = trajectory_scores([examples[c.example] for c in cands], trajs, scorer, aggregate,
                                          entropies=entropies, tau=tau)
        cands = [dataclasses.replace(c, score=s, step_scores=tuple(ss), executable=bool(t.steps) and all(
            r.ok for r in t.results)) for c, t, ss, s in zip(cands, trajs, steps, scores)]
        keep_rows: list[int] = []
        for e in range(E):
            pool_e: dict[str, Beam] = {}
            for b in [b for b in beams[e] if b.finished] + [c for c in cands if c.example == e]:
                pool_e.setdefault(b.text, b)  # one beam per distinct text, the first seen
            ranked = sorted(pool_e.values(), key=Beam.rank, reverse=True)[:width]
            new = []
            for b in ranked:
                if not b.finished and b.row >= 0:  # a new candidate: keep its decoding row
                    new.append(dataclasses.replace(b, row=len(keep_rows)))
                    keep_rows.append(b.row)
                else:
                    new.append(dataclasses.replace(b, row=-1))
            beams[e] = new
            kept_texts[e].append(tuple(b.text for b in ranked))
        if not keep_rows:
            break
        state = fork(model, st, keep_rows + [keep_rows[-1]] * (-len(keep_rows) % shards))
    out = []
    for e in range(E):
        best = max(beams[e], key=lambda b: (b.finished, *b.rank()))
        out.append(BeamResult(best, tuple(kept_texts[e]), seen[e]))
    return out
