"""The training batch: one typed pytree with one layout, and its explicit flat form.

`Batch` is the layout every trainer builds (grouped: each prompt row once,
its G completions after it)::

    prompt_tokens, prompt_mask          [N, P]      left-padded prompts
    completion_tokens, completion_mask  [N*G, C]    right-padded completions, group-major:
                                                    rows g*G .. g*G+G-1 answer prompt g
    advantages                          [N*G] or    per completion (GRPO), or per completion
                                        [N*G, C]    token (process rewards, `rl.process`)
    old_logp, ref_logp, sampler_logp    [N*G, C]    per completion token (GRPO; optional)
    targets                             [N*G, C]    per-position targets of a loss (e.g. PRM
                                                    step labels; optional)
    loss_mask                           [N*G, C]    positions a loss scores (default:
                                                    completion_mask)

SFT is the G = 1 case (each example its own prompt). The prompt of a group
runs through the decoder once and its KV cache is repeated for the G
completions (`rl.policy.grouped_logprobs_and_entropy`).

`FlatBatch` is the same rows as ``[left-padded prompt | completion]``
(``tokens``/``mask`` [B, T]) with the scored positions in the last C columns
(``completion_mask`` [B, C]); `Batch.flat` converts, and
`FlatBatch.from_full_width` takes per-token arrays as wide as the tokens
(every position but the first scored). The step tells the two apart by their
type, never by their keys or widths. Both are frozen dataclasses registered
as pytrees, so a batch of shardings has the same structure as the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array or np.ndarray: host rows become device rows through the trainer's placement

PER_ROW = ("advantages", "old_logp", "ref_logp", "sampler_logp", "targets")


def _fields(obj) -> dict[str, Array]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _split_rows(x, m: int):
    # Row r goes to micro-batch r % m, so every device's shard of rows feeds every
    # micro-batch and no resharding is needed.
    n = x.shape[0]
    return x.reshape((n // m, m) + x.shape[1:]).swapaxes(0, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PerRow:
    """The optional per-completion fields both layouts carry (keyword-only)."""

    advantages: Array | None = None
    old_logp: Array | None = None
    ref_logp: Array | None = None
    sampler_logp: Array | None = None
    targets: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch(_PerRow):
    """Grouped rows: N prompts once, N*G completions (see the module docstring)."""

    prompt_tokens: Array
    prompt_mask: Array
    completion_tokens: Array
    completion_mask: Array
    loss_mask: Array | None = dataclasses.field(default=None, kw_only=True)

    @property
    def group_size(self) -> int:
        """G, completions per prompt."""
        return self.completion_tokens.shape[0] // self.prompt_tokens.shape[0]

    @property
    def num_prompts(self) -> int:
        return self.prompt_tokens.shape[0]

    @property
    def scored_mask(self) -> Array:
        """[N*G, C] positions the loss scores."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    def replace(self, **changes: Array | None) -> "Batch":
        return dataclasses.replace(self, **changes)

    def flat(self) -> "FlatBatch":
        """The same rows as full ``[prompt | completion]`` rows (each prompt repeated G times)."""
        G = self.group_size
        xp = jnp if isinstance(self.prompt_tokens, jax.Array) else np
        rest = {k: getattr(self, k) for k in PER_ROW}
        return FlatBatch(
            tokens=xp.concatenate([xp.repeat(self.prompt_tokens, G, 0), self.completion_tokens], 1),
            mask=xp.concatenate([xp.repeat(self.prompt_mask, G, 0), self.completion_mask], 1),
            completion_mask=self.scored_mask, **rest)

    def micro_batches(self, m: int) -> "Batch":
        """Leading axis [m]: micro-batch i holds prompts i, i+m, ... with their G completions."""
        n, G = self.num_prompts, self.group_size
        if n % m:
            raise ValueError(f"grouped batch: {n} prompts are not divisible by micro_batches={m}; "
                             f"use full rows (Batch.flat())")
        out = {}
        for k, x in _fields(self).items():
            if x is None:
                out[k] = None
            elif k.startswith("prompt_"):
                out[k] = _split_rows(x, m)
            else:
                y = _split_rows(x.reshape((n, G) + x.shape[1:]), m)
                out[k] = y.reshape((m, (n // m) * G) + x.shape[1:])
        return Batch(**out)

    def select_groups(self, groups: np.ndarray) -> "Batch":
        """The prompts `groups` (host ints), each with its G completions."""
        G = self.group_size
        groups = np.asarray(groups, np.int64)
        rows = jnp.asarray((groups[:, None] * G + np.arange(G)[None, :]).reshape(-1), jnp.int32)
        g = jnp.asarray(groups, jnp.int32)
        return Batch(**{k: None if x is None else jnp.take(x, g if k.startswith("prompt_") else rows, axis=0)
                        for k, x in _fields(self).items()})

    @staticmethod
    def concat(parts: Sequence["Batch"]) -> "Batch":
        """Batches stacked along their rows; prompts of different bucket widths are padded on
        the left (more padding), so they stay left-padded."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.prompt_tokens.shape[1] for p in parts)
        out = {}
        for k in _fields(parts[0]):
            xs = [getattr(p, k) for p in parts]
            if any(x is None for x in xs):
                if not all(x is None for x in xs):
                    raise ValueError(f"Batch.concat: field {k} is set in some parts only")
                out[k] = None
                continue
            if k.startswith("prompt_"):
                xs = [jnp.pad(x, ((0, 0), (width - x.shape[1], 0))) if x.shape[1] < width else x for x in xs]
            out[k] = jnp.concatenate(xs, 0)
        return Batch(**out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlatBatch(_PerRow):
    """Full rows ``[left-padded prompt | completion]``: ``tokens``/``mask`` [B, T] (real tokens),
    ``completion_mask`` [B, C] the positions scored among the last C columns, and the
    per-row fields of `Batch` over those C columns."""

    tokens: Array
    mask: Array
    completion_mask: Array

    @property
    def completion_len(self) -> int:
        """C, the scored columns at the end of each row."""
        return self.completion_mask.shape[1]

    @property
    def scored_mask(self) -> Array:
        return self.completion_mask

    def replace(self, **changes: Array | None) -> "FlatBatch":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_full_width(cls, tokens: Array, mask: Array, completion_mask: Array, **per_token: Array | None
                        ) -> "FlatBatch":
        """Rows whose per-token arrays are as wide as `tokens` [B, T]: every position but the
        first can be scored (C = T - 1), at the cost of the vocabulary projection everywhere."""
        if completion_mask.shape[1] != tokens.shape[1]:
            raise ValueError(f"from_full_width: completion_mask has {completion_mask.shape[1]} columns, "
                             f"tokens {tokens.shape[1]}")
        cut = {k: None if v is None or np.ndim(v) < 2 else v[:, 1:] for k, v in per_token.items()}
        cut.update({k: v for k, v in per_token.items() if v is not None and np.ndim(v) < 2})
        return cls(tokens=tokens, mask=mask, completion_mask=completion_mask[:, 1:], **cut)

    def micro_batches(self, m: int) -> "FlatBatch":
        """Leading axis [m]: micro-batch i holds rows i, i+m, ..."""
        return jax.tree.map(lambda x: _split_rows(x, m), self)


TrainBatch = Batch | FlatBatch


def batch_fields(batch: TrainBatch) -> dict[str, Array]:
    """The batch's arrays by field name (absent optional fields left out)."""
    return {k: v for k, v in _fields(batch).items() if v is not None}
