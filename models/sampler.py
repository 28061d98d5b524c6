"""Autoregressive sampling: left-padded prompt buckets, dense KV cache, jitted prefill + decode loop.

`generate` left-pads the prompts to a bucket length (so the number of
compiled shapes stays small), runs one jitted prefill over the N prompts,
repeats the cache G times (G samples per prompt share one prefill), then
one jitted `lax.while_loop` decodes up to `max_new_tokens` tokens with its
state (cache included) donated so XLA updates it in place. The loop stops
early once every row has produced a stop token.

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

import functools
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxsql.errors import JaxsqlError
from jaxsql.sharding import ShardingRules
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


def row_uniforms(key: jax.Array, rows: int, group: int, steps: int) -> jax.Array:
    """[rows, steps] uniforms in [0, 1): entry (r, t) drives step t of row r = sample r % group
    of prompt r // group, from ``fold_in(fold_in(key, prompt), sample)``.

    A row's randomness depends only on the key, its prompt's position in the
    global batch and its sample index, so the same rows draw the same tokens
    however the batch is split over devices and processes.
    """
    r = jnp.arange(rows)

    def one(prompt, sample):
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, prompt), sample), (steps,))

    return jax.vmap(one)(r // group, r % group)


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


class _LoopState(NamedTuple):
    step: jax.Array
    logits_BV: jax.Array
    tokens_BM: jax.Array
    logprobs_BM: jax.Array
    done_B: jax.Array
    lengths_B: jax.Array
    positions_B: jax.Array
    cache: KVCache


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "max_new", "group", "unstack", "rows"),
                   donate_argnames=("logits_BV", "cache"))
def _decode(params: Params, logits_BV: jax.Array, cache: KVCache, positions_B: jax.Array, key: jax.Array,
            cfg: ModelConfig, sp: SamplingParams, max_new: int, group: int, unstack: bool = False,
            rows: NamedSharding | None = None):
    B = logits_BV.shape[0]
    stop = jnp.asarray(sp.stop_ids or (-1,), jnp.int32)
    check_stop = bool(sp.stop_ids) and not sp.ignore_stop
    u_BM = None if sp.greedy else row_uniforms(key, B, group, max_new)

    def record(s: _LoopState) -> tuple[_LoopState, jax.Array]:
        """Sample this step's token from the current logits and write it down."""
        u_B = jnp.zeros((B,), jnp.float32) if u_BM is None else jax.lax.dynamic_index_in_dim(u_BM, s.step, 1, False)
        token, logprob = draw_token(s.logits_BV, u_B, sp)
        token = jnp.where(s.done_B, sp.pad_id, token)
        logprob = jnp.where(s.done_B, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice(s.tokens_BM, token[:, None], (0, s.step))
        logprobs = jax.lax.dynamic_update_slice(s.logprobs_BM, logprob[:, None], (0, s.step))
        lengths = s.lengths_B + (~s.done_B).astype(jnp.int32)
        done = s.done_B | (jnp.isin(token, stop) if check_stop else False)
        return s._replace(step=s.step + 1, tokens_BM=tokens, logprobs_BM=logprobs, done_B=done,
                          lengths_B=lengths), token

    def cond(s: _LoopState):
        return (s.step < max_new - 1) & ~jnp.all(s.done_B)

    def body(s: _LoopState) -> _LoopState:
        s, token = record(s)
        logits, cache = forward(params, token[:, None], s.positions_B[:, None], cfg,
                                mask_BT=jnp.ones((B, 1), jnp.bool_), cache=s.cache)
        return s._replace(logits_BV=logits[:, 0], positions_B=s.positions_B + 1, cache=cache)

    r = functools.partial(_on_rows, rows=rows)
    init = _LoopState(jnp.zeros((), jnp.int32), r(logits_BV), r(jnp.full((B, max_new), sp.pad_id, jnp.int32)),
                      r(jnp.zeros((B, max_new), jnp.float32)), r(jnp.zeros((B,), jnp.bool_)),
                      r(jnp.zeros((B,), jnp.int32)), r(positions_B), _cache_on_rows(cache, rows, unstack))
    out = jax.lax.while_loop(cond, body, init)
    # The last token needs no forward pass; if every row stopped early, the write below is
    # padding at a column that is already padding.
    out, _ = record(out._replace(step=jnp.minimum(out.step, max_new - 1)))
    # The final logits and cache are returned so the donated input buffers can be aliased to them.
    return r(out.tokens_BM), r(out.logprobs_BM), r(out.lengths_B), out.logits_BV, out.cache


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
    if not greedy and temperature <= 0:
        raise JaxsqlError(f"generate: temperature must be > 0 (got {temperature}); use greedy=True for argmax")
    if not 0.0 < top_p <= 1.0:
        raise JaxsqlError(f"generate: top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or top_k > cfg.vocab_size:
        raise JaxsqlError(f"generate: top_k must be in [0, vocab_size], got {top_k}")
    stop = tuple(int(s) for s in (cfg.eos_token_ids if stop_ids is None else stop_ids))
    pad = int(pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0))
    sp = SamplingParams(float(temperature), float(top_p), int(top_k), bool(greedy), stop, bool(ignore_stop), pad)

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
    if unstack:
        params = _cpu_layout(params, cfg)  # a copy, local to this call
        run_cfg = cfg.replace(tie_word_embeddings=False)  # the embedding's transpose is now lm_head
    logits, cache, prompt_tokens, prompt_mask = _prefill(params, tokens_NP, mask_NP, run_cfg, num_samples,
                                                         P + max_new_tokens, unstack, rows_sharding)
    positions = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    tokens, logprobs, lengths, _, _ = _decode(params, logits, cache, positions, key, run_cfg, sp, max_new_tokens,
                                              num_samples, unstack, rows_sharding)
    out = SampleOutput(tokens, logprobs, lengths, prompt_tokens, prompt_mask)
    if filler:
        out = SampleOutput(*(a[:N * num_samples] for a in out))
    return out


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


def last_level_cache_bytes() -> int | None:
    """Size of CPU 0's largest cache (Linux sysfs), or None when it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        try:
            value = int(text.rstrip("KMG"))
        except ValueError:
            continue
        sizes.append(value * {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1))
    return max(sizes) if sizes else None


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
