"""Process start-up from the environment: CPU device count, and `jax.distributed.initialize`.

`configure_cpu_devices` splits a CPU-only host into one XLA device per core
(``JAXSQL_CPU_DEVICES``): XLA:CPU spreads one small matmul over two cores
poorly, while two devices that each decode half of the batch keep both
busy, so the sampler runs data parallel over them (`models.sampler`). A
job that only samples from a model larger than the last-level cache gets
ONE device instead: such a model is decoded on one device anyway
(`models.sampler.sampling_devices`), and XLA:CPU gives each device its own
share of the cores, so one device of two decodes on fewer threads
(measured in docs/scale.md, "The CPU path").

On a Cloud TPU pod every host runs the same command; `tpu_scripts/launch.sh`
sets ``JAXSQL_DISTRIBUTED=1`` and JAX reads the coordinator from the TPU
metadata. For other clusters (or two CPU processes on localhost in tests),
``JAXSQL_COORDINATOR``, ``JAXSQL_NUM_PROCESSES`` and ``JAXSQL_PROCESS_ID``
name them explicitly.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, MutableMapping

if TYPE_CHECKING:
    import numpy as np

from jaxsql.errors import ConfigError

_initialized = False

CPU_DEVICES_ENV = "JAXSQL_CPU_DEVICES"
MAX_AUTO_CPU_DEVICES = 8
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


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


def configure_cpu_devices(environ: MutableMapping[str, str] | None = None, *,
                          sampling_bytes: int | None = None) -> int | None:
    """Set the number of XLA CPU devices before JAX starts; returns the number set (None: left alone).

    ``JAXSQL_CPU_DEVICES`` is ``auto`` (default) or a positive integer. Auto
    gives one device per core available to this process, at most
    `MAX_AUTO_CPU_DEVICES`; but one device when `sampling_bytes` (given by
    the CLI for a job that samples on its own, ``--devices auto``: the
    weights' bytes of its model) exceeds the last-level cache, since such a
    model decodes on one device (`models.sampler.sampling_devices`) and one
    device of several runs on a share of the cores. Auto does nothing when
    an accelerator plugin (CUDA, ROCm, TPU) is installed: there the CPU
    devices do no work. A count
    the user already chose (``JAX_NUM_CPU_DEVICES``, or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``) wins. Has
    no effect once JAX has created its backends, so the CLI calls it first.
    """
    env = os.environ if environ is None else environ
    if "JAX_NUM_CPU_DEVICES" in env or "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
        return None
    requested = env.get(CPU_DEVICES_ENV, "auto").strip().lower()
    if requested == "auto":
        if any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_PLUGINS):
            return None
        count = min(len(os.sched_getaffinity(0)), MAX_AUTO_CPU_DEVICES)
        if sampling_bytes is not None and count > 1:
            cache = last_level_cache_bytes()
            if cache is not None and sampling_bytes > cache:
                count = 1
    else:
        try:
            count = int(requested)
        except ValueError:
            count = 0
        if count < 1:
            raise ConfigError(f"{CPU_DEVICES_ENV} must be 'auto' or a positive integer, got {env[CPU_DEVICES_ENV]!r}")
    env["JAX_NUM_CPU_DEVICES"] = str(count)
    return count


def initialize_from_env() -> bool:
    """Call `jax.distributed.initialize` once if the environment asks for it.

    Returns True when this process is part of a multi-process run.
    """
    global _initialized
    if _initialized:
        return True
    flag = os.environ.get("JAXSQL_DISTRIBUTED", "").strip().lower()
    coordinator = os.environ.get("JAXSQL_COORDINATOR")
    if flag in ("", "0", "false", "no") and not coordinator:
        return False
    import jax

    kwargs = {}
    if coordinator:
        try:
            kwargs = dict(
                coordinator_address=coordinator,
                num_processes=int(os.environ["JAXSQL_NUM_PROCESSES"]),
                process_id=int(os.environ["JAXSQL_PROCESS_ID"]),
            )
        except KeyError as e:
            raise ConfigError(
                f"JAXSQL_COORDINATOR is set but {e.args[0]} is not; set "
                "JAXSQL_NUM_PROCESSES and JAXSQL_PROCESS_ID too"
            ) from None
        except ValueError as e:
            raise ConfigError(f"JAXSQL_NUM_PROCESSES/JAXSQL_PROCESS_ID: {e}") from None
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


# --- helpers for code that runs the same on one process and on a pod -----------------------
#
# Every process of a multi-host run executes the same program. Rows of a batch
# are split between processes (each holds the rows its devices own), so code
# that moves data between the host and the mesh, writes files, or takes a
# decision that changes the number of device calls goes through these helpers
# instead of ad-hoc `jax.device_put` / `jax.process_index()` calls.


def process_index() -> int:
    """This process's index (0 on a single host)."""
    import jax

    return int(jax.process_index())


def process_count() -> int:
    """How many processes take part in the run (1 on a single host)."""
    import jax

    return int(jax.process_count())


def is_lead_process() -> bool:
    """True on the one process that writes logs, metrics, reports and exports (process 0)."""
    return process_index() == 0


def to_global(local_rows, sharding, global_shape=None):
    """A global `jax.Array` on `sharding` from this process's rows.

    `local_rows` (host array) holds the rows of the global array that this
    process's devices own, in order; on one process that is the whole array.
    `global_shape` defaults to the local shape with the leading dimension
    multiplied by the number of processes that hold distinct rows.
    """
    import jax
    import numpy as np

    local_rows = np.asarray(local_rows)
    if process_count() == 1:
        return jax.device_put(local_rows, sharding)
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def rows_to_global(local_rows, sharding):
    """A global `jax.Array` on `sharding` whose rows are every process's `local_rows`
    stacked in process order (each process holds its block of a global batch, as the data
    pipeline gives it; the same shape on every process).

    When `sharding` gives each process exactly its own block of rows this is `to_global`;
    otherwise (rows replicated because the batch axes do not divide them, or a
    different split) the blocks are gathered first, so the result is right for any
    sharding. On one process: ``jax.device_put``.
    """
    import numpy as np

    local_rows = np.asarray(local_rows)
    n = process_count()
    if n == 1:
        return to_global(local_rows, sharding)
    global_shape = (local_rows.shape[0] * n,) + local_rows.shape[1:]
    if row_share(sharding, global_shape[0]) == (process_index(), n):
        return to_global(local_rows, sharding, global_shape)
    whole = process_values(local_rows).reshape(global_shape)
    return from_host(whole, sharding)


def from_host(value, sharding):
    """A global `jax.Array` on `sharding` from a host value that every process holds whole
    (e.g. advantages computed from gathered rewards): each device takes its slice."""
    import jax
    import numpy as np

    value = np.asarray(value)
    if process_count() == 1:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x):
    """The whole value of a (possibly multi-host) `jax.Array` as a numpy array on every process."""
    import jax
    import numpy as np

    if process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x):
    """This process's rows of a global array whose leading axis is split over processes,
    as a numpy array (the inverse of `to_global`)."""
    import numpy as np

    if process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # replicas of one row block on several local devices
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts, axis=0)


def process_values(value) -> "np.ndarray":
    """`value` (a number or small array, the same shape on every process) from every
    process, stacked along a new leading axis in process order: [process_count, ...]."""
    import numpy as np

    value = np.asarray(value)
    if process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=False))


def process_objects(obj) -> list:
    """`obj` (any picklable value) from every process, as a list in process order.

    Two collectives (the sizes, then the padded bytes); meant for small host results
    such as one batch's scores. On one process: ``[obj]``.
    """
    import pickle

    import numpy as np

    if process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = process_values(np.int32(data.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = process_values(padded)
    # the bytes come from this run's own processes (the peers of the collective)
    return [pickle.loads(gathered[i, : int(sizes[i])].tobytes()) for i in range(len(sizes))]


def row_share(sharding, rows: int | None = None) -> tuple[int, int]:
    """(index, count): this process holds row block `index` of `count` equal, contiguous
    blocks of any array whose leading axis `sharding` splits.

    On one process, or when the rows are not split across processes (every
    process then holds all of them), the answer is (0, 1). Rows that do not
    fall into one contiguous block per process (a mesh whose device order
    interleaves processes along the batch axes) are a `ConfigError`: the data
    pipeline and the sampler read each process's rows as one block. `rows`
    (default: the number of row shards) is the leading dimension to check.
    """
    import math

    if process_count() == 1 or sharding is None:
        return 0, 1
    spec = getattr(sharding, "spec", None)
    lead = spec[0] if spec is not None and len(spec) else None
    names = (lead,) if isinstance(lead, str) else tuple(lead or ())
    shards = math.prod(sharding.mesh.shape[n] for n in names) if names else 1
    n = shards if rows is None else rows
    shape = (n,) + (1,) * (max(1, len(spec or ())) - 1)
    mine = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else n)
                   for idx in sharding.addressable_devices_indices_map(shape).values()})
    start, stop = mine[0][0], mine[-1][1]
    contiguous = all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
    size = stop - start
    if not contiguous or n % size or start % size:
        raise ConfigError(
            f"process {process_index()} holds rows {mine} of {n}: rows are not one contiguous block per "
            f"process; order the mesh so each process's devices are adjacent along the batch axes")
    return start // size, n // size


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one (a stop signal, a budget,
    a refill): all processes then take the same branch and make the same device calls."""
    import numpy as np

    return bool(process_values(np.int32(bool(flag))).max())


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op on one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
