"""Run one piece of code as several `jax.distributed` CPU processes on localhost.

`run_processes(code, n)` starts `n` Python processes (each with
`devices_per_process` simulated CPU devices) that share a coordinator on a free
loopback port, set through the variables `jaxsql.distributed.initialize_from_env`
reads, and returns each process's stdout. Any failure or timeout raises with
every process's output, so a hung collective cannot hang the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of one process of a localhost multi-process run."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAXSQL_COORDINATOR=f"127.0.0.1:{port}",
        JAXSQL_NUM_PROCESSES=str(num_processes),
        JAXSQL_PROCESS_ID=str(process_id),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra or {})
    return env


def run_processes(argv_or_code: list[str] | str, num_processes: int = 2, devices_per_process: int = 4,
                  timeout: float = 300.0, cwd: str | Path | None = None,
                  extra_env: dict[str, str] | None = None) -> list[str]:
    """Run `argv_or_code` (a command line, or Python source run with ``python -c``) as
    `num_processes` cooperating processes; returns their stdouts in process order."""
    port = free_port()
    argv = [sys.executable, "-c", argv_or_code] if isinstance(argv_or_code, str) else list(argv_or_code)
    procs = [subprocess.Popen(argv, env=process_env(i, num_processes, port, devices_per_process, extra_env),
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    deadline = time.monotonic() + timeout
    outs: list[tuple[str, str]] = [("", "")] * num_processes
    failed = False
    for i, p in enumerate(procs):
        try:
            outs[i] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failed = True
            for q in procs:
                q.kill()
            outs[i] = p.communicate()
        failed = failed or p.returncode != 0
    if failed:
        report = "\n".join(f"--- process {i} (exit {p.returncode})\nstdout:\n{o}\nstderr:\n{e[-4000:]}"
                           for i, (p, (o, e)) in enumerate(zip(procs, outs)))
        raise AssertionError(f"multi-process run failed or timed out:\n{report}")
    return [o for o, _ in outs]
