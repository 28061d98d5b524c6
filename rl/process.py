"""Process rewards in GRPO: the PRM's step scores as rewards, in two forms.

Reward-SQL (Zhang et al. 2025) trains the CoCTE policy with GRPO whose
reward adds the process reward model's (PRM, `models.prm`) step scores to
the outcome reward. The run config names it ``weights.process: lambda`` with a
``reward.process`` section (`jaxsql.rewards.ProcessConfig`). Per rollout:

1. host (the rewards thread, with the outcome rewards): every completion is
   split into steps and each step's prefix query runs on the SQL pool
   (`jaxsql.cocte.execute_completions`); the PRM rows (prompt, steps with
   their rendered results, step tags) are tokenized (`rl.prm_score.encode_rows`);
2. device: the PRM's step scores (`PrmScorer.dispatch`: `models.prm.grouped_step_scores`
   jitted, each prompt once per group of G; its parameters and rows on the trainer's
   mesh and rules) are
   dispatched asynchronously; meanwhile the host maps each step to the
   policy's completion tokens (`step_token_ends`);
3. host: the scores come back and become rewards:

   - form ``trajectory``: ``r_i = R_i + lambda * agg(s_i1..s_iK)`` (`trajectory_rewards`),
     a scalar through the configured advantage;
   - form ``step``: per-token rewards ``r_it = R_i + lambda * s_i,k(t)`` (`token_rewards`,
     each step's score on the tokens from the previous step's end through its own end, the
     last step through the completion's end, as the released reward manager back-fills) and
     a per-token advantage from `STEP_ADVANTAGES`.

``R_i`` is the outcome reward (the weighted host rewards), ``s_ik`` the PRM's
score of step k of completion i, ``k(t)`` the step that token t belongs to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxsql.errors import JaxsqlError
from rl.prm_score import aggregate

#: ``fn(outcome_N, outcome_adv_N, token_rewards_NC, steps, group_size, lam, eps) -> adv_NC``.
STEP_ADVANTAGES: dict[str, Callable[..., np.ndarray]] = {}


def register_step_advantage(name: str):
    """Register a per-token advantage of the ``step`` form under `name`."""

    def deco(fn):
        STEP_ADVANTAGES[name] = fn
        return fn

    return deco


@dataclasses.dataclass(frozen=True)
class StepScores:
    """Per completion (global row order): the PRM's scores of its steps and where they end.

    Attributes:
      scores: the scores of the steps the PRM read (a row cut at ``max_len`` loses its last
        steps: ``len(scores[i]) <= n_steps[i]``).
      n_steps: steps of each completion.
      ends: for each step, the index of the completion token holding its last character.
      lengths: tokens of each completion (the rollout's lengths, stop token included).
    """

    scores: tuple[tuple[float, ...], ...]
    n_steps: tuple[int, ...]
    ends: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: Sequence[int]) -> "StepScores":
        """The rows `index`, in that order."""
        return StepScores(*(tuple(getattr(self, f.name)[i] for i in index) for f in dataclasses.fields(self)))

    @staticmethod
    def concat(parts: Sequence["StepScores"]) -> "StepScores":
        return StepScores(*(tuple(x for p in parts for x in getattr(p, f.name)) for f in dataclasses.fields(StepScores)))

    def trajectory(self, how: str) -> np.ndarray:
        """[N] the aggregated score of each completion's scored steps (0 with none)."""
        return np.asarray([aggregate(list(s), how) for s in self.scores], np.float32)

    def step_of_token(self, i: int, width: int) -> np.ndarray:
        """[width] int: the step each token of completion i belongs to, -1 past its length or
        where it has no steps. Step k holds the tokens after step k-1's end through its own
        end; the first step also holds the tokens before it, the last one those after it."""
        out = np.full(width, -1, np.int64)
        n = min(int(self.lengths[i]), width)
        ends = self.ends[i]
        if not ends or n == 0:
            return out
        t = np.arange(n)
        k = np.searchsorted(np.asarray(ends, np.int64), t, side="left")  # first step ending at or after t
        out[:n] = np.minimum(k, len(ends) - 1)
        return out

    def score_table(self, i: int) -> np.ndarray:
        """[n_steps] float: each step's score, 0 for a step the PRM did not read (the released
        code's value without a step tag)."""
        s = np.zeros(self.n_steps[i], np.float32)
        s[:len(self.scores[i])] = self.scores[i]
        return s


# --- rewards -------------------------------------------------------------------------------


def trajectory_rewards(outcome_N: np.ndarray, steps: StepScores, lam: float, how: str) -> np.ndarray:
    """Form ``trajectory``: ``R_i + lambda * agg(s_i)`` (float32 [N])."""
    return (np.asarray(outcome_N, np.float32) + np.float32(lam) * steps.trajectory(how)).astype(np.float32)


def token_rewards(outcome_N: np.ndarray, steps: StepScores, lam: float, width: int) -> np.ndarray:
    """Form ``step``: ``r_it = R_i + lambda * s_i,k(t)`` on each completion token, ``R_i`` on the
    tokens of a completion without steps, 0 past its length (float32 [N, width])."""
    out = np.zeros((len(steps), width), np.float32)
    for i in range(len(steps)):
        n = min(int(steps.lengths[i]), width)
        k = steps.step_of_token(i, width)[:n]
        row = np.full(n, np.float32(outcome_N[i]), np.float32)
        if steps.n_steps[i] and n:
            row = row + np.float32(lam) * steps.score_table(i)[k]
        out[i, :n] = row
    return out


@register_step_advantage("grpo_step")
def grpo_step_advantages(outcome_N: np.ndarray, outcome_adv_N: np.ndarray, token_rewards_NC: np.ndarray,
                         steps: StepScores, group_size: int, lam: float, eps: float = 1e-6) -> np.ndarray:
    """Outcome advantage plus process supervision (DeepSeekMath, Shao et al. 2024, sec. 4.1.3).

    Each step score is normalised over all scored steps of its group,
    ``s~_ik = (s_ik - mean_g(s)) / (std_g(s) + eps)`` (population std); token t
    of completion i gets ``A_i + lambda * sum_{j >= k(t)} s~_ij``: the outcome
    advantage ``A_i`` (the configured estimator) broadcast, plus the sum of the
    normalised scores of the step it is in and the later ones (DeepSeekMath's
    ``A_it = sum_{index(j) >= t} r~_j``). 0 past the completion's length.
    """
    del outcome_N
    N, width = np.shape(token_rewards_NC)
    out = np.zeros((N, width), np.float32)
    for g in range(0, N, group_size):
        rows = range(g, g + group_size)
        pool = np.concatenate([np.asarray(steps.scores[i], np.float64) for i in rows] + [np.zeros(0)])
        mean = pool.mean() if len(pool) else 0.0
        std = pool.std() if len(pool) else 0.0
        for i in rows:
            n = min(int(steps.lengths[i]), width)
            out[i, :n] = outcome_adv_N[i]
            if not steps.n_steps[i] or not n:
                continue
            norm = np.zeros(steps.n_steps[i], np.float64)
            m = len(steps.scores[i])
            norm[:m] = (np.asarray(steps.scores[i], np.float64) - mean) / (std + eps)
            to_go = np.cumsum(norm[::-1])[::-1]  # sum over this step and the later ones
            out[i, :n] += np.float32(lam) * to_go[steps.step_of_token(i, n)].astype(np.float32)
    return out


@register_step_advantage("rewardsql")
def rewardsql_advantages(outcome_N: np.ndarray, outcome_adv_N: np.ndarray, token_rewards_NC: np.ndarray,
                         steps: StepScores, group_size: int, lam: float, eps: float = 1e-6) -> np.ndarray:
    """The released process advantage, ``compute_grpo_process_advantage_avg_unique``
    (ruc-datalab/RewardSQL 5717414, ``verl/verl/trainer/ppo/core_algos.py``; the released
    trainer calls it for ``adv_estimator: grpo`` and ships it with ``rm_coef: 0``, i.e. with
    outcome rewards only).

    On the per-token rewards ``r_it`` (`token_rewards`: outcome on every token plus
    lambda times the step's score): ``v_i`` = the mean of the *distinct* non-zero
    values of ``r_i``; ``A_i = (v_i - mean_g(v)) / (std_g(v) + eps)`` with the
    unbiased std (``torch.std``); a group of one gets 0. Each token with
    ``r_it != 0`` gets ``(r_it - 1) A_i`` if ``A_i > 0`` and ``r_it > 1``,
    ``r_it A_i`` if ``A_i > 0`` otherwise, and ``(1 - r_it) A_i`` if ``A_i <= 0``;
    a token whose reward is 0 gets 0. (The released rule assumes an outcome of 0
    or 1 and step scores in [0, 1].)
    """
    del outcome_N, outcome_adv_N, steps, lam
    r = np.asarray(token_rewards_NC, np.float32)
    N = r.shape[0]
    out = np.zeros_like(r)
    v = np.zeros(N, np.float64)
    for i in range(N):
        nz = r[i][r[i] != 0]
        v[i] = float(np.unique(nz).mean()) if len(nz) else 0.0
    for g in range(0, N, group_size):
        rows = np.arange(g, min(g + group_size, N))
        if len(rows) <= 1:
            continue
        vals = v[rows].astype(np.float32).astype(np.float64)
        adv = (vals - vals.mean()) / (vals.std(ddof=1) + eps)
        for i, a in zip(rows, adv):
            ri = r[i].astype(np.float64)
            nz = ri != 0
            if a > 0:
                step = np.where(ri > 1.0, (ri - 1.0) * a, ri * a)
            else:
                step = (1.0 - ri) * a
            out[i] = np.where(nz, step, 0.0).astype(np.float32)
    return out


def step_advantages(name: str, outcome_N: np.ndarray, outcome_adv_N: np.ndarray, steps: StepScores,
                    group_size: int, lam: float, width: int, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(token rewards [N, width], per-token advantages [N, width]) of the ``step`` form."""
    if name not in STEP_ADVANTAGES:
        raise JaxsqlError(f"unknown step advantage {name!r}; known: {sorted(STEP_ADVANTAGES)}")
    rewards = token_rewards(outcome_N, steps, lam, width)
    adv = STEP_ADVANTAGES[name](np.asarray(outcome_N, np.float32), np.asarray(outcome_adv_N, np.float32), rewards,
                                steps, group_size, lam, eps)
    return rewards, np.asarray(adv, np.float32)


# --- steps on the policy's tokens ------------------------------------------------------------


def token_end_offsets(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """For each of `ids`, how many characters of `text` (their decoding) are written once it
    is: ``len(decode(ids[:i+1]))``. Tokens that decode on their own to pieces that join into
    `text` (byte-level BPE on ASCII SQL) take one batched decode; otherwise every prefix is
    decoded (made monotone)."""
    ids = [int(t) for t in ids]
    if not ids:
        return []
    pieces = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=True)
    if "".join(pieces) == text:
        return np.cumsum([len(p) for p in pieces]).tolist()
    prefixes = tokenizer.batch_decode([ids[:i + 1] for i in range(len(ids))], skip_special_tokens=True)
    return np.maximum.accumulate([len(p) for p in prefixes]).tolist()


def step_token_ends(offsets: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each step's character span, the index of the token that writes its last character
    (the first token whose end offset reaches the span's end)."""
    if not spans:
        return []
    off = np.asarray(offsets, np.int64)
    if len(off) == 0:
        return [0] * len(spans)
    ends = np.searchsorted(off, np.asarray([e for _, e in spans], np.int64), side="left")
    return np.minimum(ends, len(off) - 1).tolist()


def completion_step_ends(tokenizer: Any, tokens_NC: np.ndarray, lengths_N: np.ndarray, stop_ids: Sequence[int],
                         texts: Sequence[str], step_spans: Sequence[Sequence[tuple[int, int]]]) -> list[list[int]]:
    """`step_token_ends` of every completion: its generated tokens (the stop tokens at the end
    left out, as `rl.rollout.decode_completions` decodes them) against its steps' spans."""
    stop = {int(s) for s in stop_ids}
    out = []
    for row, n, text, spans in zip(np.asarray(tokens_NC), np.asarray(lengths_N), texts, step_spans):
        ids = [int(t) for t in row[: int(n)]]
        while ids and ids[-1] in stop:
            ids.pop()
        out.append(step_token_ends(token_end_offsets(tokenizer, ids, text), spans) if spans else [])
    return out


# --- the PRM on the trainer's mesh -------------------------------------------------------------


def load_process_prm(prm_dir: str, policy_tokenizer: Any, policy_dir: str, *, mesh=None, rules=None,
                     param_dtype: str | None = None, compute_dtype: str | None = None):
    """The PRM of ``reward.process.prm`` on the trainer's mesh; one-line JaxsqlError when the
    directory is missing or its tokenizer is not the policy's."""
    from models.prm import check_matches_policy, load_prm

    from jaxsql.paths import as_path

    if not as_path(prm_dir).is_dir():  # local or gs:// (load_prm stages a bucket directory)
        raise JaxsqlError(f"reward.process.prm: PRM directory {prm_dir} does not exist "
                          f"(make one with jaxsql prm init or jaxsql prm train)")
    prm = load_prm(prm_dir, mesh=mesh, rules=rules, param_dtype=param_dtype, compute_dtype=compute_dtype)
    check_matches_policy(prm, policy_tokenizer, policy_dir)
    return prm


class PrmScorer:
    """Dispatches the PRM's step scores of this process's rows on the mesh, without waiting.

    The rows of every process form one global batch (rows over the batch mesh axes,
    as the trainer places its batches); T and K are agreed over processes so every
    process compiles the same program.
    """

    def __init__(self, prm: Any, mesh, rules):
        self.prm = prm
        self.mesh = mesh
        self.rules = rules
        pad = prm.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def dispatch(self, rows: Sequence[Any], prompts: Sequence[Sequence[int]] | None = None,
                 group: int = 1) -> jax.Array:
        """[rows of all processes, K] scores (a device array still being computed).

        With `prompts` (each row's prompt ids) and `group` G > 1, rows that come in
        consecutive groups of G sharing a prompt (a GRPO draw's) run each prompt once
        (`models.prm.grouped_step_scores`): the prompt's share of the PRM's work is paid
        once per group instead of G times (1.45x on the study's rows,
        `benchmarks/prm_scoring.py`). Otherwise, or when any process's rows are not so
        grouped, every row runs whole (`models.prm.step_scores`).
        """
        from jaxsql import distributed
        from models.prm import score_steps, score_steps_grouped
        from rl.prm import PrmRow, assemble, assemble_grouped, rows_share_prompts
        from rl.train_step import batch_sharding

        def agreed(*values: int) -> tuple[int, ...]:  # the largest over processes
            if distributed.process_count() > 1:
                values = tuple(int(x) for x in distributed.process_values(np.asarray(values, np.int64)).max(axis=0))
            return tuple(values)

        def put(x):
            n = x.shape[0] * distributed.process_count()
            return distributed.rows_to_global(x, batch_sharding(self.mesh, self.rules, (n,) + x.shape[1:]))

        from models.attention import on_mesh_of

        p = self.prm
        grouped = group > 1 and prompts is not None and rows_share_prompts(rows, prompts, group)
        if agreed(0 if grouped else 1)[0] == 0:  # every process's rows are grouped
            plen = [len(q) for q in prompts]
            P, R, K = agreed(max(plen), max(len(r.tokens) - n for r, n in zip(rows, plen)),
                             max((len(r.positions) for r in rows), default=1))
            arrays = assemble_grouped(rows, prompts, group, pad_id=self.pad_id, prompt_len=P, rest_len=R, steps=K)
            with on_mesh_of(p.params):
                return score_steps_grouped(p.params, p.model_config, p.config.head, p.candidates,
                                           *(put(x) for x in arrays))
        T = max((len(r.tokens) for r in rows), default=1)
        K = max((len(r.positions) for r in rows), default=1)
        T, K = agreed(T, K)
        # a first row of length T with K dummy positions pins both padded sizes
        pin = PrmRow(tuple([self.pad_id] * T), tuple(range(K)))
        b = assemble([pin, *rows], pad_id=self.pad_id)
        tokens, mask, positions = (np.asarray(x)[1:] for x in (b.tokens, b.mask, b.positions))
        tokens, mask, positions = put(tokens), put(mask), put(positions)
        with on_mesh_of(p.params):  # the trainer's mesh: `auto` places splash per chip, as in the update
            return score_steps(p.params, p.model_config, p.config.head, p.candidates, tokens, mask, positions)
