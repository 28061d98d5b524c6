"""Process start-up from the environment: CPU device count, and `jax.distributed.initialize`.

`configure_cpu_devices` splits a CPU-only host into one XLA device per core
(``JAXSQL_CPU_DEVICES``): XLA:CPU spreads one small matmul over two cores
poorly, while two devices that each decode half of the batch keep both
busy, so the sampler runs data parallel over them (`models.sampler`).

On a Cloud TPU pod every host runs the same command; `tpu_scripts/launch.sh`
sets ``JAXSQL_DISTRIBUTED=1`` and JAX reads the coordinator from the TPU
metadata. For other clusters (or two CPU processes on localhost in tests),
``JAXSQL_COORDINATOR``, ``JAXSQL_NUM_PROCESSES`` and ``JAXSQL_PROCESS_ID``
name them explicitly.
"""

from __future__ import annotations

import importlib.util
import os
from typing import MutableMapping

from jaxsql.errors import ConfigError

_initialized = False

CPU_DEVICES_ENV = "JAXSQL_CPU_DEVICES"
MAX_AUTO_CPU_DEVICES = 8
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def configure_cpu_devices(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set the number of XLA CPU devices before JAX starts; returns the number set (None: left alone).

    ``JAXSQL_CPU_DEVICES`` is ``auto`` (default) or a positive integer. Auto
    gives one device per core available to this process, at most
    `MAX_AUTO_CPU_DEVICES`, and does nothing when an accelerator plugin
    (CUDA, ROCm, TPU) is installed: there the CPU devices do no work. A count
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
