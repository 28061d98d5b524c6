"""The decoder, top to bottom: parameters, rotary embeddings, attention, MLP, forward.

One pure-functional definition covers HF ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM`` and ``LlamaForCausalLM`` (see `models.config`):
pre-norm residual blocks of grouped-query attention with rotary position
embeddings and a SwiGLU MLP, RMSNorm everywhere, tied or untied output head.

Parameters are a plain nested dict of arrays. The per-layer tensors are
stacked on a leading ``layers`` axis and the blocks run under `jax.lax.scan`,
so compile time does not grow with depth. Every leaf has logical axis names
(`param_axes`) that `jaxsql.sharding.ShardingRules` maps onto the mesh.

Shapes are written in names: B batch, T query positions, S key/cache slots,
D hidden (embed), N query heads, K key/value heads, G = N // K query heads
per KV head, H head_dim, F MLP width, V vocabulary, L layers.

Padding is on the left: ``mask_BT`` is 1 for real tokens and 0 for padding;
pad keys are never attended to, and `positions_from_mask` numbers the real
tokens 0, 1, 2, ... so a left-padded row computes exactly what the unpadded
sequence would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import MaskParts, attend
from models.config import ModelConfig

Params = dict[str, Any]

# --- parameters ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axes and initialiser ("normal", "ones" or "zeros") of one leaf."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str


def param_specs(cfg: ModelConfig) -> Params:
    """The parameter pytree's structure, as `ParamSpec` leaves."""
    D, F, H, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    N, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", None), "ones"),
        "wq": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal"),
        "wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ParamSpec((L, D), ("layers", None), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        layers["bq"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        layers["bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        layers["q_norm"] = ParamSpec((L, H), ("layers", None), "ones")
        layers["k_norm"] = ParamSpec((L, H), ("layers", None), "ones")
    specs: Params = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layers,
        "final_norm": ParamSpec((D,), (None,), "ones"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> Params:
    """Pytree of logical-axis tuples, same structure as the parameters."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> Params:
    """Pytree of `jax.ShapeDtypeStruct` (param_dtype), same structure as the parameters."""
    dt = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, mesh, rules=None) -> Params:
    """Pytree of `NamedSharding` for the parameters on `mesh`."""
    from jaxsql.sharding import tree_shardings

    return tree_shardings(param_axes(cfg), mesh, rules, param_shapes(cfg), what="parameter")


def init_params(cfg: ModelConfig, key: jax.Array, mesh=None, rules=None, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norms, zero biases).

    Runs under `jax.jit(out_shardings=...)` so each leaf is created directly
    on its sharding when a mesh is given.
    """
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    dt = jnp.dtype(cfg.param_dtype)

    def _init(key):
        out = []
        for i, s in enumerate(leaves):
            if s.init == "normal":
                out.append((std * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)).astype(dt))
            elif s.init == "ones":
                out.append(jnp.ones(s.shape, dt))
            else:
                out.append(jnp.zeros(s.shape, dt))
        return jax.tree.unflatten(treedef, out)

    shardings = None if mesh is None else param_shardings(cfg, mesh, rules)
    return jax.jit(_init, out_shardings=shardings)(key)


def cast_params(params: Params, dtype: Any) -> Params:
    """A copy of `params` with every floating-point leaf in `dtype`, on the same shardings.

    Mixed precision keeps float32 master weights for the optimizer; the
    sampler and the reference model only read the weights, so they can run
    from a bfloat16 copy (half the memory and bandwidth). A leaf already in
    `dtype` is copied too, so the result never aliases a buffer that a
    donated train state may invalidate.
    """
    dt = jnp.dtype(dtype)

    def cast(x):
        if x.dtype != dt and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dt)
        return jnp.array(x, copy=True)  # jit would hand an unchanged input back as the same buffer

    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), params)
    if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda s: s is None)):
        return jax.jit(lambda p: jax.tree.map(cast, p))(params)
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


# --- KV cache -----------------------------------------------------------------


class KVCache(NamedTuple):
    """Dense KV cache for all layers: keys `k` are [L, B, K, H, S] and values `v`
    [L, B, K, S, H] arrays (stacked layers), or tuples of L arrays [B, K, H, S] /
    [B, K, S, H] to go with unstacked parameters (`unstack_layers`).

    Slots [0, index) are written; ``mask_BS`` marks the written slots that
    hold real (non-pad) tokens. All rows share one write `index`, which is
    why prompts are left-padded to a common length. Heads come before slots
    so that a layer's cache is already in the layout of the attention
    contractions (no per-step transpose). Keys are stored transposed, slots
    last: a decoding step's q.k products then run along contiguous slots
    (the softmax axis) and the p.v products along contiguous head_dim, which
    halved the cost of streaming the cache on CPU.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    mask_BS: jax.Array
    index: jax.Array

    # Logical axes of each array (`jaxsql.sharding.ShardingRules` maps them onto the mesh, as
    # for parameters): stacked keys [L, B, K, H, S], values [L, B, K, S, H].
    K_AXES = ("layers", "batch", "kv_heads", "head_dim", "cache_seq")
    V_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")

    @classmethod
    def axes(cls, num_layers: int | None = None) -> "KVCache":
        """A KVCache of logical-axis tuples, one per array: of the stacked layout, or of the
        per-layer layout (tuples of `num_layers` arrays without the ``layers`` axis)."""
        if num_layers is None:
            k, v = cls.K_AXES, cls.V_AXES
        else:
            k, v = (cls.K_AXES[1:],) * num_layers, (cls.V_AXES[1:],) * num_layers
        return cls(k, v, ("batch", "cache_seq"), ())

    def repeat_rows(self, times: int) -> "KVCache":
        """Each row repeated `times` times, in place (rows r, r, ..., r+1, ...): a prompt's
        cache for its G completions. Works for both layouts; the write index is shared."""
        if isinstance(self.k, tuple):
            k = tuple(jnp.repeat(a, times, axis=0) for a in self.k)
            v = tuple(jnp.repeat(a, times, axis=0) for a in self.v)
        else:
            k, v = jnp.repeat(self.k, times, axis=1), jnp.repeat(self.v, times, axis=1)
        return self._replace(k=k, v=v, mask_BS=jnp.repeat(self.mask_BS, times, axis=0))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None, per_layer: bool = False) -> KVCache:
    """An empty cache of `max_len` slots (dtype defaults to the compute dtype).

    `per_layer` gives tuples of per-layer arrays, for unstacked parameters.
    """
    dt = jnp.dtype(dtype or cfg.compute_dtype)
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if per_layer:
        k = tuple(jnp.zeros(k_shape, dt) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.num_layers))
    else:
        k, v = jnp.zeros((cfg.num_layers, *k_shape), dt), jnp.zeros((cfg.num_layers, *v_shape), dt)
    return KVCache(k, v, jnp.zeros((batch, max_len), jnp.bool_), jnp.zeros((), jnp.int32))


def unstack_layers(params: Params, fuse: bool = False) -> Params:
    """Parameters with ``layers`` as a tuple of per-layer dicts instead of stacked arrays.

    `hidden_states` then runs the layers as an unrolled Python loop. Used by
    the sampler on CPU, where slicing a layer out of a stacked weight inside
    the decode loop copies it on every step; it costs one copy of the layer
    weights (do it inside jit so the copy is transient).

    `fuse` also concatenates each layer's q, k and v projections into one
    ``w_qkv`` [D, (N + 2K) H] (biases into ``b_qkv``) and the gate and up
    projections into one ``w_gate_up`` [D, 2F], so a decoding step runs two
    wide GEMMs where it ran five narrow ones (the copy is made anyway).
    """
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    per_layer = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]
    if fuse:
        per_layer = [_fuse_layer(lp) for lp in per_layer]
    return {**params, "layers": tuple(per_layer)}


def _fuse_layer(lp: Params) -> Params:
    """One layer's parameters with fused ``w_qkv`` (``b_qkv``) and ``w_gate_up`` (see `unstack_layers`)."""
    out = {k: v for k, v in lp.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
    D = lp["wq"].shape[0]
    out["w_qkv"] = jnp.concatenate([lp[w].reshape(D, -1) for w in ("wq", "wk", "wv")], axis=1)
    if "bq" in lp:
        out["b_qkv"] = jnp.concatenate([lp[b].reshape(-1) for b in ("bq", "bk", "bv")])
    out["w_gate_up"] = jnp.concatenate([lp["w_gate"], lp["w_up"]], axis=1)
    return out


# --- building blocks ------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = x / sqrt(mean(x^2) + eps) * weight, statistics in float32 (as HF)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies theta^(-2i/H), with Llama 3 scaling when configured.

    Llama 3 (transformers ``_compute_llama3_parameters``): wavelengths longer
    than original_max / low_freq_factor are divided by `factor`, shorter than
    original_max / high_freq_factor kept, and in between interpolated with
    s = (original_max / wavelen - low) / (high - low).
    """
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    inv = inv.astype(np.float32)
    if cfg.rope_scaling is None:
        return inv
    r = cfg.rope_scaling_dict
    factor, low, high = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
    old = r["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BT: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * inv_freq, each [B, T, H/2] float32."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Rotate the two halves of each head (HF ``rotate_half`` layout, not interleaved)."""
    half = x_BTNH.shape[-1] // 2
    x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
    cos, sin = cos_BTh[:, :, None, :].astype(x_BTNH.dtype), sin_BTh[:, :, None, :].astype(x_BTNH.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q_BTNH: jax.Array, kT_BKHS: jax.Array, v_BKSH: jax.Array, allowed_BTS: jax.Array) -> jax.Array:
    """Grouped-query softmax(q k^T / sqrt(H)) v; disallowed keys get zero weight.

    Keys come transposed (slots last, the `KVCache` layout). Scores and
    softmax in float32. A query row with no allowed key (a pad query) gets
    uniform weights instead of NaN; its output is never used.
    """
    B, T, N, H = q_BTNH.shape
    K = kT_BKHS.shape[1]
    if T == 1:
        # One query per row (decoding): broadcast-multiply-reduce streams the cache once, along
        # contiguous slots for the keys and contiguous head_dim for the values.
        q = q_BTNH.reshape(B, K, N // K, H, 1).astype(jnp.float32)
        scores = jnp.sum(q * kT_BKHS[:, :, None].astype(jnp.float32), axis=3) * (H ** -0.5)  # BKGS
        scores = jnp.where(allowed_BTS[:, :, None, :], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.sum(probs[..., None] * v_BKSH[:, :, None].astype(jnp.float32), axis=3)  # BKGH
        return out.astype(v_BKSH.dtype).reshape(B, 1, N, H)
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BKHS->BKGTS", q, kT_BKHS, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    scores = jnp.where(allowed_BTS[:, None, None, :, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BKSH)
    return out.reshape(B, T, N, H)


def _remat_policy(name: str):
    return {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


# --- forward ----------------------------------------------------------------------


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def hidden_states(params: Params, tokens_BT: jax.Array, positions_BT: jax.Array, cfg: ModelConfig, *,
                  mask_BT: jax.Array | None = None, cache: KVCache | None = None, fill_cache: int | None = None,
                  last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states [B, T, D] (compute dtype) and the updated cache.

    Without a cache, token t attends to tokens <= t of its row that are not
    padding. With a cache, the T new tokens are written to slots
    [index, index + T) and attend to every earlier real slot.

    ``fill_cache=S`` (no `cache` given) is a prefill: the tokens attend only
    to each other, as without a cache, and their keys and values come back
    as a new cache of S >= T slots (index T), so no work is spent on the
    S - T empty slots. ``last_only`` returns the hidden state of the last
    position only, [B, 1, D]; with unstacked layers (`unstack_layers`) the
    last layer then computes its attention output and MLP for that position
    alone (its keys and values still cover every position).
    """
    cdt = jnp.dtype(cfg.compute_dtype)
    B, T = tokens_BT.shape
    if cache is not None and fill_cache is not None:
        raise ValueError("hidden_states: give either a cache to extend or fill_cache, not both")
    if fill_cache is not None and fill_cache < T:
        raise ValueError(f"hidden_states: fill_cache={fill_cache} is shorter than the {T} tokens")
    mask_BT = jnp.ones((B, T), jnp.bool_) if mask_BT is None else mask_BT.astype(jnp.bool_)
    cos, sin = rope_tables(positions_BT, cfg)
    x_BTD = jnp.take(params["embed"], tokens_BT, axis=0).astype(cdt)

    if cache is None:
        causal_TS = jnp.tril(jnp.ones((T, T), jnp.bool_))
        allowed_BTS = causal_TS[None] & mask_BT[:, None, :]
        mask_parts = MaskParts(mask_BT, mask_BT, None)  # the same facts for the attention kernels
    else:
        S = cache.mask_BS.shape[1]
        key_mask_BS = jax.lax.dynamic_update_slice(cache.mask_BS, mask_BT, (0, cache.index))
        q_slot_T = cache.index + jnp.arange(T)
        allowed_BTS = (jnp.arange(S)[None, None, :] <= q_slot_T[None, :, None]) & key_mask_BS[:, None, :]
        mask_parts = MaskParts(mask_BT, key_mask_BS, cache.index)

    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(x_X, w):  # a plain 2-D GEMM: [rows, X] @ [X, Y], the layout CPU and TPU like best
        w2 = w.astype(cdt).reshape(x_X.shape[-1], -1)
        return (x_X.reshape(-1, x_X.shape[-1]) @ w2).reshape(*x_X.shape[:-1], *w.shape[1:])

    def block(x_BTD, lp, update_kv, last=False):
        h = rms_norm(x_BTD, lp["attn_norm"], cfg.rms_norm_eps)
        if "w_qkv" in lp:  # fused (see unstack_layers): one GEMM, then split the columns
            qkv = proj(h, lp["w_qkv"])
            if cfg.qkv_bias:
                qkv = qkv + lp["b_qkv"].astype(cdt)
            q = qkv[..., :N * H].reshape(B, T, N, H)
            k = qkv[..., N * H:(N + K) * H].reshape(B, T, K, H)
            v = qkv[..., (N + K) * H:].reshape(B, T, K, H)
        else:
            q = proj(h, lp["wq"])  # BTD,DNH->BTNH
            k = proj(h, lp["wk"])  # BTD,DKH->BTKH
            v = proj(h, lp["wv"])
            if cfg.qkv_bias:
                q, k, v = q + lp["bq"].astype(cdt), k + lp["bk"].astype(cdt), v + lp["bv"].astype(cdt)
        if cfg.qk_norm:
            q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kT, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # BTKH -> BKHT (keys), BKTH (values)
        keys, values, kv_state = update_kv(kT, v)
        allowed = allowed_BTS
        if last:  # past the keys and values, only the last position matters
            q, x_BTD, allowed = q[:, -1:], x_BTD[:, -1:], allowed_BTS[:, -1:]
        a = attend(q, keys.astype(cdt), values.astype(cdt), allowed, mask_parts, cfg.attention, cfg.compute_dtype,
                   reference=attention)  # models.attention: cfg.attention picks the implementation
        x_BTD = x_BTD + proj(a.reshape(*a.shape[:2], N * H), lp["wo"].reshape(N * H, -1))  # BTNH,NHD->BTD
        h = rms_norm(x_BTD, lp["mlp_norm"], cfg.rms_norm_eps)
        if "w_gate_up" in lp:
            gate_up = proj(h, lp["w_gate_up"])
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate, up = proj(h, lp["w_gate"]), proj(h, lp["w_up"])  # BTD,DF->BTF
        x_BTD = x_BTD + proj(jax.nn.silu(gate) * up, lp["w_down"])  # BTF,FD->BTD
        return x_BTD, kv_state

    def no_cache(kT, v):
        return kT, v, None

    def keep_kv(kT, v):
        return kT, v, (kT, v)

    def write_slots(kc_BKHS, vc_BKSH, kT, v, layer=()):
        """Write the new slots into one layer's cache (or, given `layer`, into the stacked cache)."""
        lead = (1,) * len(layer)
        kc = jax.lax.dynamic_update_slice(kc_BKHS, kT.reshape(lead + kT.shape).astype(kc_BKHS.dtype),
                                          (*layer, 0, 0, 0, cache.index))
        vc = jax.lax.dynamic_update_slice(vc_BKSH, v.reshape(lead + v.shape).astype(vc_BKSH.dtype),
                                          (*layer, 0, 0, cache.index, 0))
        return kc, vc

    layers = params["layers"]
    update_mode = keep_kv if fill_cache is not None else no_cache
    if isinstance(layers, (tuple, list)):  # unstacked (see unstack_layers): an unrolled loop
        ks, vs = [], []
        for i, lp in enumerate(layers):
            last = last_only and i == len(layers) - 1
            if cache is None:
                x_BTD, kv = block(x_BTD, lp, update_mode, last)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
                continue

            def update(kT, v, i=i):
                kc, vc = write_slots(cache.k[i], cache.v[i], kT, v)
                return kc, vc, (kc, vc)

            x_BTD, (kc, vc) = block(x_BTD, lp, update, last)
            ks.append(kc)
            vs.append(vc)
        if cache is not None:
            new_cache = KVCache(tuple(ks), tuple(vs), key_mask_BS, cache.index + T)
        elif fill_cache is not None:
            new_cache = _new_cache(tuple(ks), tuple(vs), mask_BT, fill_cache)
        else:
            new_cache = None
    elif cache is None:
        def body(x, lp):
            x, kv = block(x, lp, update_mode)
            return x, kv

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(cfg.remat), prevent_cse=False)
        x_BTD, kv_L = jax.lax.scan(body, x_BTD, layers)
        new_cache = None if fill_cache is None else _new_cache(kv_L[0], kv_L[1], mask_BT, fill_cache)
    elif cfg.remat != "none":
        # Differentiated through a cache (the grouped update: completions attending to their
        # prompt's keys): each layer's cache slice is a scanned input, not part of a carried
        # cache, so the remat'd body saves only x per layer (a carried cache would be saved once
        # per layer). Only the new slots leave the scan; they are written into the cache after it.
        def body(x, xs):
            lp, kc_BKHS, vc_BKSH = xs

            def update(kT, v):
                kc, vc = write_slots(kc_BKHS, vc_BKSH, kT, v)
                return kc, vc, (kT, v)

            return block(x, lp, update)

        body = jax.checkpoint(body, policy=_remat_policy(cfg.remat), prevent_cse=False)
        x_BTD, (kT_L, v_L) = jax.lax.scan(body, x_BTD, (layers, cache.k, cache.v))
        k_all = jax.lax.dynamic_update_slice(cache.k, kT_L.astype(cache.k.dtype), (0, 0, 0, 0, cache.index))
        v_all = jax.lax.dynamic_update_slice(cache.v, v_L.astype(cache.v.dtype), (0, 0, 0, cache.index, 0))
        new_cache = KVCache(k_all, v_all, key_mask_BS, cache.index + T)
    else:
        def body(carry, lp):
            x, kc_all, vc_all, layer = carry

            def update(kT, v):
                # Write the new slots in place: the whole cache rides in the scan carry, so XLA
                # updates it without copying; then read this layer's keys back.
                kc, vc = write_slots(kc_all, vc_all, kT, v, layer=(layer,))
                return kc[layer], vc[layer], (kc, vc)

            x, (kc_all, vc_all) = block(x, lp, update)
            return (x, kc_all, vc_all, layer + 1), None

        init = (x_BTD, cache.k, cache.v, jnp.zeros((), jnp.int32))
        (x_BTD, k_all, v_all, _), _ = jax.lax.scan(body, init, layers)
        new_cache = KVCache(k_all, v_all, key_mask_BS, cache.index + T)

    if last_only:
        x_BTD = x_BTD[:, -1:]
    return rms_norm(x_BTD, params["final_norm"], cfg.rms_norm_eps), new_cache


def _new_cache(k: Any, v: Any, mask_BT: jax.Array, slots: int) -> KVCache:
    """A cache of `slots` slots holding the keys and values of T prompt tokens (index T).

    `k` / `v` are [L, B, K, H, T] / [L, B, K, T, H] arrays or tuples of per-layer arrays.
    """
    T = mask_BT.shape[1]

    def pad(a, axis):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, slots - T)
        return jnp.pad(a, widths)

    k = jax.tree.map(lambda a: pad(a, a.ndim - 1), k)  # slots are the last axis of keys
    v = jax.tree.map(lambda a: pad(a, a.ndim - 2), v)
    return KVCache(k, v, pad(mask_BT, 1), jnp.asarray(T, jnp.int32))


def output_logits(params: Params, h_BTD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Float32 logits [B, T, V] from final hidden states (tied: the embedding matrix)."""
    cdt = jnp.dtype(cfg.compute_dtype)
    if cfg.tie_word_embeddings:
        return jnp.einsum("BTD,VD->BTV", h_BTD, params["embed"].astype(cdt), preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", h_BTD, params["lm_head"].astype(cdt), preferred_element_type=jnp.float32)


def forward(params: Params, tokens_BT: jax.Array, positions_BT: jax.Array, cfg: ModelConfig, *,
            mask_BT: jax.Array | None = None, cache: KVCache | None = None
            ) -> tuple[jax.Array, KVCache | None]:
    """Logits [B, T, V] (float32) of the next token at every position, and the updated cache.

    Pure: `cfg` must be static under jit. ``positions_BT`` are rotary
    positions (use `positions_from_mask` for left-padded rows; with a cache,
    continue from the number of real tokens already seen).
    """
    h_BTD, cache = hidden_states(params, tokens_BT, positions_BT, cfg, mask_BT=mask_BT, cache=cache)
    return output_logits(params, h_BTD, cfg), cache


def token_logprobs(params: Params, cfg: ModelConfig, tokens_BT: jax.Array, mask_BT: jax.Array, *,
                   temperature: float = 1.0, chunk: int = 128) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) for every t, shape [B, T] float32.

    Alignment: entry t scores token t itself (from the logits at position
    t - 1), so ``logprobs_BT[:, t]`` lines up with ``tokens_BT[:, t]`` and a
    completion mask over the same [B, T] grid selects the completion's
    log-probs. Entry 0, and any entry whose token or previous token is
    padding, is 0. Logits are divided by `temperature` before the
    log-softmax (match the sampler's temperature for GRPO ratios).

    The [B, T, V] logits are never materialised whole: the log-softmax runs
    over chunks of `chunk` positions (a scan, each chunk rematerialised in
    the backward pass), so memory is [B, chunk, V].
    """
    B, T = tokens_BT.shape
    mask = mask_BT.astype(jnp.bool_)
    h_BTD, _ = hidden_states(params, tokens_BT, positions_from_mask(mask), cfg, mask_BT=mask)
    h_prev = h_BTD[:, :-1]
    targets = tokens_BT[:, 1:]
    n = T - 1
    c = max(1, min(chunk, n))
    pad = (-n) % c
    h_prev = jnp.pad(h_prev, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    nc = (n + pad) // c
    h_CBcD = h_prev.reshape(B, nc, c, -1).swapaxes(0, 1)
    t_CBc = targets.reshape(B, nc, c).swapaxes(0, 1)

    def one(_, xs):
        h, t = xs
        logits = output_logits(params, h, cfg) / temperature
        lp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
        return None, lp

    # Remat each chunk so the backward pass keeps no [B, chunk, V] softmax residuals per chunk.
    _, lp_CBc = jax.lax.scan(jax.checkpoint(one), None, (h_CBcD, t_CBc))
    lp = lp_CBc.swapaxes(0, 1).reshape(B, nc * c)[:, :n]
    valid = mask[:, 1:] & mask[:, :-1]
    lp = jnp.where(valid, lp, 0.0)
    return jnp.concatenate([jnp.zeros((B, 1), jnp.float32), lp], axis=1)
