"""Rollouts: prompts -> G samples each -> training rows, and the device-side log-probs.

The host encodes prompts (schema + question rendered by `data.prompts`,
tokenised, left-truncated), `models.sampler.generate` samples G completions
per prompt (one prefill per prompt), and `assemble` lays the samples out as
one grouped `rl.batch.Batch` (each prompt once, its G completions after it)
with the masks the loss needs. All of it stays on the device; only the completion
tokens travel to the host for detokenisation and SQL execution.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.records import Example
from models.attention import on_mesh_of
from models.config import ModelConfig
from models.sampler import SampleOutput, bucket_length, generate, left_pad
from rl.batch import Batch, FlatBatch
from rl.policy import batch_logprobs


class PromptEncoder:
    """Example -> prompt token ids, caching schemas per database and ids per example."""

    def __init__(self, tokenizer: Any, prompt_format: str = "plain", max_prompt_len: int = 512,
                 schema_style: str = "compact", sample_values: int = 0):
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.max_prompt_len = max_prompt_len
        self.schema_style = schema_style
        self.sample_values = sample_values
        self._schemas: dict[str, str] = {}
        self._ids: dict[str, list[int]] = {}
        self.truncated = 0  # prompts cut to their last max_prompt_len tokens so far

    def schema(self, db_path: str) -> str:
        """Serialised schema of a database (once per database)."""
        from data.schema import serialize_schema

        if db_path not in self._schemas:
            self._schemas[db_path] = serialize_schema(db_path, style=self.schema_style,
                                                      sample_values=self.sample_values)
        return self._schemas[db_path]

    def text(self, ex: Example) -> str:
        """The prompt text of `ex`."""
        from data.prompts import render_prompt

        return render_prompt(ex, self.schema(ex.db_path), self.prompt_format, self.tokenizer)

    def __call__(self, ex: Example) -> list[int]:
        """Prompt ids; an over-long prompt keeps its last `max_prompt_len` tokens (the question),
        is counted in `truncated`, and the first one warns (its start, the instructions and
        the schema's first tables, is lost)."""
        key = f"{ex.id}\x00{ex.db_path}"
        if key not in self._ids:
            ids = self.tokenizer(self.text(ex), add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_prompt_len:
                self.truncated += 1
                if self.truncated == 1:
                    warnings.warn(f"prompt of example {ex.id!r} is {len(ids)} tokens, over max_prompt_len="
                                  f"{self.max_prompt_len}: it keeps its last {self.max_prompt_len} and loses "
                                  f"its start (raise data.max_prompt_len; later prompts are counted, not "
                                  f"reported)", stacklevel=2)
            self._ids[key] = list(ids[-self.max_prompt_len:])
        return self._ids[key]

    def target_ids(self, ex: Example, max_len: int, eos_id: int) -> list[int]:
        """SFT target ids (the gold completion in the prompt format) plus EOS."""
        from data.prompts import render_target

        ids = self.tokenizer(render_target(ex, self.prompt_format), add_special_tokens=False)["input_ids"]
        return list(ids[: max_len - 1]) + [int(eos_id)]


def decode_completions(tokenizer: Any, tokens_NC: np.ndarray, lengths_N: np.ndarray,
                       stop_ids: Sequence[int]) -> list[str]:
    """Completion texts: generated tokens up to the first stop token (excluded)."""
    stop = {int(s) for s in stop_ids}
    out = []
    for row, n in zip(np.asarray(tokens_NC), np.asarray(lengths_N)):
        ids = [int(t) for t in row[: int(n)]]
        while ids and ids[-1] in stop:
            ids.pop()
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


@partial(jax.jit, static_argnames=("group",))
def assemble(sample: SampleOutput, group: int) -> Batch:
    """The grouped training batch of a `SampleOutput` with `group` samples per prompt:
    prompts [N, P] once, completions, their mask and the sampler's log-probs [N*G, C]."""
    n, c = sample.tokens.shape
    gen_mask = (jnp.arange(c)[None, :] < sample.lengths[:, None]).astype(jnp.int32)
    return Batch(
        prompt_tokens=sample.prompt_tokens[::group].astype(jnp.int32),
        prompt_mask=sample.prompt_mask[::group].astype(jnp.int32),
        completion_tokens=sample.tokens.astype(jnp.int32),
        completion_mask=gen_mask,
        sampler_logp=sample.logprobs.astype(jnp.float32) * gen_mask,
    )


def completion_logprobs(params, batch: Batch | FlatBatch, cfg: ModelConfig, temperature: float,
                        with_entropy: bool = False):
    """Per-token log-probs (and entropies) of the batch's completions under `params`, 0 outside them
    (the reference and old-policy log-probs). Runs under the mesh the parameters live on
    (`models.attention.on_mesh_of`), so `auto` attention places the splash kernel on each chip of a
    multi-chip TPU, as in the update."""
    with on_mesh_of(params):
        return _completion_logprobs(params, batch, cfg, temperature, with_entropy)


@partial(jax.jit, static_argnames=("cfg", "temperature", "with_entropy"))
def _completion_logprobs(params, batch: Batch | FlatBatch, cfg: ModelConfig, temperature: float,
                         with_entropy: bool = False):
    lp, ent = batch_logprobs(params, cfg, batch, temperature=temperature, with_entropy=with_entropy)
    cm = batch.scored_mask.astype(jnp.float32)
    return lp * cm, (None if ent is None else ent * cm)


@dataclasses.dataclass
class Rollout:
    """One rollout of N prompts x G samples (rows group-major)."""

    examples: list[Example]  # length N*G, each prompt repeated G times
    rows: Batch  # device arrays, grouped
    tokens_NC: jax.Array
    lengths_N: jax.Array


def sample_rollout(params, cfg: ModelConfig, encoder: PromptEncoder, examples: Sequence[Example], *,
                   key: jax.Array, num_generations: int, max_new_tokens: int, temperature: float,
                   top_p: float, top_k: int, ignore_stop: bool, stop_ids: Sequence[int],
                   pad_id: int, rules=None) -> Rollout:
    """Sample G completions per example; returns device rows without waiting for them.
    `rules` (`jaxsql.sharding.ShardingRules`, None: the defaults) place the rows."""
    prompts = [encoder(ex) for ex in examples]
    out = generate(params, cfg, prompts, key=key, max_new_tokens=max_new_tokens,
                   num_samples=num_generations, temperature=temperature, top_p=top_p, top_k=top_k,
                   stop_ids=tuple(stop_ids), ignore_stop=ignore_stop, pad_id=pad_id, rules=rules)
    repeated = [ex for ex in examples for _ in range(num_generations)]
    return Rollout(repeated, assemble(out, num_generations), out.tokens, out.lengths)


def multi_turn_batch(rollout: Any, prompts: Sequence[Sequence[int]], group: int, pad_id: int,
                     width: int = 0) -> Batch:
    """The grouped training batch (host arrays) of a multi-turn rollout (`rl.multiturn`).

    `rollout` has ``completion_tokens`` / ``completion_mask`` / ``sampled_mask`` /
    ``logprobs`` [N*G, C] with rows group-major (rows g*G .. g*G+G-1 answer prompt g) and
    `prompts` are the N prompts' ids. The completion holds the model's tokens and the
    observations in order: ``completion_mask`` is every real token (the policy attends to
    all of them), ``loss_mask`` the sampled tokens only (the loss, the ratio, the KL, the
    length normalisation and the mismatch metric score those), ``sampler_logp`` the
    sampler's log-probs on them (0 elsewhere). Completions are right-padded with `pad_id`
    to ``max(C, width)`` columns (a fixed `width` keeps the update's shapes fixed) and the
    prompts left-padded to a bucket length, as `models.sampler.generate` pads them.
    """
    tokens = np.asarray(rollout.completion_tokens, np.int32)
    cmask = np.asarray(rollout.completion_mask, np.int32)
    smask = np.asarray(rollout.sampled_mask, np.int32)
    logp = np.asarray(rollout.logprobs, np.float32)
    B, C = tokens.shape
    if B != len(prompts) * group:
        raise ValueError(f"multi_turn_batch: {B} completion rows for {len(prompts)} prompts x {group}")
    if np.any(smask > cmask):
        raise ValueError("multi_turn_batch: a sampled token outside the completion mask")
    pad = max(C, int(width)) - C
    if pad:
        tokens = np.pad(tokens, ((0, 0), (0, pad)), constant_values=pad_id)
        cmask, smask, logp = (np.pad(x, ((0, 0), (0, pad))) for x in (cmask, smask, logp))
    p_NP, pm_NP = left_pad(prompts, bucket_length(max(len(p) for p in prompts)), pad_id)
    return Batch(prompt_tokens=np.asarray(p_NP, np.int32), prompt_mask=np.asarray(pm_NP, np.int32),
                 completion_tokens=tokens, completion_mask=cmask, loss_mask=smask,
                 sampler_logp=logp * smask)
