"""Multi-host start-up: `jax.distributed.initialize` when asked to.

On a Cloud TPU pod every host runs the same command; `tpu_scripts/launch.sh`
sets ``JAXSQL_DISTRIBUTED=1`` and JAX reads the coordinator from the TPU
metadata. For other clusters (or two CPU processes on localhost in tests),
``JAXSQL_COORDINATOR``, ``JAXSQL_NUM_PROCESSES`` and ``JAXSQL_PROCESS_ID``
name them explicitly.
"""

from __future__ import annotations

import os

from jaxsql.errors import ConfigError

_initialized = False


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
