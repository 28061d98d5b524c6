"""Model FLOPs and bytes of the decoder's workloads, device peaks, and utilisation (MFU).

**FLOPs** (a multiply-add is 2 FLOPs; D hidden, N query heads, K KV heads, H
head_dim, F MLP width, V vocabulary, L layers):

- matmuls, per token and layer: ``2 * (D*(N + 2K)*H + N*H*D + 3*D*F)``
  (q, k, v; the output projection; gate, up, down);
- vocabulary projection, per position whose logits are computed: ``2*D*V``;
- attention, per query and layer: ``4*N*H*c`` (q.k and p.v, 2*N*H*c each),
  where c is the number of keys the query may attend under the causal mask.
  The t-th (from 0) of T new tokens after `past` cached tokens attends
  ``past + t + 1`` keys, so T tokens cost ``4*N*H*(T*past + T*(T+1)/2)`` per
  layer and row. These are the FLOPs the model needs: the reference XLA path
  also multiplies the masked half of the square, the kernels skip it.

Not counted: norms, rotary embeddings, softmax, residual adds, the
embedding lookup and sampling (O(D) or O(V) elementwise work per token). A
backward pass is 2x its forward (gradients of activations and of weights,
each as large as the forward's matmuls), so a training step's model FLOPs
are 3x the forward. Rematerialisation (``ModelConfig.remat``) recomputes
part of the forward in the backward pass; it is *not* in the model FLOPs
(MFU counts useful work) and is reported separately (`remat_flops`):
``full`` recomputes the layers' forward, ``dots_no_batch`` the attention
products, ``dots`` and ``none`` nothing that is a matmul.

Counts use the real tokens of a workload (prompts and completions as
long as asked), not the padding of length buckets.

**Bytes of a decoding step** (the memory-bandwidth ceiling): every weight
is read once per step (the embedding table only through its B looked-up
rows, unless it is also the tied output head), and each row reads the keys
and values of the tokens it attends, ``2*L*K*H*c`` values (c as above).

**Peaks**: a GPU or TPU's published dense bf16 FLOP/s and HBM bandwidth
from `CHIPS` (each entry cites its source); on the CPU, a matmul probe and
a read-bandwidth probe run in the same process (`cpu_peaks`), so figures
from two machines can be compared by their probes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from models.config import ModelConfig

# --- FLOPs -----------------------------------------------------------------------------------


def layer_matmul_flops_per_token(cfg: ModelConfig) -> int:
    """2 x the multiply-adds of one layer's weight matmuls for one token."""
    D, F, H, N, K = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    return 2 * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)


def head_flops_per_position(cfg: ModelConfig) -> int:
    """The vocabulary projection of one position: 2*D*V."""
    return 2 * cfg.hidden_size * cfg.vocab_size


def per_token_weight_flops(cfg: ModelConfig) -> int:
    """The weight matmuls of one token's forward pass with its logits (no attention): the
    familiar ``2 x parameters`` less the embedding lookup."""
    return cfg.num_layers * layer_matmul_flops_per_token(cfg) + head_flops_per_position(cfg)


def attention_flops(cfg: ModelConfig, rows: int, tokens: int, past: int = 0) -> int:
    """All layers' attention FLOPs for `rows` rows of `tokens` new tokens after `past` cached ones."""
    keys = tokens * past + tokens * (tokens + 1) // 2
    return cfg.num_layers * rows * 4 * cfg.num_heads * cfg.head_dim * keys


def forward_flops(cfg: ModelConfig, rows: int, tokens: int, past: int = 0, logits: int | None = None) -> int:
    """A forward pass: `rows` x `tokens` new tokens attending `past` cached tokens and each other
    causally, with the vocabulary projection on `logits` positions per row (default: all)."""
    logits = tokens if logits is None else logits
    return (rows * tokens * cfg.num_layers * layer_matmul_flops_per_token(cfg)
            + rows * logits * head_flops_per_position(cfg) + attention_flops(cfg, rows, tokens, past))


def generate_flops(cfg: ModelConfig, prompts: int, samples: int, prompt_len: int, new_tokens: int) -> dict[str, int]:
    """The sampler (`models.sampler.generate`): one prefill of the prompts (logits at their last
    position), then ``new_tokens - 1`` decoding steps for every sample (the first token comes
    from the prefill's logits, the last needs no forward pass)."""
    prefill = forward_flops(cfg, prompts, prompt_len, 0, logits=1)
    steps = max(new_tokens - 1, 0)
    decode = forward_flops(cfg, prompts * samples, steps, past=prompt_len, logits=steps)
    return {"prefill": prefill, "decode": decode, "total": prefill + decode}


def logprob_flops(cfg: ModelConfig, prompts: int, samples: int, prompt_len: int, completion_len: int,
                  grouped: bool = True) -> int:
    """Completion log-probs (`rl.policy`): grouped runs each prompt once and the completions
    against its cache; full rows run prompt + completion per sample. Logits on the completion
    positions only."""
    rows = prompts * samples
    head = rows * completion_len * head_flops_per_position(cfg)
    if grouped:
        return (forward_flops(cfg, prompts, prompt_len, 0, logits=0)
                + forward_flops(cfg, rows, completion_len, past=prompt_len, logits=0) + head)
    return forward_flops(cfg, rows, prompt_len + completion_len, 0, logits=0) + head


def remat_flops(cfg: ModelConfig, prompts: int, samples: int, prompt_len: int, completion_len: int,
                grouped: bool = True) -> int:
    """Forward FLOPs the backward pass recomputes under ``cfg.remat`` (see the module docstring)."""
    if cfg.remat in ("none", "dots"):
        return 0
    rows = prompts * samples
    if grouped:
        attn = attention_flops(cfg, prompts, prompt_len) + attention_flops(cfg, rows, completion_len, prompt_len)
        tokens = prompts * prompt_len + rows * completion_len
    else:
        attn = attention_flops(cfg, rows, prompt_len + completion_len)
        tokens = rows * (prompt_len + completion_len)
    if cfg.remat == "dots_no_batch":
        return attn
    return tokens * cfg.num_layers * layer_matmul_flops_per_token(cfg) + attn


def grpo_step_flops(cfg: ModelConfig, prompts: int, generations: int, prompt_len: int, new_tokens: int,
                    reference: bool = True, grouped: bool = True) -> dict[str, int]:
    """One GRPO step: generation, reference log-probs (when the KL weight is not 0) and the update
    (forward + backward = 3x the log-prob forward; remat recompute separate)."""
    gen = generate_flops(cfg, prompts, generations, prompt_len, new_tokens)["total"]
    lp = logprob_flops(cfg, prompts, generations, prompt_len, new_tokens, grouped)
    ref = lp if reference else 0
    update = 3 * lp
    return {"generate": gen, "ref_logprobs": ref, "update": update, "total": gen + ref + update,
            "remat_recompute": remat_flops(cfg, prompts, generations, prompt_len, new_tokens, grouped)}


# --- bytes -----------------------------------------------------------------------------------


def weight_bytes_per_step(cfg: ModelConfig, itemsize: int) -> int:
    """Weights a decoding step reads: all parameters but an untied embedding table (of which it
    reads only the looked-up rows)."""
    n = cfg.num_params()
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return n * itemsize


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """Keys and values of one token in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def decode_bytes(cfg: ModelConfig, rows: int, prompt_len: int, new_tokens: int, weight_itemsize: int,
                 cache_itemsize: int) -> int:
    """Bytes the ``new_tokens - 1`` decoding steps of `generate_flops` must read: the weights
    once per step, and per row the cache of the tokens each step attends."""
    steps = max(new_tokens - 1, 0)
    keys = steps * prompt_len + steps * (steps + 1) // 2
    return steps * weight_bytes_per_step(cfg, weight_itemsize) + rows * keys * kv_bytes_per_token(cfg, cache_itemsize)


# --- peaks -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one accelerator chip (one JAX device)."""

    name: str
    bf16_flops: float  # dense (no sparsity) bf16 peak, FLOP/s
    hbm_bytes_per_s: float
    hbm_bytes: float
    source: str
    device_kinds: tuple[str, ...]  # `jax.Device.device_kind` values (GPU: substrings)


CHIPS: dict[str, Chip] = {
    "a100": Chip("NVIDIA A100 SXM4 80GB", 312e12, 2.039e12, 80e9,
                 "nvidia.com/en-us/data-center/a100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), "
                 "80GB HBM2e at 2,039 GB/s", ("A100",)),
    "h100": Chip("NVIDIA H100 SXM5 80GB", 989.4e12, 3.35e12, 80e9,
                 "nvidia.com/en-us/data-center/h100 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity "
                 "(989.4 dense), 80GB HBM3 at 3.35 TB/s", ("H100",)),
    "h200": Chip("NVIDIA H200 SXM 141GB", 989.4e12, 4.8e12, 141e9,
                 "nvidia.com/en-us/data-center/h200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity "
                 "(989.4 dense), 141GB HBM3e at 4.8 TB/s", ("H200",)),
    "v4": Chip("TPU v4", 275e12, 1200e9, 32 * 2**30,
               "cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16 per chip, HBM2 32 GiB at 1200 GBps",
               ("TPU v4",)),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16e9,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip, HBM2 16 GB at 819 GBps",
                ("TPU v5 lite", "TPU v5e")),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95e9,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip, HBM2e 95 GB at 2765 GBps",
                ("TPU v5", "TPU v5p")),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 1638e9, 32e9,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16 per chip, HBM 32 GB at 1638 GBps",
                ("TPU v6 lite", "TPU v6e")),
}


def chip_for_device(device: Any) -> Chip | None:
    """The `CHIPS` entry of a JAX device (None for a CPU or an unknown chip)."""
    kind = str(getattr(device, "device_kind", ""))
    for chip in CHIPS.values():
        if device.platform == "tpu" and kind in chip.device_kinds:
            return chip
        if device.platform == "gpu" and any(k in kind for k in chip.device_kinds):
            return chip
    return None


def matmul_probe(dtype: str = "float32", n: int = 2048, repeats: int = 5, device: Any = None) -> float:
    """FLOP/s of the best of `repeats` [n, n] @ [n, n] matmuls on `device` (XLA:CPU spreads one
    large matmul over all the process's cores)."""
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype), device)
            for i in (1, 2))
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def bandwidth_probe(nbytes: int = 256 * 1024**2, repeats: int = 5, device: Any = None) -> float:
    """Bytes/s of the best of `repeats` full reads (a sum) of an `nbytes` float32 array."""
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def device_peaks(compute_dtype: str = "float32", devices: int = 1) -> dict[str, Any]:
    """Peak FLOP/s and memory bandwidth of the `devices` devices a benchmark ran on.

    Accelerators: the chip's published dense bf16 figures (`CHIPS`) times `devices` (an unknown
    chip gives None and says so). CPU: a matmul probe in `compute_dtype` and a read-bandwidth
    probe on one device, taken now: XLA:CPU devices share the machine's cores and memory, so
    the probes are the process's peak however many CPU devices the benchmark used.
    """
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return {"peak_flops_per_s": matmul_probe(compute_dtype), "peak_bytes_per_s": bandwidth_probe(),
                "peak_source": f"measured in this run: best [2048 x 2048] @ [2048 x 2048] {compute_dtype} matmul "
                               f"and best 256 MiB float32 sum on one XLA CPU device"}
    chip = chip_for_device(dev)
    if chip is None:
        return {"peak_flops_per_s": None, "peak_bytes_per_s": None,
                "peak_source": f"unknown chip {dev.device_kind!r}: no published peak in models.flops.CHIPS"}
    return {"peak_flops_per_s": chip.bf16_flops * devices, "peak_bytes_per_s": chip.hbm_bytes_per_s * devices,
            "peak_source": f"{devices} x {chip.name} (published dense bf16; {chip.source})"}


def utilisation(amount: float, seconds: float, peak: float | None) -> float | None:
    """``amount / seconds / peak`` (FLOPs -> MFU, bytes -> bandwidth fraction), rounded; None without a peak."""
    if not peak or seconds <= 0:
        return None
    return round(amount / seconds / peak, 4)


def phase_utilisation(flops_by_phase: dict[str, int], seconds_by_phase: dict[str, float],
                      peaks: dict[str, Any]) -> dict[str, Any]:
    """Achieved FLOP/s and MFU of each phase timed in `seconds_by_phase` (same keys), with the peaks."""
    peak = peaks["peak_flops_per_s"]
    out: dict[str, Any] = {"model_flops": dict(flops_by_phase), "achieved_flops_per_s": {}, "mfu": {}}
    for phase, sec in seconds_by_phase.items():
        out["achieved_flops_per_s"][phase] = round(flops_by_phase[phase] / sec) if sec > 0 else None
        out["mfu"][phase] = utilisation(flops_by_phase[phase], sec, peak)
    out.update({k: (round(v) if isinstance(v, float) else v) for k, v in peaks.items()})
    return out
