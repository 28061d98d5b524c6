"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter and activation names its dimensions with *logical* axes
("batch", "embed", "heads", ...). `ShardingRules` says which mesh axis (of
`MESH_AXES`) each logical axis is split over; `logical_to_sharding` turns a
tuple of logical names into a `NamedSharding`. Changing the parallelism of a
run means changing the mesh shape or this table, never the model code.

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


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated).

    Defaults: batch over data and fsdp (data parallel), the model dimension
    ("embed") over fsdp (ZeRO-3 style parameter sharding), heads / MLP /
    vocabulary over tensor (Megatron-style tensor parallel).
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

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            names = (value,) if isinstance(value, str) else (value or ())
            for n in names:
                if n not in MESH_AXES:
                    raise JaxsqlError(
                        f"ShardingRules.{f.name}: unknown mesh axis {n!r}; mesh axes are {MESH_AXES}"
                    )

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        """The mesh axes of one logical axis name (None for an unnamed axis)."""
        if logical is None:
            return None
        if not hasattr(self, logical):
            known = [f.name for f in dataclasses.fields(self)]
            raise JaxsqlError(f"unknown logical axis {logical!r}; known axes are {known}")
        return getattr(self, logical)

    @classmethod
    def from_dict(cls, table: Mapping[str, MeshAxes]) -> "ShardingRules":
        """Rules from a plain mapping (YAML), lists turned into tuples."""
        norm = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise JaxsqlError(f"ShardingRules: unknown logical axes {unknown}; known are {sorted(known)}")
        return cls(**norm)


def logical_to_spec(axes: Sequence[str | None], mesh, rules: ShardingRules, shape: Sequence[int] | None = None):
    """`PartitionSpec` for logical `axes`.

    A mesh axis is used at most once (the first logical axis that asks for it
    wins) and mesh axes of size 1 are dropped. With `shape`, a dimension that
    the mesh axes do not divide evenly is replicated instead (e.g. 2 KV heads
    on a tensor axis of 4), so small models still run on big meshes.
    """
    from jax.sharding import PartitionSpec

    used: set[str] = set()
    spec = []
    for d, logical in enumerate(axes):
        target = rules.mesh_axes(logical)
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        if shape is not None and names:
            size = math.prod(mesh.shape[n] for n in names)
            if shape[d] % size != 0:
                names = ()
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def logical_to_sharding(axes: Sequence[str | None], mesh, rules: ShardingRules | None = None,
                        shape: Sequence[int] | None = None):
    """`NamedSharding` on `mesh` for a tensor whose dimensions are named `axes`."""
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules or ShardingRules(), shape))


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree: Any, mesh, rules: ShardingRules | None = None, shapes_tree: Any = None):
    """A pytree of `NamedSharding`s from a pytree of logical-axis tuples.

    `shapes_tree` (same structure; leaves with `.shape`, e.g. from
    `jax.eval_shape`) enables the divisibility check of `logical_to_spec`.
    """
    import jax

    rules = rules or ShardingRules()
    if shapes_tree is None:
        return jax.tree.map(lambda a: logical_to_sharding(a, mesh, rules), axes_tree, is_leaf=_is_axes)
    return jax.tree.map(
        lambda a, s: logical_to_sharding(a, mesh, rules, s.shape), axes_tree, shapes_tree, is_leaf=_is_axes
    )
