"""Start-up from the environment: CPU device count, multi-host (the single-host default must not initialise)."""

import os
import subprocess
import sys

import pytest

from jaxsql import distributed
from jaxsql.errors import ConfigError


def test_single_host_by_default(monkeypatch):
    for name in ("JAXSQL_DISTRIBUTED", "JAXSQL_COORDINATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAXSQL_DISTRIBUTED", "0")
    assert distributed.initialize_from_env() is False


def test_coordinator_without_process_count_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(distributed, "_initialized", False)
    monkeypatch.setenv("JAXSQL_COORDINATOR", "localhost:12345")
    monkeypatch.delenv("JAXSQL_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAXSQL_PROCESS_ID", raising=False)
    with pytest.raises(ConfigError, match="JAXSQL_NUM_PROCESSES"):
        distributed.initialize_from_env()
    monkeypatch.setenv("JAXSQL_NUM_PROCESSES", "two")
    monkeypatch.setenv("JAXSQL_PROCESS_ID", "0")
    with pytest.raises(ConfigError, match="JAXSQL_NUM_PROCESSES/JAXSQL_PROCESS_ID"):
        distributed.initialize_from_env()


def test_cpu_device_count_from_the_environment():
    env = {"JAXSQL_CPU_DEVICES": "3"}
    assert distributed.configure_cpu_devices(env) == 3 and env["JAX_NUM_CPU_DEVICES"] == "3"
    # a count the user already gave JAX wins, whichever way it was given
    assert distributed.configure_cpu_devices({"JAX_NUM_CPU_DEVICES": "5", "JAXSQL_CPU_DEVICES": "3"}) is None
    assert distributed.configure_cpu_devices({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) is None
    auto: dict[str, str] = {}
    count = distributed.configure_cpu_devices(auto)
    assert count is None or 1 <= count <= distributed.MAX_AUTO_CPU_DEVICES
    for bad in ("0", "-2", "many"):
        with pytest.raises(ConfigError, match="JAXSQL_CPU_DEVICES must be 'auto' or a positive integer"):
            distributed.configure_cpu_devices({"JAXSQL_CPU_DEVICES": bad})


def test_cpu_device_count_reaches_a_fresh_jax_process():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAXSQL_CPU_DEVICES="3", JAX_PLATFORMS="cpu")
    code = ("from jaxsql.distributed import configure_cpu_devices; configure_cpu_devices(); "
            "import jax; print(len(jax.devices()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
