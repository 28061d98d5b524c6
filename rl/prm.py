"""Process reward model training pieces: the typed batch, its host assembly, the BCE loss, label files.

The PRM (`models.prm`) is trained as in Math-Shepherd (Wang et al. 2024)
and Reward-SQL (Zhang et al. 2025): binary cross-entropy between the PRM's
score at each step-end position (the last token of the step tag) and the
step's label from `rl.prm_label`. For the ``lm`` head the logit is
``l_good - l_bad`` (so the loss is the two-candidate cross-entropy the
released code trains with); for the ``value`` head it is ``h . w + b``.

A batch is one `PrmBatch`: each row is ``[prompt | step 1 <result>..</result>
TAG | step 2 ... TAG]`` right-padded, with the positions of the tags, the
labels and a weight per step. `prm_loss` returns ``(loss_sum, denominator,
metric_sums)`` like `rl.algo`'s losses, so the step mean stays global when a
batch is split into micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.records import Example, MalformedRecord
from jaxsql.cocte import prm_segments
from jaxsql.errors import JaxsqlError

Array = jax.Array


class PrmBatch(NamedTuple):
    """A PRM batch (a pytree; numpy on the host, jax arrays on the device).

    Attributes:
      tokens: [B, T] int32, right-padded rows ``prompt + trajectory``.
      mask: [B, T] int32, 1 for real tokens.
      positions: [B, K] int32, the step-tag positions (its last token), -1 past the row's steps.
      labels: [B, K] float32 in [0, 1] (hard 0/1 or soft fractions).
      weights: [B, K] float32, 1 for a labelled step, 0 for padding (other weights scale a step's loss).
    """

    tokens: Any
    mask: Any
    positions: Any
    labels: Any
    weights: Any


# --- the loss ---------------------------------------------------------------------------


def step_bce(logits_BK: Array, labels_BK: Array, weights_BK: Array) -> tuple[Array, Array, dict[str, Array]]:
    """Binary cross-entropy of step logits against step labels, summed with weights.

    ``l = -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)) = softplus(z) - y z``
    (the stable form). Returns ``(sum_k w_k l_k, sum_k w_k, metric_sums)``;
    metric sums (over weighted steps): ``steps``, ``agree`` (score and label
    on the same side of 0.5), ``score`` (sum of sigmoid(z)), ``label``.
    """
    z = logits_BK.astype(jnp.float32)
    y = labels_BK.astype(jnp.float32)
    w = weights_BK.astype(jnp.float32)
    loss = jax.nn.softplus(z) - y * z
    score = jax.nn.sigmoid(z)
    agree = ((score > 0.5) == (y > 0.5)).astype(jnp.float32)
    metrics = {"steps": w.sum(), "agree": (agree * w).sum(), "score": (score * w).sum(), "label": (y * w).sum()}
    return (loss * w).sum(), w.sum(), metrics


def prm_loss(params: Any, batch: PrmBatch, *, model_cfg: Any, head: str,
             candidates: tuple[int, int]) -> tuple[Array, Array, dict[str, Array]]:
    """`step_bce` of the PRM's logits at the batch's step positions (pure; jit with the
    keyword arguments static)."""
    from models.prm import step_logits

    z = step_logits(params, model_cfg, head, candidates, batch.tokens, batch.mask, batch.positions)
    weights = jnp.where(batch.positions >= 0, batch.weights, 0.0)
    return step_bce(z, batch.labels, weights)


@dataclasses.dataclass(frozen=True)
class PrmLossConfig:
    """Settings of the registered ``prm_bce`` loss (`rl.losses`): the PRM's head and its two
    candidate token ids (good, bad; used by the ``lm`` head)."""

    head: str = "lm"
    candidates: tuple[int, int] = (0, 1)


def flat_batch(batch: PrmBatch) -> Any:
    """The `PrmBatch` as the shared step's `rl.batch.FlatBatch`: full rows, every column
    scorable (C = T), ``completion_mask`` [B, T] float32 holding each step's weight at its tag
    position and ``targets`` [B, T] its label (0 elsewhere); `prm_bce` reads them."""
    from rl.batch import FlatBatch

    tokens = np.asarray(batch.tokens)
    B, T = tokens.shape
    weights = np.zeros((B, T), np.float32)
    targets = np.zeros((B, T), np.float32)
    pos = np.asarray(batch.positions)
    rows, cols = np.nonzero(pos >= 0)
    weights[rows, pos[rows, cols]] = np.asarray(batch.weights, np.float32)[rows, cols]
    targets[rows, pos[rows, cols]] = np.asarray(batch.labels, np.float32)[rows, cols]
    return FlatBatch(tokens=tokens, mask=np.asarray(batch.mask), completion_mask=weights, targets=targets)


def prm_bce(params: Any, batch: Any, settings: PrmLossConfig, model_cfg: Any) -> tuple[Array, Array, dict[str, Array]]:
    """`step_bce` of a `flat_batch`: the PRM's logit at every scored column against
    ``batch.targets``, weighted by ``batch.completion_mask`` (0 off the step ends); equals
    `prm_loss` of the `PrmBatch` it came from. Metric sums carry ``tokens`` (steps)."""
    from models.prm import token_logits

    C = batch.completion_mask.shape[1]
    z = token_logits(params, model_cfg, settings.head, settings.candidates, batch.tokens, batch.mask, last=C)
    s, d, metrics = step_bce(z, batch.targets, batch.completion_mask)
    metrics["tokens"] = metrics.pop("steps")
    return s, d, metrics


def binary_auc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (> 0.5 is positive), ties
    counted half (the Mann-Whitney statistic); NaN when one class is missing."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.float64) > 0.5
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


# --- rows and batches --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrmRow:
    """One row's tokens and step-tag positions; `dropped` steps did not fit `max_len`."""

    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    dropped: int = 0


def encode_row(tokenizer: Any, prompt_ids: Sequence[int], segments: Sequence[tuple[str, bool]], *,
               max_len: int) -> PrmRow:
    """Tokenize ``prompt + segments`` piece by piece (`jaxsql.cocte.prm_segments`); the position of
    each tag is its last token. Pieces that would pass `max_len` are left out with their steps."""
    tokens = list(prompt_ids)[-max_len:]
    positions: list[int] = []
    steps = sum(1 for _, is_tag in segments if is_tag)
    pending: list[int] = []
    for text, is_tag in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pending += ids
        if not is_tag:
            continue
        if not ids or len(tokens) + len(pending) > max_len:
            break
        tokens += pending
        pending = []
        positions.append(len(tokens) - 1)
    return PrmRow(tuple(tokens), tuple(positions), steps - len(positions))


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _steps_bucket(k: int, min_steps: int = 4) -> int:
    """K steps rounded up to a power of two, at least `min_steps` (few shapes compile)."""
    return max(min_steps, 1 << max(0, k - 1).bit_length())


def assemble(rows: Sequence[PrmRow], labels: Sequence[Sequence[float]] | None = None, *, pad_id: int,
             length_multiple: int = 64, min_steps: int = 4) -> PrmBatch:
    """Right-pad rows into a `PrmBatch` of numpy arrays.

    T is the longest row rounded up to `length_multiple` and K the most
    steps rounded up to a power of two (at least `min_steps`), so few shapes
    compile. `labels[i]` holds row i's labels for its kept steps (extra
    entries, for dropped steps, are ignored); without labels, labels and
    weights are 0 (scoring only).
    """
    if not rows:
        raise JaxsqlError("assemble: no rows")
    T = _round_up(max(len(r.tokens) for r in rows), length_multiple)
    K = _steps_bucket(max(len(r.positions) for r in rows), min_steps)
    B = len(rows)
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    positions = np.full((B, K), -1, np.int32)
    lab = np.zeros((B, K), np.float32)
    weights = np.zeros((B, K), np.float32)
    for i, r in enumerate(rows):
        tokens[i, :len(r.tokens)] = r.tokens
        mask[i, :len(r.tokens)] = 1
        n = len(r.positions)
        positions[i, :n] = r.positions
        if labels is not None:
            if len(labels[i]) < n:
                raise JaxsqlError(f"assemble: row {i} has {n} steps but {len(labels[i])} labels")
            lab[i, :n] = np.asarray(labels[i][:n], np.float32)
            weights[i, :n] = 1.0
    return PrmBatch(tokens, mask, positions, lab, weights)


def rows_share_prompts(rows: Sequence[PrmRow], prompts: Sequence[Sequence[int]], group: int) -> bool:
    """Whether `rows` are consecutive groups of `group` rows that each start with one prompt
    (`prompts[b]`, given per row) and have every step tag after it, as a GRPO draw's rows
    do; then `assemble_grouped` can lay them out with each prompt once."""
    if group < 1 or not rows or len(prompts) != len(rows) or len(rows) % group:
        return False
    for b, (row, p) in enumerate(zip(rows, prompts)):
        if p != prompts[b - b % group] or row.tokens[:len(p)] != tuple(p) or any(x < len(p) for x in row.positions):
            return False
    return True


def assemble_grouped(rows: Sequence[PrmRow], prompts: Sequence[Sequence[int]], group: int, *, pad_id: int,
                     prompt_len: int, rest_len: int, steps: int, length_multiple: int = 64
                     ) -> tuple[np.ndarray, ...]:
    """The arrays of `models.prm.grouped_step_scores` for rows that share prompts in groups
    (`rows_share_prompts`):
    ``prompt_NP, prompt_mask_NP`` (each group's prompt once, left-padded),
    ``rest_BR, rest_mask_BR`` (each row after its prompt, right-padded) and ``positions_BK``
    (step-tag positions in the rest, -1 past a row's steps). P and R are at least
    `prompt_len` and `rest_len` rounded up to `length_multiple`, K at least `steps` rounded
    up as `assemble` does (the sizes may be the largest over processes)."""
    N = len(rows) // group
    prompt_len, rest_len = _round_up(prompt_len, length_multiple), _round_up(rest_len, length_multiple)
    steps = _steps_bucket(steps)
    prompt = np.full((N, prompt_len), pad_id, np.int32)
    prompt_mask = np.zeros((N, prompt_len), np.int32)
    rest = np.full((len(rows), rest_len), pad_id, np.int32)
    rest_mask = np.zeros((len(rows), rest_len), np.int32)
    positions = np.full((len(rows), steps), -1, np.int32)
    for n in range(N):
        p = prompts[n * group]
        if p:
            prompt[n, -len(p):] = p
            prompt_mask[n, -len(p):] = 1
    for b, (row, p) in enumerate(zip(rows, prompts)):
        r = row.tokens[len(p):]
        rest[b, :len(r)] = r
        rest_mask[b, :len(r)] = 1
        positions[b, :len(row.positions)] = [x - len(p) for x in row.positions]
    return prompt, prompt_mask, rest, rest_mask, positions


# --- label files ---------------------------------------------------------------------------

LABEL_KINDS = ("hard", "soft")


@dataclasses.dataclass(frozen=True)
class StepLabel:
    """One step of a labelled trajectory.

    Attributes:
      text: the step as written; kind: ``cte`` or ``final``.
      ok: whether its prefix query executed; result: the rendered result the PRM reads.
      hard: 1 when some continuation (or, for the final step, the query itself) is correct, else 0.
      soft: the fraction of continuations that are correct.
      hits, k: correct continuations and continuations sampled (0 for a failed or final step).
    """

    text: str
    kind: str
    ok: bool
    result: str
    hard: float
    soft: float
    hits: int = 0
    k: int = 0


@dataclasses.dataclass(frozen=True)
class LabelRecord:
    """A labelled trajectory: the example, which sample, the completion, its outcome and steps."""

    example: Example
    sample: int
    completion: str
    outcome: bool
    steps: tuple[StepLabel, ...]
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.example.id, "sample": self.sample, "example": self.example.to_dict(),
                "completion": self.completion, "outcome": self.outcome, "problems": list(self.problems),
                "steps": [dataclasses.asdict(s) for s in self.steps]}

    def labels(self, kind: str = "soft") -> list[float]:
        if kind not in LABEL_KINDS:
            raise JaxsqlError(f"label kind must be one of {list(LABEL_KINDS)}, got {kind!r}")
        return [getattr(s, kind) for s in self.steps]


_RECORD_FIELDS = ("id", "sample", "example", "completion", "outcome", "steps")
_STEP_FIELDS = ("text", "kind", "ok", "result", "hard", "soft")


def record_from_json(d: Any, where: str) -> LabelRecord:
    """Parse one label-file line; one `MalformedRecord` naming `where` and the field otherwise."""
    if not isinstance(d, dict):
        raise MalformedRecord(f"{where}: expected a JSON object")
    missing = [f for f in _RECORD_FIELDS if f not in d]
    if missing:
        raise MalformedRecord(f"{where}: label record is missing field(s) {missing}")
    if not isinstance(d["steps"], list):
        raise MalformedRecord(f"{where}: 'steps' must be a list")
    steps = []
    for i, s in enumerate(d["steps"]):
        if not isinstance(s, dict):
            raise MalformedRecord(f"{where}: steps[{i}] must be an object")
        miss = [f for f in _STEP_FIELDS if f not in s]
        if miss:
            raise MalformedRecord(f"{where}: steps[{i}] is missing field(s) {miss}")
        try:
            hard, soft = float(s["hard"]), float(s["soft"])
        except (TypeError, ValueError):
            raise MalformedRecord(f"{where}: steps[{i}] labels must be numbers") from None
        if not (0.0 <= hard <= 1.0 and 0.0 <= soft <= 1.0):
            raise MalformedRecord(f"{where}: steps[{i}] labels must lie in [0, 1]")
        steps.append(StepLabel(str(s["text"]), str(s["kind"]), bool(s["ok"]), str(s["result"]), hard, soft,
                               int(s.get("hits", 0)), int(s.get("k", 0))))
    example = Example.from_dict(d["example"], where=f"{where} example") if isinstance(d["example"], dict) else None
    if example is None:
        raise MalformedRecord(f"{where}: 'example' must be an object")
    if example.id != d["id"]:
        raise MalformedRecord(f"{where}: 'id' {d['id']!r} differs from the example's id {example.id!r}")
    return LabelRecord(example, int(d["sample"]), str(d["completion"]), bool(d["outcome"]), tuple(steps),
                       tuple(d.get("problems") or ()))


def json_lines(path: str | Path, what: str = "file") -> Iterator[tuple[str, Any]]:
    """``(file:line, parsed value)`` of every non-blank line of a JSONL file; a missing file or
    a line that is not JSON is one `JaxsqlError` naming it. A local file or one in a bucket
    (``gs://``, `jaxsql.paths`)."""
    from jaxsql.paths import as_path

    path = as_path(path)
    if not path.is_file():
        raise JaxsqlError(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedRecord(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def read_label_file(path: str | Path) -> list[LabelRecord]:
    """Every record of a label file written by ``jaxsql prm label``; a bad line is one clear error."""
    return [record_from_json(d, where) for where, d in json_lines(path, "label file")]


def label_rows(records: Sequence[LabelRecord], prompt_ids: Callable[[Example], Sequence[int]], tokenizer: Any, *,
               tag: str, max_len: int, kind: str = "soft") -> tuple[list[PrmRow], list[list[float]]]:
    """PRM rows and their labels from label records (`assemble` makes the batch)."""
    rows, labels = [], []
    for r in records:
        segments = prm_segments([s.text for s in r.steps], [s.result for s in r.steps], tag)
        rows.append(encode_row(tokenizer, prompt_ids(r.example), segments, max_len=max_len))
        labels.append(r.labels(kind))
    return rows, labels
