"""Memory and step-time plan of a GRPO run on a mesh of accelerator chips (`jaxsql plan`).

Pure arithmetic over the model's shapes: nothing is allocated or compiled.
All figures are per chip (one JAX device); B prompts per step, G samples per
prompt, P prompt tokens (the padded bucket length), C completion tokens, m
micro-batches, a mesh of data x fsdp x tensor chips with the default
`ShardingRules` (rows over data and fsdp, parameters' embed dimension over
fsdp, heads / KV heads / MLP / vocabulary over tensor).

**Memory**, every term in bytes per chip:

- parameters: each leaf's shard under `jaxsql.sharding.logical_to_spec`
  (the sharding the trainer uses), in the parameter (master) dtype;
- optimizer: AdamW's two moments in float32, sharded like the parameters;
- gradients: the accumulator over micro-batches and one micro-batch's
  gradients, 2 x parameters in the parameter dtype;
- reference model (KL weight > 0): a copy in the compute dtype;
- sampler weights: a copy in the compute dtype when it differs from the
  parameter dtype;
- KV cache: ``2 * L * rows * K/t * H * (P + C)`` in the compute dtype, rows
  = B*G / (data*fsdp), KV heads split over tensor when they divide;
- prefill working set: one layer's temporaries for the B / (data*fsdp)
  prompts: the MLP's 3 x F/t activations, and with ``xla`` attention its
  float32 scores and probabilities, 2 x N/t x P x P per prompt;
- activations of one micro-batch under the remat policy (per token and layer,
  elements; D, F/t, heads/t): ``full`` keeps the layer input (D) and
  recomputes one layer at a time, which holds the ``none`` set below for one
  layer; ``dots`` keeps the layer input and every matmul output
  (``(N+2K)H + N*H + 2F + 2D``) plus, with ``xla`` attention, the score
  tensors (attention einsums are matmuls too); ``dots_no_batch`` the same
  without the score tensors (batched matmuls are recomputed); ``none``
  keeps everything: ``4D + (2N+3K)H + 4F`` plus the scores with ``xla``.
  With ``xla`` attention the backward of a layer also holds the gradients
  of its scores and probabilities (2 x N/t x keys float32 per token);
  The prompts' KV cache, repeated for the G completions of each group, and
  its gradient: 2 x the sampler's cache formula for a micro-batch's rows.
  Tokens per micro-batch and chip: the prompts once per group (grouped
  rows; prompt rows that do not divide over data x fsdp are held whole by
  every chip, as the trainer's batch sharding replicates them) and the
  completions;
- logits: the chunked log-softmax holds [rows, chunk, V/t] float32 values
  three times (logits, softmax, their gradient), chunk as `rl.policy` picks
  it under its logits budget.

A phase's peak is the persistent state (parameters, optimizer, reference)
plus its own terms: sampling adds the sampler copy, the cache and the prefill
working set; the update adds gradients, activations and logits. A plan fits
when the larger peak is at most `USABLE_FRACTION` of the chip's HBM (XLA
needs room for its own buffers and fragmentation).

**Step time** from FLOPs (`models.flops`, remat recompute included, every
phase split evenly over the chips) and bytes: prefill, reference log-probs
and the update at the chip's dense bf16 peak; each decoding step at the
larger of its FLOPs over the peak and its bytes over the HBM bandwidth, its
bytes being the weights every chip reads (sharded only over tensor: FSDP
gathers the full layer) and its rows' cache. These are roofline (lower
bound) times; the plan also scales them by assumed efficiencies (``--mfu``
for compute, ``--bandwidth-efficiency`` for decoding). Collectives (FSDP
gathers, gradient reductions) and the host's reward time are not modelled.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

from jaxsql.errors import JaxsqlError
from models.config import DTYPES, ModelConfig
from models.flops import CHIPS, Chip, attention_flops, grpo_step_flops, kv_bytes_per_token
from models.flops import forward_flops, per_token_weight_flops

USABLE_FRACTION = 0.9
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class PlanInput:
    """What a plan is asked about (validated at construction)."""

    cfg: ModelConfig
    chip: str
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    batch: int = 16
    generations: int = 8
    prompt_len: int = 2048
    new_tokens: int = 1024
    micro_batches: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # the trainer's default (model.remat); the real-model recipes set full
    attention: str = "auto"
    reference: bool = True
    logits_budget: int = 64 * 1024 * 1024
    mfu: float = 0.4
    bandwidth_efficiency: float = 0.7

    def __post_init__(self) -> None:
        from jaxsql.config import require

        name = "plan"
        require(self.chip in CHIPS, name, "chip", f"unknown chip {self.chip!r}; known: {sorted(CHIPS)}")
        for f in ("data", "fsdp", "tensor", "batch", "generations", "prompt_len", "new_tokens", "micro_batches"):
            require(getattr(self, f) >= 1, name, f, f"must be >= 1, got {getattr(self, f)}")
        require(self.param_dtype in DTYPES, name, "param_dtype", f"must be one of {DTYPES}")
        require(self.compute_dtype in DTYPES, name, "compute_dtype", f"must be one of {DTYPES}")
        require(self.remat in ("none", "full", "dots", "dots_no_batch"), name, "remat",
                "must be none, full, dots or dots_no_batch")
        require(self.attention in ("auto", "xla", "cudnn", "splash"), name, "attention",
                "must be auto, xla, cudnn or splash")
        require(self.batch % self.micro_batches == 0, name, "micro_batches",
                f"must divide the {self.batch} prompts (micro-batches hold whole groups)")
        require(0 < self.mfu <= 1 and 0 < self.bandwidth_efficiency <= 1, name, "mfu",
                "efficiencies must be in (0, 1]")

    @property
    def chips(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def kernel_attention(self) -> bool:
        """Whether attention runs a flash kernel (no score tensors in memory) on this chip."""
        if self.attention == "auto":
            gpu = not CHIPS[self.chip].name.startswith("TPU")
            return not gpu or self.compute_dtype != "float32"
        return self.attention != "xla"


def param_shard_elements(cfg: ModelConfig, data: int, fsdp: int, tensor: int) -> int:
    """Elements of the parameters one chip holds under the default `ShardingRules`, counting a
    dimension its mesh axes do not divide as replicated (training refuses such a mesh unless
    ``mesh.rule_overrides`` replicates that axis; `plan` warns)."""
    from jaxsql.sharding import ShardingRules, logical_to_spec
    from models.model import param_specs

    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    mesh = types.SimpleNamespace(shape=sizes)
    rules = ShardingRules(replicate_indivisible=ShardingRules.logical_axes())
    total = 0

    def walk(tree):
        nonlocal total
        if isinstance(tree, dict):
            for v in tree.values():
                walk(v)
            return
        spec = logical_to_spec(tree.axes, mesh, rules, tree.shape)
        n = 1
        for dim, axes in zip(tree.shape, tuple(spec) + (None,) * (len(tree.shape) - len(spec))):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            n *= dim // math.prod(sizes[a] for a in names)
        total += n

    walk(param_specs(cfg))
    return total


def plan(p: PlanInput) -> dict[str, Any]:
    """The per-chip memory (bytes, by term and by phase), whether it fits, and the step time."""
    cfg, chip = p.cfg, CHIPS[p.chip]
    L, D, F, H = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    N, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    t = p.tensor
    shards = p.data * p.fsdp
    pb, cb = _ITEMSIZE[p.param_dtype], _ITEMSIZE[p.compute_dtype]
    P, C, G = p.prompt_len, p.new_tokens, p.generations
    warnings: list[str] = []

    if p.batch % shards:
        warnings.append(f"the {p.batch} prompts do not split evenly over data x fsdp = {shards} chips: the "
                        f"sampler adds filler prompts up to a multiple")
    mb = p.batch // p.micro_batches
    if mb % shards:
        warnings.append(f"a micro-batch's {mb} prompts do not split evenly over data x fsdp = {shards} chips: "
                        f"every chip then holds all of them (replicated)")
    heads_t = N / t if N % t == 0 else N
    kv_t = K / t if K % t == 0 else K
    mlp_t = F / t if F % t == 0 else F
    vocab_t = V / t if V % t == 0 else V
    for what, n in (("query heads", N), ("KV heads", K), ("MLP width", F), ("vocabulary", V)):
        if n % t:
            warnings.append(f"{what} ({n}) do not divide over tensor = {t}: training refuses this mesh "
                            f"unless mesh.rule_overrides replicates that axis; counted here as replicated")

    n_shard = param_shard_elements(cfg, p.data, p.fsdp, p.tensor)
    params = n_shard * pb
    memory = {"params": params, "optimizer": n_shard * 8, "gradients": 2 * params,
              "reference": n_shard * cb if p.reference else 0,
              "sampler_weights": n_shard * cb if p.compute_dtype != p.param_dtype else 0}

    prompts_chip = math.ceil(p.batch / shards)  # the sampler's filler prompts complete the last shard
    rows_chip = prompts_chip * G
    memory["kv_cache"] = int(2 * L * rows_chip * kv_t * H * (P + C) * cb)
    scores = 0 if p.kernel_attention else 1
    memory["prefill_working"] = int(prompts_chip * P * (3 * mlp_t * cb + scores * 2 * heads_t * P * 4))

    mb_prompts = mb // shards if mb % shards == 0 else mb  # rows that do not divide stay whole
    mb_rows = math.ceil(mb * G / shards)
    tokens = mb_prompts * P + mb_rows * C
    score_elems = scores * 2 * heads_t * (mb_prompts * P * P + mb_rows * C * (P + C))  # float32
    every = 4 * D + (2 * heads_t + 3 * kv_t) * H + 4 * mlp_t  # elements per token, remat none
    dots = D + (heads_t + 2 * kv_t) * H + heads_t * H + 2 * mlp_t + 2 * D
    if p.remat == "full":
        saved = L * tokens * D * cb + tokens * every * cb + score_elems * 4
    elif p.remat == "dots":
        saved = L * (tokens * dots * cb + score_elems * 4)
    elif p.remat == "dots_no_batch":
        saved = L * tokens * dots * cb + score_elems * 4
    else:
        saved = L * (tokens * every * cb + score_elems * 4)
    memory["activations"] = int(saved + score_elems * 4)  # + the backward's score gradients of one layer
    # grouped rows: the completions attend the prompts' cache repeated G times; it and its gradient live
    # through the update's forward and backward
    memory["update_kv_cache"] = int(2 * 2 * L * mb_rows * kv_t * H * (P + C) * cb)
    global_rows = mb * G
    chunk = min(C, max(1, p.logits_budget // (global_rows * V)))
    memory["logits"] = int(3 * mb_rows * chunk * vocab_t * 4)

    persistent = memory["params"] + memory["optimizer"] + memory["reference"]
    phases = {
        "sampling": persistent + memory["sampler_weights"] + memory["kv_cache"] + memory["prefill_working"],
        "update": persistent + memory["gradients"] + memory["activations"] + memory["update_kv_cache"]
        + memory["logits"],
    }
    peak = max(phases.values())
    usable = USABLE_FRACTION * chip.hbm_bytes
    fits = peak <= usable
    if not fits:
        worst = max(phases, key=phases.get)
        warnings.insert(0, f"does not fit: the {worst} phase needs {peak / GIB:.1f} GiB per chip, "
                           f"{USABLE_FRACTION:.0%} of the {chip.name}'s {chip.hbm_bytes / GIB:.1f} GiB is "
                           f"{usable / GIB:.1f} GiB")
        if p.remat == "none":
            warnings.insert(1, "no remat: --remat full (the run config's model.remat: full) keeps one layer's "
                               "activations instead of all of them")

    return {"input": _describe(p), "memory_bytes": memory, "phase_peak_bytes": phases, "peak_bytes": peak,
            "usable_bytes": int(usable), "hbm_bytes": int(chip.hbm_bytes), "fits": fits,
            "step_time_s": _step_time(p, chip, rows_chip), "warnings": warnings}


def _step_time(p: PlanInput, chip: Chip, rows_chip: int) -> dict[str, Any]:
    """Roofline seconds per phase (and at the assumed efficiencies), per chip."""
    cfg = p.cfg.replace(remat=p.remat)
    P, C, G = p.prompt_len, p.new_tokens, p.generations
    f = grpo_step_flops(cfg, p.batch, G, P, C, reference=p.reference)
    per_chip = {k: v / p.chips for k, v in f.items()}
    prefill = forward_flops(cfg, p.batch, P, 0, logits=1) / p.chips
    steps = max(C - 1, 0)
    t = p.tensor
    cb = _ITEMSIZE[p.compute_dtype]  # the sampler reads weights and cache in the compute dtype
    weights = _decode_weight_bytes(cfg, cb) / t
    kv_token = kv_bytes_per_token(cfg, cb) / (t if cfg.num_kv_heads % t == 0 else 1)
    step_flops_fixed = rows_chip * per_token_weight_flops(cfg) / t
    decode = 0.0
    decode_eff = 0.0
    for j in range(steps):  # step j attends P + j + 1 keys
        keys = P + j + 1
        flops_j = step_flops_fixed + attention_flops(cfg, rows_chip, 1, P + j) / t
        bytes_j = weights + rows_chip * keys * kv_token
        decode += max(flops_j / chip.bf16_flops, bytes_j / chip.hbm_bytes_per_s)
        decode_eff += max(flops_j / (chip.bf16_flops * p.mfu),
                          bytes_j / (chip.hbm_bytes_per_s * p.bandwidth_efficiency))
    compute = {"prefill": prefill, "ref_logprobs": per_chip["ref_logprobs"],
               "update": per_chip["update"] + per_chip["remat_recompute"]}
    roofline = {k: v / chip.bf16_flops for k, v in compute.items()}
    roofline["decode"] = decode
    expected = {k: v / (chip.bf16_flops * p.mfu) for k, v in compute.items()}
    expected["decode"] = decode_eff
    order = ("prefill", "decode", "ref_logprobs", "update")
    return {"roofline": {k: roofline[k] for k in order}, "roofline_total": sum(roofline.values()),
            "expected": {k: expected[k] for k in order}, "expected_total": sum(expected.values()),
            "model_flops_per_chip": per_chip["total"], "remat_flops_per_chip": per_chip["remat_recompute"]}


def _decode_weight_bytes(cfg: ModelConfig, itemsize: int) -> float:
    n = cfg.num_params()
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return n * itemsize


def _describe(p: PlanInput) -> dict[str, Any]:
    out = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "cfg"}
    out["chips"] = p.chips
    out["params"] = p.cfg.num_params()
    out["attention_kernel"] = p.kernel_attention
    return out


def format_plan(result: dict[str, Any], model_name: str) -> str:
    """The plan as the text table `jaxsql plan` prints."""
    i = result["input"]
    chip = CHIPS[i["chip"]]
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [
        f"plan: {model_name} ({i['params'] / 1e9:.2f} B params) on {i['chips']} x {chip.name} "
        f"(mesh data={i['data']} fsdp={i['fsdp']} tensor={i['tensor']})",
        f"  GRPO: {i['batch']} prompts x {i['generations']} samples, prompt {i['prompt_len']} + completion "
        f"{i['new_tokens']} tokens, {i['micro_batches']} micro-batch(es); params {i['param_dtype']}, compute "
        f"{i['compute_dtype']}, remat {i['remat']}, attention {i['attention']} "
        f"({'flash kernel' if i['attention_kernel'] else 'xla scores in memory'}), "
        f"reference model {'yes' if i['reference'] else 'no'}",
        "  memory per chip:",
    ]
    for k, v in result["memory_bytes"].items():
        lines.append(f"    {k:<18}{gib(v)}")
    for k, v in result["phase_peak_bytes"].items():
        lines.append(f"  peak while {k:<10}{gib(v)}")
    lines.append(f"  usable {USABLE_FRACTION:.0%} of {result['hbm_bytes'] / GIB:.1f} GiB HBM: "
                 f"{result['usable_bytes'] / GIB:.1f} GiB -> {'FITS' if result['fits'] else 'DOES NOT FIT'}")
    st = result["step_time_s"]
    lines.append("  step time per chip (s):      " + "  ".join(f"{k:>12}" for k in st["roofline"]) + "         total")
    for label, key in (("roofline", "roofline"), (f"at mfu {i['mfu']}/bw {i['bandwidth_efficiency']}", "expected")):
        values = "  ".join(f"{v:12.2f}" for v in st[key].values())
        lines.append(f"    {label:<26}{values}  {st[key + '_total']:12.2f}")
    for w in result["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """``data=2,fsdp=4,tensor=1`` (axes omitted are 1) or ``2x4x1`` -> (data, fsdp, tensor)."""
    text = text.strip()
    try:
        if "=" in text:
            sizes = {"data": 1, "fsdp": 1, "tensor": 1}
            for part in text.split(","):
                key, value = part.split("=")
                key = key.strip()
                if key not in sizes:
                    raise JaxsqlError(f"--mesh: unknown axis {key!r}; axes are data, fsdp, tensor")
                sizes[key] = int(value)
            return sizes["data"], sizes["fsdp"], sizes["tensor"]
        d, f, t = (int(x) for x in text.lower().split("x"))
        return d, f, t
    except ValueError:
        raise JaxsqlError(f"--mesh {text!r}: write data=D,fsdp=F,tensor=T or DxFxT") from None
