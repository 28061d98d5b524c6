"""One jitted, sharded optimizer step for GRPO and SFT.

The train state is a dict pytree ``{"params", "opt_state", "step", "skipped"}``
whose parameters and optimizer moments are sharded by the model's logical
axes (`jaxsql.sharding`); it is donated to the step. A batch is a dict of
arrays sharded over the batch axis; rows are ``[left-padded prompt |
completion]`` with the completion in the last C columns (see `rl.policy`):

- ``tokens``, ``mask`` (real tokens) [N, T]; ``completion_mask`` [N, C] (scored tokens;
  a full-width [N, T] mask, with [N, T] log-prob arrays, is accepted too and
  scores positions 1..T-1, at the cost of the vocabulary projection everywhere);
- or, *grouped* (GRPO's G samples share a prompt, which then runs once per
  group): ``prompt_tokens``, ``prompt_mask`` [N/G, P] and ``completion_tokens``
  [N, C] instead of ``tokens`` / ``mask`` (see `rl.policy`);
- GRPO: ``advantages`` [N]; optional [N, C] ``old_logp`` (absent when mu = 1:
  the current log-probs, detached, are the old ones), ``ref_logp`` (only
  when beta != 0) and ``sampler_logp`` (for the mismatch metric / TIS).

The step splits the batch into ``micro_batches`` (a `lax.scan`), sums each
micro-batch's gradient of ``loss_sum`` and its denominator, and divides once:
token-mean stays global (see `rl.algo`). A non-finite loss or gradient skips
the update (parameters and optimizer state unchanged) and counts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.model import param_shardings
from rl import algo
from rl.config import OptimSection
from rl.policy import grouped_logprobs_and_entropy, logprobs_and_entropy

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step.

    Attributes:
      kind: "grpo" or "sft".
      loss: the GRPO loss settings (ignored for SFT).
      micro_batches: gradient-accumulation micro-batches.
      temperature: the sampler's temperature (log-probs use logits / T).
      logits_chunk: completion positions per chunk of the log-softmax (None: by budget).
    """

    kind: str = "grpo"
    loss: algo.PolicyLossConfig = algo.PolicyLossConfig()
    micro_batches: int = 1
    temperature: float = 1.0
    logits_chunk: int | None = None


def learning_rate_schedule(optim: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine / linear decay / constant."""
    peak = optim.learning_rate
    decay_steps = max(1, total_steps - optim.warmup_steps)
    end = peak * optim.final_lr_ratio
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.final_lr_ratio)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if optim.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak, optim.warmup_steps)
    return optax.join_schedules([warm, after], [optim.warmup_steps])


def make_optimizer(optim: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the schedule, after global-norm clipping (when max_grad_norm > 0)."""
    parts = []
    if optim.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2,
                             eps=optim.eps, weight_decay=optim.weight_decay))
    return optax.chain(*parts)


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh, rules=None):
    """Shardings of the train state: moments like their parameters, scalars replicated."""
    p_sh = param_shardings(model_cfg, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(optimizer.init, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), _param_shapes(model_cfg)))
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract, p_sh,
                                   transform_non_params=lambda _: replicated)
    return {"params": p_sh, "opt_state": opt_sh, "step": replicated, "skipped": replicated}


def _param_shapes(model_cfg: ModelConfig):
    from models.model import param_shapes

    return param_shapes(model_cfg)


def init_state(params, optimizer: optax.GradientTransformation, shardings=None) -> State:
    """A fresh train state around `params` (placed on `shardings` when given)."""
    def make(p):
        return {"params": p, "opt_state": optimizer.init(p),
                "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}

    if shardings is None:
        return jax.jit(make)(params)
    return jax.jit(make, out_shardings=shardings)(params)


def batch_sharding(mesh, rules, shape: tuple[int, ...]):
    """Rows over the batch mesh axes (rules.batch), other dimensions replicated; rows
    that the batch axes do not divide (e.g. few prompts) are replicated."""
    from jaxsql.sharding import logical_to_sharding

    return logical_to_sharding(("batch",) + (None,) * (len(shape) - 1), mesh, rules, shape)


def _split_micro(x, m: int):
    # Row r goes to micro-batch r % m, so every device's shard feeds every
    # micro-batch and no resharding is needed.
    n = x.shape[0]
    return x.reshape((n // m, m) + x.shape[1:]).swapaxes(0, 1)


def _completion_view(mb: dict) -> tuple[dict, int]:
    """The micro-batch with per-token arrays over the C scored columns, and C.

    Rows may also carry full-width [N, T] per-token arrays (completion_mask
    as wide as tokens): then every position but the first is scored, C = T - 1.
    """
    T = mb["tokens"].shape[1]
    C = mb["completion_mask"].shape[1]
    if C != T:
        return mb, C
    out = dict(mb)
    for k in ("completion_mask", "old_logp", "ref_logp", "sampler_logp"):
        if k in out:
            out[k] = out[k][:, 1:]
    return out, T - 1


def _split_batch(batch: dict, m: int) -> dict:
    """[m, ...] micro-batches; grouped batches are split by prompt, each with its G rows."""
    if "prompt_tokens" not in batch:
        return jax.tree.map(lambda x: _split_micro(x, m), batch)
    n_prompts = batch["prompt_tokens"].shape[0]
    G = batch["completion_mask"].shape[0] // n_prompts
    out = {}
    for k, x in batch.items():
        if k.startswith("prompt_"):
            out[k] = _split_micro(x, m)
        else:
            y = _split_micro(x.reshape((n_prompts, G) + x.shape[1:]), m)
            out[k] = y.reshape((m, (n_prompts // m) * G) + x.shape[1:])
    return out


def _micro_loss(params, mb: dict, model_cfg: ModelConfig, sc: StepConfig):
    """(loss_sum, (denominator, metric sums)) of one micro-batch."""
    want_entropy = sc.kind == "grpo"
    if "prompt_tokens" in mb:
        logp, ent = grouped_logprobs_and_entropy(
            params, model_cfg, mb["prompt_tokens"], mb["prompt_mask"], mb["completion_tokens"],
            mb["completion_mask"], temperature=sc.temperature, with_entropy=want_entropy,
            chunk=sc.logits_chunk)
    else:
        mb, C = _completion_view(mb)
        logp, ent = logprobs_and_entropy(params, model_cfg, mb["tokens"], mb["mask"], C,
                                         temperature=sc.temperature, with_entropy=want_entropy,
                                         chunk=sc.logits_chunk)
    cm = mb["completion_mask"].astype(jnp.float32)
    if sc.kind == "sft":
        s, d = algo.sft_loss(logp, cm)
        return s, (d, {"tokens": d, "nll": s})
    old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
    s, d, metrics = algo.policy_loss(logp, old, mb["advantages"], cm, sc.loss,
                                     ref_logp_BT=mb.get("ref_logp"),
                                     sampler_logp_BT=mb.get("sampler_logp"))
    metrics["entropy"] = (ent * cm).sum()
    return s, (d, metrics)


def _is_finite_tree(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def make_step_fn(model_cfg: ModelConfig, sc: StepConfig,
                 optimizer: optax.GradientTransformation) -> Callable[[State, dict], tuple[State, dict]]:
    """The un-jitted step ``(state, batch) -> (state, metrics)``."""
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def step(state: State, batch: dict) -> tuple[State, dict]:
        params = state["params"]
        m = sc.micro_batches
        micro = _split_batch(batch, m)

        def body(carry, mb):
            g_acc, s_acc, d_acc, met_acc = carry
            (s, (d, met)), g = grad_fn(params, mb, model_cfg, sc)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            met_acc = jax.tree.map(jnp.add, met_acc, met)
            return (g_acc, s_acc + s, d_acc + d, met_acc), None

        first = jax.tree.map(lambda x: x[0], micro)
        met_shape = jax.eval_shape(lambda: _micro_loss(params, first, model_cfg, sc)[1][1])
        zeros_met = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), met_shape)
        zeros_g = jax.tree.map(jnp.zeros_like, params)
        init = (zeros_g, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros_met)
        (g_sum, s_sum, d_sum, met), _ = jax.lax.scan(body, init, micro)

        denom = jnp.maximum(d_sum, 1e-8)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        loss = s_sum / denom
        ok = jnp.isfinite(loss) & _is_finite_tree(grads)
        grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + ok.astype(jnp.int32),
            "skipped": state["skipped"] + (1 - ok.astype(jnp.int32)),
        }
        tokens = jnp.maximum(met["tokens"], 1.0)
        out = {"loss": loss, "grad_norm": optax.tree.norm(g_sum) / denom,
               "update_skipped": 1.0 - ok.astype(jnp.float32), "tokens": met["tokens"]}
        for k, v in met.items():
            if k not in ("tokens", "nll"):
                out["clip_fraction" if k == "clipped" else k] = v / tokens
        if "nll" in met:
            out["nll"] = met["nll"] / tokens
        return new_state, out

    return step


_SHARED: dict[tuple, dict] = {}


class TrainStep:
    """The jitted step with explicit in/out shardings over `mesh`, state donated.

    One compiled function per set of batch keys (e.g. with or without
    ``ref_logp``). Call as ``state, metrics = train_step(state, batch)``.
    """

    def __init__(self, model_cfg: ModelConfig, sc: StepConfig, optimizer: optax.GradientTransformation,
                 mesh, rules=None, cache_key: Any = None):
        """`cache_key` (hashable, e.g. the OptimSection and step count that built `optimizer`)
        lets runs in one process share compiled steps (tests, resume)."""
        self.model_cfg, self.sc, self.optimizer = model_cfg, sc, optimizer
        self.mesh, self.rules = mesh, rules
        self.state_shardings = state_shardings(model_cfg, optimizer, mesh, rules)
        self._fn = make_step_fn(model_cfg, sc, optimizer)
        if cache_key is None:
            self._compiled: dict[tuple, Any] = {}
        else:
            self._compiled = _SHARED.setdefault((model_cfg, sc, mesh, rules, cache_key), {})

    def batch_shardings(self, batch: dict) -> dict:
        """Shardings for a batch dict (rows over the batch mesh axes)."""
        return {k: batch_sharding(self.mesh, self.rules, tuple(jnp.shape(v))) for k, v in batch.items()}

    def place_batch(self, batch: dict) -> dict:
        """Put host arrays of a batch onto the mesh."""
        sh = self.batch_shardings(batch)
        return {k: jax.device_put(v, sh[k]) for k, v in batch.items()}

    def __call__(self, state: State, batch: dict) -> tuple[State, dict]:
        if "prompt_tokens" in batch and batch["prompt_tokens"].shape[0] % self.sc.micro_batches:
            raise ValueError(f"grouped batch: {batch['prompt_tokens'].shape[0]} prompts are not divisible by "
                             f"micro_batches={self.sc.micro_batches}; use full rows (rl.rollout.ungroup)")
        key = tuple(sorted((k, tuple(jnp.shape(v))) for k, v in batch.items()))
        fn = self._compiled.get(key)
        if fn is None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            fn = jax.jit(self._fn, in_shardings=(self.state_shardings, self.batch_shardings(batch)),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
            self._compiled[key] = fn
        return fn(state, batch)
