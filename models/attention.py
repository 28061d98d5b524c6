"""Attention implementations, chosen by `ModelConfig.attention`.

- ``xla`` (every backend; the CPU default): `models.model.attention`, the
  reference: einsums with the [B, K, G, T, S] float32 scores in memory.
- ``cudnn`` (NVIDIA GPU, bfloat16/float16 compute):
  `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash
  attention; the scores never sit in memory.
- ``splash`` (TPU): the Pallas splash-attention kernel
  (`jax.experimental.pallas.ops.tpu.splash_attention`).
- ``auto``: CPU: xla. GPU: cudnn when the compute dtype is bfloat16 or
  float16 (cuDNN has no float32 flash kernel), else xla. TPU: splash when the
  kernel can be placed (one device, or a mesh set with `jax.set_mesh`), else
  xla. Every caller that runs T > 1 queries on sharded parameters sets their
  mesh (`on_mesh_of`): the update (`rl.train_step`), the sampler's prefill and
  `extend` (`models.sampler`), the reference/old log-probs
  (`rl.rollout.completion_logprobs`) and the PRM's step scores
  (`rl.process.PrmScorer`).

A named implementation that cannot run where it is asked to (cudnn off a CUDA
GPU or in float32, splash off a TPU or on several TPU devices without a mesh
context) is a `JaxsqlError` at trace time, never a silent switch.

What each call runs: prefill, log-probs and training (T > 1 queries per row)
use the chosen kernel, with or without a KV cache. A decoding step (T == 1)
always uses the reference's streaming path, which reads the cache once in its
own layout; the kernels gain nothing there.

**One description of the mask.** Every call site gives the same facts
(`MaskParts`): which new tokens are real (``query_mask_BT``), which key
slots hold real tokens (``key_mask_BS``), and where query t sits among the
key slots: slot ``offset + t`` (``offset`` None means self-attention over the
T tokens, S == T, slot t). The reference uses the dense
``allowed[b, t, s] = key_mask[b, s] and s <= offset + t``. The kernels use
segment ids (real = 1, padding = 0) and a causal mask: a real query attends
exactly the real keys the reference allows; a padding query attends padding
keys (at least itself) instead of nothing, so no row is empty (flash kernels
cannot normalise an empty row). Padding rows' outputs are never used, and
no real position reads a padding position, so outputs and gradients at real
positions are the reference's.

Left padding, grouped-query heads and the cache layout (keys slots-last
``[B, K, H, S]``, values ``[B, K, S, H]``, see `models.model.KVCache`) go in
unchanged; both kernels take keys as ``[B, S, K, H]``-like layouts with head_dim
minor, one transpose of the keys.

With a cache the kernels need queries aligned to the END of the key axis (a
static causal offset S - T), while the cache's write index is a traced value:
the keys are rolled by ``S - T - index`` slots (the unwritten slots past the
index, all padding, wrap to the front), which costs one copy of the layer's
keys and values.

Not run on its hardware in this repository (no GPU or TPU was available):
the cudnn and splash paths. On the CPU, `jax.nn.dot_product_attention`'s XLA
implementation runs through the same wrapper as cudnn (only the
``implementation`` argument differs) and splash runs in Pallas interpret mode
(`interpret_kernels`); tests check both against the reference, forward and
backward, with left padding, grouped-query heads and a cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp

from jaxsql.errors import JaxsqlError

# Tile of the splash kernel along queries and keys; sequences are padded to a multiple of it.
# Untuned (no TPU here): 128 is the smallest tile the TPU's lanes take.
SPLASH_BLOCK = 128

_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxsql_interpret_kernels", default=False)


class MaskParts(NamedTuple):
    """Which queries and keys are real and where the queries sit among the key slots.

    ``allowed[b, t, s] = key_mask_BS[b, s] and s <= offset + t``, offset 0 when `offset` is
    None (self-attention, S == T). `offset` is a scalar int32 (a cache's write index).
    """

    query_mask_BT: jax.Array
    key_mask_BS: jax.Array
    offset: jax.Array | None

    def segment_mask_BTS(self) -> jax.Array:
        """The kernels' mask, dense: same segment (real/padding) and causal (for cuDNN's bias)."""
        T, S = self.query_mask_BT.shape[1], self.key_mask_BS.shape[1]
        offset = 0 if self.offset is None else self.offset
        causal_TS = jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None]
        same_BTS = self.query_mask_BT[:, :, None] == self.key_mask_BS[:, None, :]
        return same_BTS & causal_TS[None]


@contextlib.contextmanager
def interpret_kernels() -> Iterator[None]:
    """Run the Pallas kernels (splash) in interpret mode off a TPU: for tests and debugging on the
    CPU (slow). Functions traced inside the block are interpreted; jit caches them as usual, so
    trace afresh (a new jitted function) when switching."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _is_cuda() -> bool:
    """An NVIDIA GPU backend (JAX names ROCm GPUs "gpu" too; their platform version says rocm)."""
    if jax.default_backend() != "gpu":
        return False
    return "rocm" not in str(getattr(jax.devices()[0].client, "platform_version", "")).lower()


def _context_mesh():
    """The mesh set with `jax.set_mesh` (None when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def on_mesh_of(tree) -> contextlib.AbstractContextManager:
    """`jax.set_mesh` of the mesh `tree`'s arrays live on (its first leaf's `NamedSharding`), for a
    jitted call on them: with it, ``auto`` places the splash kernel on each device of a multi-chip
    TPU (under `jax.shard_map`), where without it the call gets ``xla``. The mesh is the one the
    arrays are sharded on, so each caller gets its own (the trainer's for the update and the
    log-probs, the sampling devices' for a standalone sampler). A no-op context for arrays on no
    mesh (e.g. one device, committed without a mesh) or when a mesh is already set."""
    sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None) if jax.tree.leaves(tree) else None
    if not isinstance(sharding, jax.sharding.NamedSharding) or _context_mesh() is not None:
        return contextlib.nullcontext()
    return jax.set_mesh(sharding.mesh)


def resolve(name: str, compute_dtype: str) -> str:
    """The implementation `name` ("auto" resolved) for the current backend; a `JaxsqlError` when
    the named one cannot run here."""
    backend = jax.default_backend()
    half = compute_dtype in ("bfloat16", "float16")
    placeable = _context_mesh() is not None or jax.device_count() == 1
    if name == "auto":
        if _is_cuda() and half:
            return "cudnn"
        if backend == "tpu" and placeable:
            return "splash"
        return "xla"
    if name == "cudnn":
        if not _is_cuda():
            raise JaxsqlError(f"attention='cudnn' needs an NVIDIA GPU (cuDNN flash attention); this backend is "
                              f"{backend}. Use attention='auto' or 'xla'")
        if not half:
            raise JaxsqlError(f"attention='cudnn' needs compute_dtype bfloat16 or float16 (cuDNN has no float32 "
                              f"flash kernel), got {compute_dtype}")
    elif name == "splash":
        if backend != "tpu" and not _INTERPRET.get():
            raise JaxsqlError(f"attention='splash' is a TPU kernel; this backend is {backend} (for a CPU test, "
                              f"trace inside models.attention.interpret_kernels()). Use attention='auto' or 'xla'")
        if backend == "tpu" and not placeable:
            raise JaxsqlError(f"attention='splash' on {jax.device_count()} TPU devices needs the mesh as context "
                              f"(`with jax.set_mesh(mesh):` around the jitted call) so each device runs the kernel "
                              f"on its own rows and heads")
    elif name != "xla":
        raise JaxsqlError(f"unknown attention implementation {name!r}; known: auto, xla, cudnn, splash")
    return name


def attend(q_BTNH: jax.Array, kT_BKHS: jax.Array, v_BKSH: jax.Array, allowed_BTS: jax.Array, parts: MaskParts,
           name: str, compute_dtype: str, *, reference: Callable[..., jax.Array]) -> jax.Array:
    """Grouped-query attention by the implementation `name` (see the module docstring).

    `reference` is `models.model.attention` (the xla path, and every decoding step), called
    with the dense `allowed_BTS`; the kernels read `parts`.
    """
    impl = resolve(name, compute_dtype)
    if impl == "xla" or q_BTNH.shape[1] == 1:
        return reference(q_BTNH, kT_BKHS, v_BKSH, allowed_BTS)
    if impl == "cudnn":
        return dot_product_attention(q_BTNH, kT_BKHS, v_BKSH, parts, implementation="cudnn")
    return splash_attention(q_BTNH, kT_BKHS, v_BKSH, parts, interpret=jax.default_backend() != "tpu")


def dot_product_attention(q_BTNH: jax.Array, kT_BKHS: jax.Array, v_BKSH: jax.Array, parts: MaskParts,
                          implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` on our layouts: cuDNN flash attention on a GPU
    (``implementation="cudnn"``), or its XLA implementation (``"xla"``, any backend: how the
    CPU tests check this wrapper).

    cuDNN takes a general mask only as an additive bias: the segment-and-causal mask goes in
    as [B, 1, T, S] (B x T x S values, where the reference holds N x T x S float32 scores per
    row), and self-attention (no cache) also sets ``is_causal`` so cuDNN skips the blocks above
    the diagonal.
    """
    k_BSKH = kT_BKHS.transpose(0, 3, 1, 2)
    v_BSKH = v_BKSH.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=parts.segment_mask_BTS()[:, None],
                                        is_causal=parts.offset is None, implementation=implementation)


def _splash_kernel(N: int, T: int, S: int, interpret: bool):
    """A splash kernel for N query heads, T queries at the END of S keys (static causal offset S - T)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b = SPLASH_BLOCK
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((T, S), offset=S - T) for _ in range(N)])
    return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTNH: jax.Array, kT_BKHS: jax.Array, v_BKSH: jax.Array, parts: MaskParts, *,
                     interpret: bool = False) -> jax.Array:
    """The Pallas splash-attention kernel on our layouts (`interpret` runs it off a TPU).

    Queries are scaled by 1/sqrt(H) first (the kernel does not scale). With a cache the keys
    are rolled so the queries sit at the end (module docstring). Queries and keys are padded
    at the end by the same number of slots up to a multiple of `SPLASH_BLOCK` (keys also at
    the front, to keep the alignment), as padding segments. With a mesh context (`jax.set_mesh`)
    the kernel runs under `jax.shard_map`, rows over the mesh axes of the batch and heads over
    the tensor axis (the default `ShardingRules`).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, N, H = q_BTNH.shape
    K, S = kT_BKHS.shape[1], kT_BKHS.shape[3]
    q_seg = parts.query_mask_BT.astype(jnp.int32)
    kv_seg = parts.key_mask_BS.astype(jnp.int32)
    if parts.offset is not None:  # bring the T queries to the last T key slots
        shift = (S - T) - parts.offset
        kT_BKHS = jnp.roll(kT_BKHS, shift, axis=3)
        v_BKSH = jnp.roll(v_BKSH, shift, axis=2)
        kv_seg = jnp.roll(kv_seg, shift, axis=1)
    end = -T % SPLASH_BLOCK
    front = -(S + end) % SPLASH_BLOCK
    q_BNTH = (q_BTNH.astype(jnp.float32) * H ** -0.5).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
    q_BNTH = jnp.pad(q_BNTH, ((0, 0), (0, 0), (0, end), (0, 0)))
    k_BKSH = jnp.pad(kT_BKHS.transpose(0, 1, 3, 2), ((0, 0), (0, 0), (front, end), (0, 0)))
    v_BKSH = jnp.pad(v_BKSH, ((0, 0), (0, 0), (front, end), (0, 0)))
    q_seg = jnp.pad(q_seg, ((0, 0), (0, end)))
    kv_seg = jnp.pad(kv_seg, ((0, 0), (front, end)))
    Tp, Sp = T + end, S + front + end

    def run(q, k, v, qs, ks):
        kernel = _splash_kernel(q.shape[1], Tp, Sp, interpret)
        return jax.vmap(kernel)(q, k, v, segment_ids=sk.SegmentIds(qs, ks))

    mesh = _context_mesh()
    if mesh is not None:
        run = _shard_over(run, mesh, N, K)
    out_BNTH = run(q_BNTH, k_BKSH.astype(q_BNTH.dtype), v_BKSH.astype(q_BNTH.dtype), q_seg, kv_seg)
    return out_BNTH[:, :, :T].transpose(0, 2, 1, 3).astype(v_BKSH.dtype)


def _shard_over(run, mesh, N: int, K: int):
    """`run` under `jax.shard_map` on `mesh`: rows over the batch axes, heads over the heads axis."""
    from jax.sharding import PartitionSpec as P

    from jaxsql.sharding import ShardingRules

    rules = ShardingRules()

    def live(axes):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return tuple(a for a in names if mesh.shape.get(a, 1) > 1)

    batch, heads = live(rules.batch), live(rules.heads)
    size = math.prod(mesh.shape[a] for a in heads)
    if N % size or K % size:
        raise JaxsqlError(f"attention='splash': {N} query heads and {K} KV heads must both divide over the "
                          f"mesh axes {heads} of size {size}")
    b = batch or None
    h = heads or None
    rows = P(b, h, None, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(rows, rows, rows, P(b, None), P(b, None)), out_specs=rows,
                         check_vma=False)
