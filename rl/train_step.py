"""One jitted, sharded optimizer step for every trainer; the objective is injected.

The train state is a dict pytree ``{"params", "opt_state", "step", "skipped"}``
whose parameters and optimizer moments are sharded by the model's logical
axes (`jaxsql.sharding`); it is donated to the step. The batch is an
`rl.batch.Batch` (grouped rows, the trainers' layout) or `rl.batch.FlatBatch`
(full rows), its rows sharded over the batch mesh axes; the step knows the
layout from the type.

The objective is a registered loss (`rl.losses`, named by
``StepConfig.loss``): GRPO's clipped surrogate, SFT's cross-entropy, or any
other registered function; the step does not know which. It splits the batch
into ``micro_batches`` (a `lax.scan`), sums each micro-batch's gradient of
``loss_sum`` and its denominator, and divides once: token-mean stays global
(see `rl.algo`). A non-finite loss or gradient skips the update (parameters
and optimizer state unchanged) and counts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.model import param_shardings
from rl import algo
from rl.batch import Batch, FlatBatch, TrainBatch, batch_fields
from rl.config import OptimSection
from rl.losses import LossContext, LossFn, get_loss

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step.

    Attributes:
      loss: name of the objective in `rl.losses.LOSSES` ("grpo", "sft", ...).
      loss_config: the objective's own hashable settings (`rl.algo.PolicyLossConfig` for "grpo";
        unused by "sft").
      micro_batches: gradient-accumulation micro-batches.
      temperature: the sampler's temperature (log-probs use logits / T).
      logits_chunk: completion positions per chunk of the log-softmax (None: by budget).
    """

    loss: str = "grpo"
    loss_config: Any = algo.PolicyLossConfig()
    micro_batches: int = 1
    temperature: float = 1.0
    logits_chunk: int | None = None

    def context(self, model_cfg: ModelConfig) -> LossContext:
        """What the loss function gets besides parameters and batch."""
        return LossContext(model_cfg, self.temperature, self.logits_chunk, self.loss_config)


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


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh, rules=None,
                    specs=None):
    """Shardings of the train state: moments like their parameters, scalars replicated.

    `specs` (a pytree of `models.model.ParamSpec`) describes parameters other than the
    decoder's own (e.g. a PRM's value head, `models.prm.prm_param_specs`); default: the decoder's.
    """
    if specs is None:
        p_sh = param_shardings(model_cfg, mesh, rules)
        shapes = _param_shapes(model_cfg)
    else:
        from jaxsql.sharding import tree_shardings
        from models.model import ParamSpec

        is_spec = lambda x: isinstance(x, ParamSpec)  # noqa: E731
        dt = jnp.dtype(model_cfg.param_dtype)
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), specs, is_leaf=is_spec)
        p_sh = tree_shardings(jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec), mesh, rules, shapes,
                              what="parameter")
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(optimizer.init, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes))
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


def _is_finite_tree(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def make_step_fn(model_cfg: ModelConfig, sc: StepConfig, optimizer: optax.GradientTransformation,
                 loss_fn: LossFn | None = None) -> Callable[[State, TrainBatch], tuple[State, dict]]:
    """The un-jitted step ``(state, batch) -> (state, metrics)`` minimising `loss_fn`
    (default: the registered loss ``sc.loss``)."""
    loss_fn = loss_fn or get_loss(sc.loss)
    ctx = sc.context(model_cfg)

    def micro_loss(params, mb):
        s, d, met = loss_fn(params, mb, ctx)
        return s, (d, met)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: State, batch: TrainBatch) -> tuple[State, dict]:
        params = state["params"]
        micro = batch.micro_batches(sc.micro_batches)

        def body(carry, mb):
            g_acc, s_acc, d_acc, met_acc = carry
            (s, (d, met)), g = grad_fn(params, mb)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            met_acc = jax.tree.map(jnp.add, met_acc, met)
            return (g_acc, s_acc + s, d_acc + d, met_acc), None

        first = jax.tree.map(lambda x: x[0], micro)
        met_shape = jax.eval_shape(lambda: micro_loss(params, first)[1][1])
        if "tokens" not in met_shape:
            raise ValueError(f"loss {sc.loss!r}: its metric sums must include 'tokens'")
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
        for k, v in met.items():  # sums over the scored positions -> per-position means
            if k != "tokens":
                out[k] = v / tokens
        return new_state, out

    return step


_SHARED: dict[tuple, dict] = {}


class TrainStep:
    """The jitted step with explicit in/out shardings over `mesh`, state donated.

    One compiled function per batch type and set of present fields and shapes
    (e.g. with or without ``ref_logp``). Call as ``state, metrics = train_step(state, batch)``.
    """

    def __init__(self, model_cfg: ModelConfig, sc: StepConfig, optimizer: optax.GradientTransformation,
                 mesh, rules=None, cache_key: Any = None, loss_fn: LossFn | None = None, specs=None):
        """`cache_key` (hashable, e.g. the OptimSection and step count that built `optimizer`)
        lets runs in one process share compiled steps (tests, resume). `loss_fn` replaces the
        registered loss ``sc.loss`` (the objective is looked up by name by default). `specs`:
        the parameters' `ParamSpec` tree when they are not the decoder's own (`state_shardings`)."""
        self.model_cfg, self.sc, self.optimizer = model_cfg, sc, optimizer
        self.mesh, self.rules = mesh, rules
        self.loss_fn = loss_fn or get_loss(sc.loss)
        self.state_shardings = state_shardings(model_cfg, optimizer, mesh, rules, specs)
        self._fn = make_step_fn(model_cfg, sc, optimizer, self.loss_fn)
        if cache_key is None:
            self._compiled: dict[tuple, Any] = {}
        else:
            key = (model_cfg, sc, self.loss_fn, mesh, rules, cache_key, specs is not None)
            self._compiled = _SHARED.setdefault(key, {})

    def batch_shardings(self, batch: TrainBatch, global_rows: bool = False) -> TrainBatch:
        """A batch of shardings: rows over the batch mesh axes, other dimensions replicated.

        `global_rows`: the batch's host (numpy) fields hold this process's rows only, so
        their global leading dimension is ``process_count`` times theirs.
        """
        from jaxsql.distributed import process_count

        def shape(v) -> tuple[int, ...]:
            s = tuple(jnp.shape(v))
            if global_rows and not isinstance(v, jax.Array) and s:
                s = (s[0] * process_count(),) + s[1:]
            return s

        return jax.tree.map(lambda v: batch_sharding(self.mesh, self.rules, shape(v)), batch)

    def place_batch(self, batch: TrainBatch) -> TrainBatch:
        """Put a batch's arrays onto the mesh: the one place where rows reach the devices.

        A host (numpy) field holds *this process's* rows: its block of the global batch,
        as the data pipeline gives it (on one process, all rows); the processes' blocks
        become one global array (`jaxsql.distributed.rows_to_global`), so N processes
        train on the batch one process would. A `jax.Array` field is already global (e.g.
        the sampler's rows) and is only moved onto the batch sharding.
        """
        from jaxsql.distributed import rows_to_global

        def place(x, sharding):
            if isinstance(x, jax.Array):
                return jax.device_put(x, sharding)
            return rows_to_global(x, sharding)

        return jax.tree.map(place, batch, self.batch_shardings(batch, global_rows=True))

    def global_rows(self, value) -> jax.Array:
        """A host array that every process holds whole (e.g. advantages computed from the
        gathered rewards) as a global array on the batch sharding of its shape."""
        from jaxsql.distributed import from_host

        value = np.asarray(value)
        return from_host(value, batch_sharding(self.mesh, self.rules, value.shape))

    def __call__(self, state: State, batch: TrainBatch) -> tuple[State, dict]:
        if not isinstance(batch, (Batch, FlatBatch)):
            raise TypeError(f"TrainStep: the batch must be an rl.batch.Batch or FlatBatch, "
                            f"got {type(batch).__name__}")
        if isinstance(batch, Batch) and batch.num_prompts % self.sc.micro_batches:
            raise ValueError(f"grouped batch: {batch.num_prompts} prompts are not divisible by "
                             f"micro_batches={self.sc.micro_batches}; use full rows (Batch.flat())")
        key = (type(batch).__name__,) + tuple(sorted((k, tuple(jnp.shape(v)))
                                                     for k, v in batch_fields(batch).items()))
        fn = self._compiled.get(key)
        if fn is None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            fn = jax.jit(self._fn, in_shardings=(self.state_shardings, self.batch_shardings(batch)),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
            self._compiled[key] = fn
        # The mesh as context: attention "auto" then places the splash kernel on each chip of a
        # multi-chip TPU (models.attention runs it under shard_map), where without a mesh it
        # would fall back to xla.
        with jax.set_mesh(self.mesh):
            return fn(state, batch)
