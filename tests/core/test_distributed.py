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


def test_the_cli_sets_the_device_count_before_jax_starts():
    """`jaxsql` parses its arguments, then sets the CPU device count: building the parser must
    not import JAX (a command that read a default from a module importing JAX made every
    command run on one CPU device, whatever JAXSQL_CPU_DEVICES said)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAXSQL_CPU_DEVICES="3", JAX_PLATFORMS="cpu")
    code = ("import sys; from jaxsql.cli import build_parser, sampling_bytes; "
            "from jaxsql.distributed import configure_cpu_devices; "
            "args = build_parser().parse_args(['plan', '--model', 'mid', '--chip', 'v5p']); "
            "assert 'jax' not in sys.modules, 'the parser imported jax'; "
            "configure_cpu_devices(sampling_bytes=sampling_bytes(args)); "
            "import jax; print(len(jax.devices()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_cpu_device_count_reaches_a_fresh_jax_process():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAXSQL_CPU_DEVICES="3", JAX_PLATFORMS="cpu")
    code = ("from jaxsql.distributed import configure_cpu_devices; configure_cpu_devices(); "
            "import jax; print(len(jax.devices()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_auto_gives_a_job_sampling_a_model_larger_than_the_cache_one_device(monkeypatch, tmp_path):
    """Auto: one device per core, but one device for a standalone sampling job whose weights
    exceed the last-level cache (docs/scale.md, "The CPU path"); an explicit count still wins."""
    import json

    from jaxsql.cli import build_parser, sampling_bytes
    from models.config import preset

    monkeypatch.setattr(distributed, "last_level_cache_bytes", lambda: 32 << 20)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)  # no accelerator plugin
    big, small = (32 << 20) + 1, 32 << 20
    assert distributed.configure_cpu_devices({}, sampling_bytes=big) == 1
    assert distributed.configure_cpu_devices({}, sampling_bytes=small) == 2
    assert distributed.configure_cpu_devices({}) == 2
    assert distributed.configure_cpu_devices({"JAXSQL_CPU_DEVICES": "2"}, sampling_bytes=big) == 2
    monkeypatch.setattr(distributed, "last_level_cache_bytes", lambda: None)  # unknown cache: per core
    assert distributed.configure_cpu_devices({}, sampling_bytes=big) == 2

    # the CLI reads the model's size from its config.json, for jobs that sample with --devices auto
    for name in ("mid", "tiny"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(preset(name).to_hf_dict()))
    parse = build_parser().parse_args
    mid = str(tmp_path / "mid")
    assert sampling_bytes(parse(["bench", "generate", "--model", mid])) == preset("mid").num_params() * 4
    assert sampling_bytes(parse(["bench", "generate", "--model", mid, "--dtype", "bfloat16"])) == \
        preset("mid").num_params() * 2
    assert sampling_bytes(parse(["generate", "--model", str(tmp_path / "tiny"), "--prompt", "x"])) == \
        preset("tiny").num_params() * 4
    assert sampling_bytes(parse(["bench", "generate", "--model", mid, "--devices", "2"])) is None
    assert sampling_bytes(parse(["bench", "generate", "--model", str(tmp_path / "missing")])) is None
    assert sampling_bytes(parse(["plan", "--model", "mid", "--chip", "v5p"])) is None
