"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and activation names its dimensions with *logical* axes
("batch", "embed", "heads", ...). `ShardingRules` says which mesh axis (of
`MESH_AXES`) each logical axis is split over; `logical_to_sharding` turns a
tuple of logical names into a `NamedSharding`. Changing the parallelism of a
run means changing the mesh shape or this table, never the model code.

Named presets (`RULE_PRESETS`, chosen in a run config with ``mesh.rules``
and adjusted per logical axis with ``mesh.rule_overrides``):

- ``dp``: pure data parallel; rows over data x fsdp, every parameter replicated.
- ``fsdp``: rows over data x fsdp, parameters split along ``embed`` over fsdp
  (ZeRO-3 style), nothing on tensor.
- ``fsdp_tensor`` (default): ``fsdp`` plus heads / MLP / vocabulary over tensor
  (Megatron-style tensor parallel).

A rule that cannot be honoured is an error, never a quiet replication: a
mesh axis that two dimensions of one array ask for, or a dimension that its
mesh axes do not divide, raises `JaxsqlError` naming the array, the axis and
the sizes. The one deliberate exception is listed in the table itself:
``replicate_indivisible`` names logical axes (by default only ``batch``, the
rows of activations) whose dimension is replicated when it does not divide,
so a step with fewer prompts than batch devices still runs.

The mesh uses `AxisType.Auto` axes: jit propagates shardings from inputs
and `out_shardings` (GSPMD), which is what `pjit` did.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from jaxsql.errors import JaxsqlError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None):
    """A `jax.sharding.Mesh` of shape (data, fsdp, tensor) with Auto axis types.

    `devices` defaults to all of `jax.devices()`; their number must equal
    data * fsdp * tensor.
    """
    import jax
    import numpy as np

    devices = list(jax.devices() if devices is None else devices)
    shape = (data, fsdp, tensor)
    if any(int(s) < 1 for s in shape):
        raise JaxsqlError(f"mesh shape data={data} fsdp={fsdp} tensor={tensor}: every axis must be >= 1")
    if math.prod(shape) != len(devices):
        raise JaxsqlError(
            f"mesh shape data={data} x fsdp={fsdp} x tensor={tensor} = {math.prod(shape)} "
            f"devices, but {len(devices)} devices are available"
        )
    grid = np.asarray(devices, dtype=object).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def _names(value: MeshAxes) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated).

    Defaults (the ``fsdp_tensor`` preset): batch over data and fsdp (data
    parallel), the model dimension ("embed") over fsdp (ZeRO-3 style
    parameter sharding), heads / MLP / vocabulary over tensor
    (Megatron-style tensor parallel). `replicate_indivisible` lists the
    logical axes whose dimension is replicated, rather than refused, when
    its mesh axes do not divide it.
    """

    batch: MeshAxes = ("data", "fsdp")
    seq: MeshAxes = None
    embed: MeshAxes = "fsdp"
    heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    mlp: MeshAxes = "tensor"
    vocab: MeshAxes = "tensor"
    layers: MeshAxes = None
    cache_seq: MeshAxes = None
    replicate_indivisible: tuple[str, ...] = ("batch",)

    def __post_init__(self) -> None:
        logical = self.logical_axes()
        for name in logical:
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            names = _names(value)
            for n in names:
                if n not in MESH_AXES:
                    raise JaxsqlError(
                        f"ShardingRules.{name}: unknown mesh axis {n!r}; mesh axes are {MESH_AXES}"
                    )
            if len(set(names)) != len(names):
                raise JaxsqlError(f"ShardingRules.{name}: mesh axis listed twice in {value!r}")
        object.__setattr__(self, "replicate_indivisible", tuple(self.replicate_indivisible))
        for name in self.replicate_indivisible:
            if name not in logical:
                raise JaxsqlError(f"ShardingRules.replicate_indivisible: unknown logical axis {name!r}; "
                                  f"known are {list(logical)}")

    @classmethod
    def logical_axes(cls) -> tuple[str, ...]:
        """The logical axis names the table maps."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "replicate_indivisible")

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        """The mesh axes of one logical axis name (None for an unnamed axis)."""
        if logical is None:
            return None
        if logical not in self.logical_axes():
            raise JaxsqlError(f"unknown logical axis {logical!r}; known axes are {list(self.logical_axes())}")
        return getattr(self, logical)

    def used_mesh_axes(self) -> set[str]:
        """Mesh axes that at least one logical axis is split over."""
        return {n for name in self.logical_axes() for n in _names(getattr(self, name))}

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> "ShardingRules":
        """Rules from a plain mapping (YAML), lists turned into tuples."""
        norm = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise JaxsqlError(f"ShardingRules: unknown logical axes {unknown}; known are {sorted(known)}")
        return cls(**norm)


_NO_PARAMETER_SHARDING = dict(embed=None, heads=None, kv_heads=None, mlp=None, vocab=None)

RULE_PRESETS: dict[str, ShardingRules] = {
    "dp": ShardingRules(**_NO_PARAMETER_SHARDING),
    "fsdp": ShardingRules(**{**_NO_PARAMETER_SHARDING, "embed": "fsdp"}),
    "fsdp_tensor": ShardingRules(),
}


def sharding_rules(preset: str = "fsdp_tensor", overrides: Mapping[str, Any] | None = None) -> ShardingRules:
    """The rules of a named preset (`RULE_PRESETS`) with per-logical-axis overrides,
    e.g. ``sharding_rules("fsdp", {"vocab": "tensor"})``."""
    if preset not in RULE_PRESETS:
        raise JaxsqlError(f"unknown sharding rules {preset!r}; presets are {sorted(RULE_PRESETS)}")
    base = RULE_PRESETS[preset]
    if not overrides:
        return base
    table = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - set(table))
    if unknown:
        raise JaxsqlError(f"unknown logical axes {unknown}; known are {sorted(table)}")
    table.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return ShardingRules(**table)


def check_rules_fit_mesh(rules: ShardingRules, mesh) -> None:
    """Refuse a mesh axis of size > 1 that no rule splits anything over: its devices
    would only hold copies and repeat the same work."""
    idle = [n for n in MESH_AXES if mesh.shape[n] > 1 and n not in rules.used_mesh_axes()]
    if idle:
        sizes = ", ".join(f"{n}={mesh.shape[n]}" for n in idle)
        raise JaxsqlError(f"mesh axis {sizes} is used by no sharding rule, so its devices would only repeat "
                          f"the work of the others; set it to 1 or choose rules that split over it")


def logical_to_spec(axes: Sequence[str | None], mesh, rules: ShardingRules, shape: Sequence[int] | None = None,
                    *, name: str = "array"):
    """`PartitionSpec` for logical `axes`; `name` says what the array is in errors.

    Mesh axes of size 1 are dropped. A mesh axis asked for by two dimensions
    is an error, and so (with `shape`) is a dimension that its mesh axes do
    not divide, unless its logical axis is in ``rules.replicate_indivisible``
    (then that dimension is replicated).
    """
    from jax.sharding import PartitionSpec

    owner: dict[str, tuple[int, str]] = {}
    spec = []
    for d, logical in enumerate(axes):
        wanted = _names(rules.mesh_axes(logical))
        for n in wanted:
            if n in owner:
                od, ological = owner[n]
                raise JaxsqlError(
                    f"{name}: mesh axis {n!r} is asked for by dimension {od} ({ological!r}) and dimension {d} "
                    f"({logical!r}) of logical axes {tuple(axes)}; a mesh axis can split one dimension only: "
                    f"change the sharding rules (mesh.rules / mesh.rule_overrides)")
            owner[n] = (d, logical)
        names = tuple(n for n in wanted if mesh.shape[n] > 1)
        if shape is not None and names:
            size = math.prod(mesh.shape[n] for n in names)
            if shape[d] % size != 0:
                if logical in rules.replicate_indivisible:
                    names = ()
                else:
                    split = " x ".join(f"{n}={mesh.shape[n]}" for n in names)
                    raise JaxsqlError(
                        f"{name}: dimension {d} ({logical!r}) of size {shape[d]} does not divide over mesh "
                        f"axes {split} = {size} (shape {tuple(shape)}); choose a mesh whose axes divide it or "
                        f"a rule that does not split {logical!r} (mesh.rule_overrides: {{{logical}: null}})")
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def logical_to_sharding(axes: Sequence[str | None], mesh, rules: ShardingRules | None = None,
                        shape: Sequence[int] | None = None, *, name: str = "array"):
    """`NamedSharding` on `mesh` for a tensor whose dimensions are named `axes`."""
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules or ShardingRules(), shape, name=name))


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree: Any, mesh, rules: ShardingRules | None = None, shapes_tree: Any = None,
                   what: str = "leaf"):
    """A pytree of `NamedSharding`s from a pytree of logical-axis tuples.

    `shapes_tree` (same structure; leaves with `.shape`, e.g. from
    `jax.eval_shape`) enables the divisibility check of `logical_to_spec`.
    Errors name the leaf by `what` and its path (e.g. ``parameter layers/wk``).
    """
    import jax

    rules = rules or ShardingRules()

    def path_name(path) -> str:
        return what + " " + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    if shapes_tree is None:
        return jax.tree_util.tree_map_with_path(
            lambda p, a: logical_to_sharding(a, mesh, rules, name=path_name(p)), axes_tree, is_leaf=_is_axes)
    return jax.tree_util.tree_map_with_path(
        lambda p, a, s: logical_to_sharding(a, mesh, rules, s.shape, name=path_name(p)),
        axes_tree, shapes_tree, is_leaf=_is_axes)
