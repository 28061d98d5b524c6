"""Multi-host start-up from the environment (the single-host default must not initialise)."""

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
