"""Autoregressive sampling: left-padded prompt buckets, dense KV cache, jitted prefill + decode loop.

`generate` left-pads the prompts to a bucket length (so the number of
compiled shapes stays small), runs one jitted prefill over the N prompts,
repeats the cache G times (G samples per prompt share one prefill), then
one jitted `lax.while_loop` decodes up to `max_new_tokens` tokens with its
state (cache included) donated so XLA updates it in place. The loop stops
early once every row has produced a stop token.

The same loop is public as a continuable decoding state (`DecodeState`):
`start` (prefill), `decode` (up to n tokens, stop ids / `StopRule` / length),
`extend` (append ragged tokens per row into the cache), `fork` (gather rows),
`reseed`, `resume` and `tokens`, for step-level search and tool use.

Sampling per step, in the order of transformers' logits warpers:
stop-token masking (`ignore_stop`), temperature, top-k, top-p (nucleus),
then a categorical draw; `greedy` takes the argmax instead. Top-p sorts
only the top-k candidates when top_k > 0, the whole vocabulary otherwise;
with top_p == 1 and top_k == 0 nothing is sorted.

Log-probabilities returned are those of the *model* at the sampling
temperature: ``log_softmax(logits / temperature)[token]`` before top-k /
top-p truncation and stop masking (temperature 1 for greedy), i.e. what
``models.model.token_logprobs(..., temperature=T)`` recomputes for the
same tokens, which is the old-policy log-prob GRPO needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxsql.distributed import last_level_cache_bytes
from jaxsql.errors import JaxsqlError
from jaxsql.sharding import ShardingRules
from models.attention import on_mesh_of
from models.config import ModelConfig
from models.model import KVCache, Params, forward, hidden_states, output_logits, positions_from_mask, unstack_layers

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


class SampleOutput(NamedTuple):
    """Samples; row ``n * G + g`` is sample g of prompt n.

    tokens [N*G, max_new] (pad_id after the stop token), logprobs [N*G,
    max_new] float32 (0 after the stop token), lengths [N*G] (generated
    tokens including the stop token), prompt_tokens / prompt_mask [N*G, P]
    (left-padded to the bucket length P).
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array


class SamplingParams(NamedTuple):
    """Hashable sampling settings (a static jit argument)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop_ids: tuple[int, ...] = ()
    ignore_stop: bool = False
    pad_id: int = 0


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n (multiples of the largest bucket beyond it)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    top = max(buckets)
    return -(-n // top) * top


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to `length`: (tokens [N, length] int32, mask [N, length] bool)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.bool_)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = np.asarray(p, np.int32)
            mask[i, length - len(p):] = True
    return tokens, mask


def categorical(key: jax.Array, logits_BV: jax.Array, block: int = 128) -> jax.Array:
    """Exact draw from softmax(logits) per row, one uniform per row from `key` (`categorical_from_uniform`)."""
    return categorical_from_uniform(jax.random.uniform(key, (logits_BV.shape[0],)), logits_BV, block)


def categorical_from_uniform(u_B: jax.Array, logits_BV: jax.Array, block: int = 128) -> jax.Array:
    """Exact draw from softmax(logits) per row by inverting the CDF at the row's uniform u in [0, 1).

    `jax.random.categorical` (Gumbel-max) needs B x V random numbers, which
    dominated a CPU decode step; here 1 - u in (0, 1] picks the first token
    whose cumulative probability reaches it, found in two levels (blocks of
    `block` tokens, then within the chosen block) so the scans stay short.
    """
    B, V = logits_BV.shape
    pad = (-V) % block
    p = jnp.pad(jax.nn.softmax(logits_BV, axis=-1), ((0, 0), (0, pad))).reshape(B, -1, block)
    block_mass = p.sum(-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    u = (1.0 - u_B) * block_cdf[:, -1]  # (0, total]: never a zero-probability token
    b = jnp.minimum(jnp.sum(block_cdf < u[:, None], axis=-1), block_cdf.shape[1] - 1)
    start = (jnp.take_along_axis(block_cdf, b[:, None], -1) - jnp.take_along_axis(block_mass, b[:, None], -1))[:, 0]
    inner_cdf = jnp.cumsum(jnp.take_along_axis(p, b[:, None, None], 1)[:, 0], axis=-1) + start[:, None]
    j = jnp.minimum(jnp.sum(inner_cdf < u[:, None], axis=-1), block - 1)
    return jnp.minimum(b * block + j, V - 1)


def first_argmax(x_BV: jax.Array) -> jax.Array:
    """Index of each row's largest value, the first one on ties (as `jnp.argmax`).

    Two plain reductions (max, then min over the matching indices): XLA:CPU
    runs `jnp.argmax`'s paired value-index reduction about 4x slower (339 us
    against 87 us on [32, 4096]). A row with no match (NaN) gives the last
    index.
    """
    V = x_BV.shape[-1]
    hit = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(V), V), axis=-1), V - 1)


def sample_token(logits_BV: jax.Array, key: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row with one uniform per row from `key` (`draw_token`)."""
    return draw_token(logits_BV, jax.random.uniform(key, (logits_BV.shape[0],)), sp)


def draw_token(logits_BV: jax.Array, u_B: jax.Array, sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row at the row's uniform `u_B`; returns (token [B], model log-prob at
    the temperature [B]). Greedy ignores `u_B`."""
    logits = logits_BV.astype(jnp.float32)
    temp = 1.0 if sp.greedy else sp.temperature
    scaled = logits / temp
    logp_BV = jax.nn.log_softmax(scaled, axis=-1)
    if sp.ignore_stop and sp.stop_ids:
        scaled = scaled.at[:, jnp.asarray(sp.stop_ids)].set(-jnp.inf)
    if sp.greedy:
        token = first_argmax(scaled)
    else:
        filtered = scaled
        if sp.top_k > 0 or sp.top_p < 1.0:
            k = sp.top_k if sp.top_k > 0 else scaled.shape[-1]
            top_vals, _ = jax.lax.top_k(scaled, k)  # sorted, descending
            threshold = top_vals[:, -1]
            if sp.top_p < 1.0:
                probs = jax.nn.softmax(top_vals, axis=-1)
                # keep the smallest prefix whose mass reaches top_p (the first token always)
                keep = (jnp.cumsum(probs, axis=-1) - probs) < sp.top_p
                n_keep = jnp.sum(keep, axis=-1)
                threshold = jnp.take_along_axis(top_vals, (n_keep - 1)[:, None], axis=-1)[:, 0]
            filtered = jnp.where(scaled < threshold[:, None], -jnp.inf, scaled)
        token = categorical_from_uniform(u_B, filtered)
    logprob = jnp.take_along_axis(logp_BV, token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


@functools.partial(jax.jit, static_argnames=("cfg",))
def _cpu_layout(params: Params, cfg: ModelConfig) -> Params:
    """The parameters as the CPU sampler reads them, made once per `generate` call.

    Unstacked layers with fused QKV and gate/up weights (`unstack_layers`),
    and a tied embedding transposed into an untied [D, V] ``lm_head``: a
    plain GEMM for the per-step vocabulary matmul, about 25% faster on CPU
    than contracting [V, D]. Costs one transient copy of the weights.
    """
    params = unstack_layers(params, fuse=True)
    if cfg.tie_word_embeddings:
        params = {**params, "lm_head": params["embed"].T}
    return params


def _on_rows(x: jax.Array, rows: NamedSharding | None, axis: int = 0) -> jax.Array:
    """`x` constrained to split its `axis` like the prompt rows (other axes left to XLA)."""
    if rows is None:
        return x
    spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
    spec[axis] = rows.spec[0]
    return jax.lax.with_sharding_constraint(x, NamedSharding(rows.mesh, PartitionSpec(*spec)))


def _cache_on_rows(cache: KVCache, rows: NamedSharding | None, unstack: bool) -> KVCache:
    kv_axis = 0 if unstack else 1  # [B, ...] per layer, or stacked [L, B, ...]
    k = jax.tree.map(lambda a: _on_rows(a, rows, kv_axis), cache.k)
    v = jax.tree.map(lambda a: _on_rows(a, rows, kv_axis), cache.v)
    return KVCache(k, v, _on_rows(cache.mask_BS, rows), cache.index)


@functools.partial(jax.jit, static_argnames=("cfg", "num_samples", "cache_len", "unstack", "rows"))
def _prefill(params: Params, tokens_NP: jax.Array, mask_NP: jax.Array, cfg: ModelConfig, num_samples: int,
             cache_len: int, unstack: bool, rows: NamedSharding | None = None
             ) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
    """Run the prompts once, then repeat logits, cache and prompt rows for the G samples of each prompt.

    Every row array stays split like the prompt rows (`rows`), whatever the
    parameters' sharding, so each device decodes its own rows.
    """
    N, P = tokens_NP.shape
    # Prompts attend only to each other (no work on the empty decode slots), and only the last
    # position's hidden state goes on to the vocabulary matmul.
    h, cache = hidden_states(params, tokens_NP, positions_from_mask(mask_NP), cfg, mask_BT=mask_NP,
                             fill_cache=cache_len, last_only=True)
    logits_NV = output_logits(params, h, cfg)[:, 0]
    rep = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    rep_kv = rep if unstack else functools.partial(jnp.repeat, repeats=num_samples, axis=1)  # [L, B, ...]
    cache = KVCache(jax.tree.map(rep_kv, cache.k), jax.tree.map(rep_kv, cache.v), rep(cache.mask_BS), cache.index)
    return (_on_rows(rep(logits_NV), rows), _cache_on_rows(cache, rows, unstack),
            _on_rows(rep(tokens_NP), rows), _on_rows(rep(mask_NP), rows))


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, key: jax.Array,
             max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, greedy: bool = False, stop_ids: Sequence[int] | None = None,
             ignore_stop: bool = False, pad_id: int | None = None,
             buckets: Sequence[int] = DEFAULT_BUCKETS, unstack: bool | None = None,
             rules: ShardingRules | None = None) -> SampleOutput:
    """Sample `num_samples` continuations of each prompt (lists of token ids).

    `stop_ids` defaults to the config's EOS ids; `ignore_stop` masks their
    logits so every row runs `max_new_tokens` (benchmarks, parity checks).
    `pad_id` defaults to the config's pad id (0 if it has none). `unstack`
    (default: on the CPU backend only) runs the layers unrolled on a
    per-call copy of the weights in the CPU layout (`_cpu_layout`): on CPU
    that avoids copying every layer's weights out of the stacked arrays on
    every decode step and fuses the narrow projections; on accelerators the
    stacked scan is kept (no extra parameter memory).

    When the parameters live on a mesh, the prompts' rows are split over its
    batch axes (``rules.batch``, default "data" x "fsdp": data parallel,
    `batch_sharding`). On one process a prompt count that does not divide
    them is completed with filler rows that are dropped from the output.

    Many processes: every process calls `generate` with the same arguments
    except `prompts`, which are *this process's* rows of the global batch
    (its block, `jaxsql.distributed.row_share`; the same number on every
    process). The outputs are global arrays over all processes' rows, in
    global order: `jaxsql.distributed.local_rows` gives this process's
    samples, `jaxsql.distributed.to_host` all of them. Every sampled token
    depends only on (`key`, its prompt's position in the global batch, its
    sample index), so N processes draw what one process with the same
    devices draws. The global prompt count must divide over the batch
    devices (no filler rows across processes).
    """
    from jaxsql import distributed

    if not prompts:
        raise JaxsqlError("generate: no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise JaxsqlError("generate: every prompt needs at least one token")
    if max_new_tokens < 1 or num_samples < 1:
        raise JaxsqlError("generate: max_new_tokens and num_samples must be >= 1")
    sp = _sampling_params(cfg, temperature, top_p, top_k, greedy, stop_ids, ignore_stop, pad_id)
    pad = sp.pad_id

    N = len(prompts)
    longest = max(len(p) for p in prompts)
    rows_sharding, shards = batch_sharding(params, rules)
    _, blocks = distributed.row_share(rows_sharding)
    if blocks > 1:  # each process holds its own block of the rows
        counts = distributed.process_values(np.asarray([N, longest], np.int64))
        if len(set(counts[:, 0].tolist())) != 1:
            raise JaxsqlError(f"generate: the processes hold {counts[:, 0].tolist()} prompts; each must give "
                              f"the same number (its block of the global batch)")
        longest = int(counts[:, 1].max())
        if (N * blocks) % shards:
            raise JaxsqlError(f"generate: {N * blocks} prompts ({N} on each of {blocks} processes) do not split "
                              f"over the {shards} devices of the batch axes; use a multiple of {shards}")
        filler = 0
    else:
        filler = -N % shards  # rows repeating the last prompt so every shard gets the same number
    P = bucket_length(longest, buckets)
    tokens_NP, mask_NP = left_pad(list(prompts) + [prompts[-1]] * filler, P, pad)
    if rows_sharding is None:
        tokens_NP, mask_NP = jnp.asarray(tokens_NP), jnp.asarray(mask_NP)
    else:
        shape = ((N + filler) * blocks, P)
        tokens_NP, mask_NP = (distributed.to_global(a, rows_sharding, shape) for a in (tokens_NP, mask_NP))
    if unstack is None:
        unstack = jax.default_backend() == "cpu"
    run_cfg = cfg
    mesh = on_mesh_of(params)  # prefill under the parameters' mesh: `auto` can place splash per chip
    if unstack:
        params = _cpu_layout(params, cfg)  # a copy, local to this call
        run_cfg = cfg.replace(tie_word_embeddings=False)  # the embedding's transpose is now lm_head
    with mesh:
        logits, cache, prompt_tokens, prompt_mask = _prefill(params, tokens_NP, mask_NP, run_cfg, num_samples,
                                                             P + max_new_tokens, unstack, rows_sharding)
    state = _initial_state(logits, cache, prompt_tokens, prompt_mask, key, num_samples, max_new_tokens, pad,
                           rows_sharding)
    state = _decode_loop(params, state, jnp.int32(max_new_tokens), jnp.int32(np.iinfo(np.int32).max), None,
                         run_cfg, sp, False, unstack, rows_sharding)
    tokens, logprobs, lengths = state.tokens_BM, state.logprobs_BM, state.lengths_B
    out = SampleOutput(tokens, logprobs, lengths, prompt_tokens, prompt_mask)
    if filler:
        out = SampleOutput(*(a[:N * num_samples] for a in out))
    return out



# ---------------------------------------------------------------------------------------------
# The continuable sampler: a decoding state that can be stopped, extended, forked and resumed.


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerModel:
    """The parameters in the layout the decode loop reads, with the config that goes with them.

    Made once by `sampler_model` and passed to `start` / `decode` / `extend`, so a
    multi-call decode (beam search, tool calls) converts the weights once, not per call.
    `rows` is the sharding of the row arrays (None off a mesh).
    """

    params: Params
    cfg: ModelConfig
    unstack: bool
    pad_id: int
    rows: NamedSharding | None = None
    shards: int = 1


def sampler_model(params: Params, cfg: ModelConfig, *, unstack: bool | None = None, pad_id: int | None = None,
                  rules: ShardingRules | None = None) -> SamplerModel:
    """`params` in the sampler's layout (`_cpu_layout` when `unstack`, default: on the CPU
    backend only; a copy that lives as long as the returned object). `pad_id` defaults to
    the config's pad id (0 if it has none). On a mesh the rows are split over its batch
    axes as in `generate` (one process)."""
    if unstack is None:
        unstack = jax.default_backend() == "cpu"
    pad = int(pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0))
    rows, shards = batch_sharding(params, rules)
    if unstack:
        return SamplerModel(_cpu_layout(params, cfg), cfg.replace(tie_word_embeddings=False), True, pad, rows, shards)
    return SamplerModel(params, cfg, False, pad, rows, shards)


class StopRule(NamedTuple):
    """Token-level stop conditions that run inside the jitted loop.

    A row stops after sampling token t when ``ids_V[t]``, or when for some pair p the
    previous token of the row (prompt, appended or sampled) is in ``after_PV[p]`` and t
    is in ``before_PV[p]``. `stop_rule` builds one from stop strings: that finds every
    occurrence that lies inside one token or spans two adjacent tokens.
    """

    ids_V: jax.Array
    after_PV: jax.Array
    before_PV: jax.Array


def stop_rule(tokenizer: Any, strings: Sequence[str], vocab_size: int, ids: Sequence[int] = ()) -> StopRule:
    """A `StopRule` for stop `strings` (and plain stop token `ids`) over the tokenizer's vocabulary.

    Each token is decoded on its own once (`tokenizer.decode([i])`); a token whose text
    contains a stop string stops by itself, and for each split ``s = a + b`` of a stop
    string a token ending in `a` followed by one starting with `b` stops the row too.
    Occurrences that span three or more tokens (possible only through tokens whose text
    is shorter than the split parts) are not found.
    """
    n = min(vocab_size, len(tokenizer))
    texts = [tokenizer.decode([i]) for i in range(n)] + [""] * (vocab_size - n)
    ids_V = np.zeros(vocab_size, np.bool_)
    ids_V[[int(i) for i in ids]] = True
    after, before = [], []
    for s in strings:
        if not s:
            raise JaxsqlError("stop_rule: empty stop string")
        ids_V |= np.fromiter((s in t for t in texts), np.bool_, vocab_size)
        for k in range(1, len(s)):
            a, b = s[:k], s[k:]
            after.append(np.fromiter((t.endswith(a) for t in texts), np.bool_, vocab_size))
            before.append(np.fromiter((t.startswith(b) for t in texts), np.bool_, vocab_size))
    if not after:
        after = before = [np.zeros(vocab_size, np.bool_)]
    return StopRule(jnp.asarray(ids_V), jnp.asarray(np.stack(after)), jnp.asarray(np.stack(before)))


class DecodeState(NamedTuple):
    """Everything needed to continue decoding B rows (a pytree; row r is row r of every array).

    Attributes:
      cache: the KV cache; every real token of every row (prompt, appended, sampled and
        fed) has its slot, pads and slots of rows that were done are masked out.
      logits_BV: float32 next-token logits of each row (after all its tokens).
      positions_B: real tokens of each row so far (the rotary position of the next one).
      last_B: each row's last real token (for `StopRule` pairs).
      done_B: rows that stopped (stop token / rule, length limit); `decode` leaves them
        alone until `extend` appends to them or `resume` clears the flag.
      tokens_BM: the continuation after the prompt: sampled and appended tokens in order,
        pad after ``lengths_B``.
      logprobs_BM: each sampled token's model log-prob at the sampling temperature (0 for
        appended tokens and padding).
      sampled_BM: True where the token was sampled (False: appended by `extend`, or pad).
      lengths_B: entries of `tokens_BM` in use per row.
      keys_BK: each row's random key data; draw d of the row is
        ``uniform(wrap_key_data(key), (n,))[d]`` for any n > d (jax's partitionable threefry).
      draws_B: uniforms the row has consumed under its key (the position in its stream).
      prompt_tokens_BP, prompt_mask_BP: the left-padded prompts.
    """

    cache: KVCache
    logits_BV: jax.Array
    positions_B: jax.Array
    last_B: jax.Array
    done_B: jax.Array
    tokens_BM: jax.Array
    logprobs_BM: jax.Array
    sampled_BM: jax.Array
    lengths_B: jax.Array
    keys_BK: jax.Array
    draws_B: jax.Array
    prompt_tokens_BP: jax.Array
    prompt_mask_BP: jax.Array


def _row_keys(key: jax.Array, rows: int, group: int) -> jax.Array:
    """Key data of row r = ``fold_in(fold_in(key, r // group), r % group)``: sample r % group of
    prompt r // group. A row's randomness depends only on the key, its prompt's position in
    the global batch and its sample index, so the same rows draw the same tokens however the
    batch is split over devices and processes."""
    r = jnp.arange(rows)
    keys = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(key, p), s))(r // group, r % group)
    return jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys


@functools.partial(jax.jit, static_argnames=("group", "capacity", "pad_id", "rows"))
def _initial_state(logits_BV: jax.Array, cache: KVCache, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                   key: jax.Array, group: int, capacity: int, pad_id: int,
                   rows: NamedSharding | None = None) -> DecodeState:
    B = logits_BV.shape[0]
    r = functools.partial(_on_rows, rows=rows)
    positions = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    last = prompt_tokens[:, -1]  # left padding: the last column is every row's last prompt token
    return DecodeState(cache, logits_BV, positions, last, r(jnp.zeros((B,), jnp.bool_)),
                       r(jnp.full((B, capacity), pad_id, jnp.int32)), r(jnp.zeros((B, capacity), jnp.float32)),
                       r(jnp.zeros((B, capacity), jnp.bool_)), r(jnp.zeros((B,), jnp.int32)),
                       r(_row_keys(key, B, group)), r(jnp.zeros((B,), jnp.int32)), prompt_tokens, prompt_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "feed_last", "unstack", "rows"),
                   donate_argnames=("state",))
def _decode_loop(params: Params, state: DecodeState, steps: jax.Array, max_length: jax.Array,
                 rule: StopRule | None, cfg: ModelConfig, sp: SamplingParams, feed_last: bool = True,
                 unstack: bool = False, rows: NamedSharding | None = None) -> DecodeState:
    """The one decode loop: up to `steps` tokens per row that is not done.

    Each iteration samples one token for every row from its logits; rows that were done
    before it keep their arrays and feed a masked-out slot. With `feed_last` every sampled
    token is fed to the model (the cache and logits then cover it: a continuable state);
    without, the last iteration skips its forward pass (`generate`'s single shot), leaving
    the final state's cache one token short.
    """
    B, M = state.tokens_BM.shape
    stop = jnp.asarray(sp.stop_ids or (-1,), jnp.int32)
    check_stop = bool(sp.stop_ids) and not sp.ignore_stop
    keys = jax.random.wrap_key_data(state.keys_BK)
    # Draw d of row r is uniform(key_r, (M,))[d]: the same value for any M > d (partitionable threefry).
    u_BM = None if sp.greedy else jax.vmap(lambda k: jax.random.uniform(k, (M,)))(keys)
    row_ids = jnp.arange(B)

    def record(s: DecodeState) -> tuple[DecodeState, jax.Array, jax.Array]:
        """Sample this step's token from the current logits and write it down."""
        if u_BM is None:
            u_B = jnp.zeros((B,), jnp.float32)
        else:
            u_B = jnp.take_along_axis(u_BM, jnp.minimum(s.draws_B, M - 1)[:, None], axis=1)[:, 0]
        token, logprob = draw_token(s.logits_BV, u_B, sp)
        live = ~s.done_B
        col = jnp.where(live, s.lengths_B, M)  # out of range: dropped
        tokens = s.tokens_BM.at[row_ids, col].set(token, mode="drop")
        logprobs = s.logprobs_BM.at[row_ids, col].set(logprob, mode="drop")
        sampled = s.sampled_BM.at[row_ids, col].set(True, mode="drop")
        lengths = s.lengths_B + live.astype(jnp.int32)
        ends = jnp.zeros((B,), jnp.bool_)
        if check_stop:
            ends = ends | jnp.isin(token, stop)
        if rule is not None:
            pair = jnp.any(rule.after_PV[:, s.last_B].T & rule.before_PV[:, token].T, axis=-1)
            ends = ends | rule.ids_V[token] | pair
        done = s.done_B | (live & (ends | (lengths >= max_length)))
        s = s._replace(tokens_BM=tokens, logprobs_BM=logprobs, sampled_BM=sampled, lengths_B=lengths, done_B=done,
                       draws_B=s.draws_B + live.astype(jnp.int32), last_B=jnp.where(live, token, s.last_B))
        return s, token, live

    def feed(s: DecodeState, token: jax.Array, live: jax.Array) -> DecodeState:
        logits, cache = forward(params, token[:, None], s.positions_B[:, None], cfg, mask_BT=live[:, None],
                                cache=s.cache)
        return s._replace(logits_BV=jnp.where(live[:, None], logits[:, 0], s.logits_BV),
                          positions_B=s.positions_B + live.astype(jnp.int32), cache=cache)

    last_fed = steps if feed_last else steps - 1

    def cond(c):
        i, s = c
        return (i < last_fed) & ~jnp.all(s.done_B)

    def body(c):
        i, s = c
        s, token, live = record(s)
        return i + 1, feed(s, token, live)

    r = functools.partial(_on_rows, rows=rows)
    s = state._replace(logits_BV=r(state.logits_BV), tokens_BM=r(state.tokens_BM), done_B=r(state.done_B),
                       lengths_B=r(state.lengths_B), cache=_cache_on_rows(state.cache, rows, unstack))
    i, s = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), s))
    if not feed_last:
        # The last token needs no forward pass; when every row stopped early nothing is live
        # and this writes nothing.
        s, _, _ = record(s)
    return s


def _ensure_room(state: DecodeState, slots: int, tokens: int, pad_id: int, buckets: Sequence[int]) -> DecodeState:
    """`state` with room for `slots` more cache slots and `tokens` more continuation tokens per
    row, growing either to a bucket length (`bucket_length`) when short."""
    index = int(state.cache.index)
    need_s = index + slots
    S = state.cache.mask_BS.shape[1]
    need_m = int(jnp.max(state.lengths_B)) + tokens
    M = state.tokens_BM.shape[1]
    if need_s <= S and need_m <= M:
        return state
    return _grow(state, max(S, bucket_length(need_s, buckets)), max(M, bucket_length(need_m, buckets)), pad_id)


@functools.partial(jax.jit, static_argnames=("slots", "capacity", "pad_id"))
def _grow(state: DecodeState, slots: int, capacity: int, pad_id: int) -> DecodeState:
    c = state.cache
    ds = slots - c.mask_BS.shape[1]
    dm = capacity - state.tokens_BM.shape[1]

    def pad(a, axis, n, value=0):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, n)
        return jnp.pad(a, widths, constant_values=value)

    k = jax.tree.map(lambda a: pad(a, a.ndim - 1, ds), c.k)
    v = jax.tree.map(lambda a: pad(a, a.ndim - 2, ds), c.v)
    return state._replace(cache=KVCache(k, v, pad(c.mask_BS, 1, ds), c.index),
                          tokens_BM=pad(state.tokens_BM, 1, dm, pad_id),
                          logprobs_BM=pad(state.logprobs_BM, 1, dm), sampled_BM=pad(state.sampled_BM, 1, dm))


def start(model: SamplerModel, prompts: Sequence[Sequence[int]], *, key: jax.Array, num_samples: int = 1,
          capacity: int | None = None, slots: int | None = None,
          buckets: Sequence[int] = DEFAULT_BUCKETS) -> DecodeState:
    """Prefill: a `DecodeState` of ``len(prompts) * num_samples`` rows, row ``n * G + g`` being
    sample g of prompt n (one prefill per prompt, the cache repeated G times).

    Prompts are left-padded to a bucket length P. `capacity` (continuation tokens) and
    `slots` (cache slots) default to the smallest bucket and grow in buckets on demand
    (`decode` / `extend` reallocate when short); giving them avoids regrowing. Row r's
    random stream is keyed ``fold_in(fold_in(key, n), g)``, as in `generate`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JaxsqlError("start: give at least one prompt, each with at least one token")
    if num_samples < 1:
        raise JaxsqlError("start: num_samples must be >= 1")
    cfg = model.cfg
    pad = model.pad_id
    if len(prompts) % model.shards:
        raise JaxsqlError(f"start: {len(prompts)} prompts do not split over the {model.shards} devices of the "
                          f"batch axes; use a multiple of {model.shards}")
    P = bucket_length(max(len(p) for p in prompts), buckets)
    capacity = capacity or min(buckets)
    slots = max(slots or 0, P + capacity)
    tokens_NP, mask_NP = left_pad(prompts, P, pad)
    if model.rows is not None:
        from jaxsql import distributed

        tokens_NP, mask_NP = (distributed.to_global(a, model.rows, a.shape) for a in (tokens_NP, mask_NP))
    with on_mesh_of(model.params):
        logits, cache, prompt_tokens, prompt_mask = _prefill(model.params, jnp.asarray(tokens_NP),
                                                             jnp.asarray(mask_NP), cfg, num_samples, slots,
                                                             model.unstack, model.rows)
    return _initial_state(logits, cache, prompt_tokens, prompt_mask, key, num_samples, capacity, pad, model.rows)


def decode(model: SamplerModel, state: DecodeState, steps: int, *, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, greedy: bool = False, stop_ids: Sequence[int] | None = None,
           stop: StopRule | None = None, max_length: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS) -> DecodeState:
    """Sample up to `steps` tokens for every row that is not done; returns the new state
    (`state` is donated: do not use it again, `fork` it first to keep it).

    A row stops at a stop token (`stop_ids`, default the config's EOS ids; they are kept
    as its last token), at the `stop` rule, or once its continuation holds `max_length`
    tokens; it is then done. Every sampled token is fed to the model, so the returned
    state continues exactly where an uninterrupted decode would be: same tokens for
    greedy, and for sampling too (each row draws from its own uniform stream, position
    ``draws_B``). Cost: the loop runs until every row is done or `steps` iterations, and
    each iteration is one forward pass of the whole batch: a done row costs its share of
    that pass (its slot is masked out, its arrays are not touched) but no extra pass.
    Compiles once per (batch, capacity, cache slots, sampling settings); `steps` and
    `max_length` are traced values.
    """
    sp = _sampling_params(model.cfg, temperature, top_p, top_k, greedy, stop_ids, False, model.pad_id)
    if steps < 0:
        raise JaxsqlError(f"decode: steps must be >= 0, got {steps}")
    state = _ensure_room(state, steps, steps, model.pad_id, buckets)
    limit = np.int32(max_length if max_length is not None else np.iinfo(np.int32).max)
    return _decode_loop(model.params, state, jnp.int32(steps), jnp.asarray(limit), stop, model.cfg, sp, True,
                        model.unstack, model.rows)


@functools.partial(jax.jit, static_argnames=("cfg", "unstack", "rows"))
def _extend(params: Params, state: DecodeState, block_BE: jax.Array, n_B: jax.Array, cfg: ModelConfig,
            unstack: bool, rows: NamedSharding | None = None) -> DecodeState:
    B, E = block_BE.shape
    M = state.tokens_BM.shape[1]
    mask_BE = jnp.arange(E)[None, :] >= (E - n_B)[:, None]  # each row's tokens end the block
    positions_BE = state.positions_B[:, None] + jnp.maximum(jnp.cumsum(mask_BE, axis=1, dtype=jnp.int32) - 1, 0)
    h, cache = hidden_states(params, block_BE, positions_BE, cfg, mask_BT=mask_BE,
                             cache=_cache_on_rows(state.cache, rows, unstack), last_only=True)
    logits_BV = output_logits(params, h, cfg)[:, 0]
    some = n_B > 0
    cols = jnp.where(mask_BE, state.lengths_B[:, None] + jnp.arange(E)[None, :] - (E - n_B)[:, None], M)
    row_ids = jnp.arange(B)[:, None]
    r = functools.partial(_on_rows, rows=rows)
    return state._replace(
        cache=cache, logits_BV=r(jnp.where(some[:, None], logits_BV, state.logits_BV)),
        positions_B=state.positions_B + n_B, last_B=jnp.where(some, block_BE[:, -1], state.last_B),
        done_B=state.done_B & ~some, tokens_BM=state.tokens_BM.at[row_ids, cols].set(block_BE, mode="drop"),
        logprobs_BM=state.logprobs_BM.at[row_ids, cols].set(0.0, mode="drop"),
        sampled_BM=state.sampled_BM.at[row_ids, cols].set(False, mode="drop"), lengths_B=state.lengths_B + n_B)


def extend(model: SamplerModel, state: DecodeState, tokens_per_row: Sequence[Sequence[int]], *,
           buckets: Sequence[int] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)) -> DecodeState:
    """Append tokens to each row (ragged; an empty list appends nothing) and prefill them into
    the cache; returns the new state.

    The appended tokens are part of the row from then on (``tokens_BM``, with
    ``sampled_BM`` False and log-prob 0), the next-token logits are those after them, and a
    row that receives tokens is no longer done. One forward pass over a block of E slots
    (the longest list, bucketed), each row's tokens right-aligned in it; the rows'
    positions continue from their own counts, so decoding after `extend` with X equals
    decoding after a `start` on the prompt followed by X (up to float rounding).
    """
    if len(tokens_per_row) != state.done_B.shape[0]:
        raise JaxsqlError(f"extend: {len(tokens_per_row)} token lists for {state.done_B.shape[0]} rows")
    longest = max((len(t) for t in tokens_per_row), default=0)
    if longest == 0:
        return state
    E = bucket_length(longest, buckets)
    state = _ensure_room(state, E, longest, model.pad_id, buckets)
    block, _ = left_pad(tokens_per_row, E, model.pad_id)
    n = np.asarray([len(t) for t in tokens_per_row], np.int32)
    block, n = jnp.asarray(block), jnp.asarray(n)
    with on_mesh_of(model.params):  # E > 1 new tokens: `auto` can place splash per chip
        return _extend(model.params, state, block, n, model.cfg, model.unstack, model.rows)


@functools.partial(jax.jit, static_argnames=("unstack",))
def _fork(state: DecodeState, idx: jax.Array, unstack: bool) -> DecodeState:
    take = functools.partial(jnp.take, indices=idx, axis=0)
    take_kv = take if unstack else functools.partial(jnp.take, indices=idx, axis=1)  # stacked [L, B, ...]
    c = state.cache
    cache = KVCache(jax.tree.map(take_kv, c.k), jax.tree.map(take_kv, c.v), take(c.mask_BS), c.index)
    rest = {f: take(getattr(state, f)) for f in DecodeState._fields if f != "cache"}
    return DecodeState(cache=cache, **rest)


def fork(model: SamplerModel, state: DecodeState, rows: Sequence[int]) -> DecodeState:
    """A new state whose row i is row ``rows[i]`` of `state` (copied, cache included; rows may
    repeat: beam expansion, best-of-k). `state` stays valid. Copies keep their random keys
    and stream positions, so they draw the same tokens until `reseed`."""
    idx = np.asarray(rows, np.int32)
    if idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= state.done_B.shape[0]:
        raise JaxsqlError(f"fork: row indices must be a non-empty list in [0, {state.done_B.shape[0]})")
    return _fork(state, jnp.asarray(idx), model.unstack)


def reseed(state: DecodeState, key: jax.Array, sample_ids: Sequence[int] | None = None) -> DecodeState:
    """Give row r the random stream ``fold_in(key, sample_ids[r])`` (default r), from its start."""
    ids = jnp.arange(state.done_B.shape[0]) if sample_ids is None else jnp.asarray(sample_ids, jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    data = jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
    return state._replace(keys_BK=data.astype(state.keys_BK.dtype), draws_B=jnp.zeros_like(state.draws_B))


def resume(state: DecodeState, rows: Sequence[int] | None = None) -> DecodeState:
    """Clear the done flag of `rows` (default: every row) so that `decode` continues them."""
    if rows is None:
        return state._replace(done_B=jnp.zeros_like(state.done_B))
    return state._replace(done_B=state.done_B.at[jnp.asarray(rows, jnp.int32)].set(False))


def tokens(state: DecodeState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [B, M], sampled mask [B, M], lengths [B]) of the continuations, on the host."""
    t, s, n = jax.device_get((state.tokens_BM, state.sampled_BM, state.lengths_B))
    return np.asarray(t), np.asarray(s), np.asarray(n)


def _sampling_params(cfg: ModelConfig, temperature: float, top_p: float, top_k: int, greedy: bool,
                     stop_ids: Sequence[int] | None, ignore_stop: bool, pad_id: int | None) -> SamplingParams:
    if not greedy and temperature <= 0:
        raise JaxsqlError(f"generate: temperature must be > 0 (got {temperature}); use greedy=True for argmax")
    if not 0.0 < top_p <= 1.0:
        raise JaxsqlError(f"generate: top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or top_k > cfg.vocab_size:
        raise JaxsqlError(f"generate: top_k must be in [0, vocab_size], got {top_k}")
    stop = tuple(int(s) for s in (cfg.eos_token_ids if stop_ids is None else stop_ids))
    pad = int(pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0))
    return SamplingParams(float(temperature), float(top_p), int(top_k), bool(greedy), stop, bool(ignore_stop), pad)


def batch_sharding(params: Params, rules: ShardingRules | None = None) -> tuple[Any, int]:
    """How `generate` splits its rows: (sharding of [rows, P] prompt arrays, number of row shards).

    Rows go over the batch mesh axes (``rules.batch``, default "data" and
    "fsdp") of the mesh the parameters live on, so every device decodes its
    share of the batch (data parallel); batch axes of size 1 give one
    (replicated) shard. Parameters that are not on a mesh give (None, 1).
    """
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None, 1
    mesh = sharding.mesh
    batch = (rules or ShardingRules()).mesh_axes("batch")
    names = [n for n in ((batch,) if isinstance(batch, str) else batch or ()) if mesh.shape[n] > 1]
    shards = math.prod(mesh.shape[n] for n in names)
    if shards == 1 and mesh.size == 1:
        return None, 1
    return NamedSharding(mesh, PartitionSpec(tuple(names) or None, None)), shards


def sampling_devices(param_bytes: int, devices: Sequence[Any] | None = None) -> list[Any]:
    """The devices to split a standalone sampling batch over ("auto" of ``--devices``).

    Accelerators: all of them. CPU devices (one per core, see
    `jaxsql.distributed.configure_cpu_devices`): all of them when one copy
    of the parameters fits in the last-level cache, else one. Each device
    holds a replica and streams it once per decoding step for its share of
    the rows: small models gain from keeping every core busy (tiny: 1.3x
    faster decoding on 2 cores), while for models larger than the cache the
    doubled weight traffic makes the big matmuls memory-bound (mid: 1.2x
    slower), and one device already keeps both cores busy on their wide GEMMs.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1 or devices[0].platform != "cpu":
        return devices
    cache = last_level_cache_bytes()
    return devices if cache is not None and param_bytes <= cache else devices[:1]
