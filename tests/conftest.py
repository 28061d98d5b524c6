"""Shared test setup: a CPU backend with 8 simulated devices, and real-data lookup."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path | None:
    """``$JAXSQL_REAL_DATA`` or ``../shared/data`` beside the repository, if present."""
    env = os.environ.get("JAXSQL_REAL_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the real benchmark data; skips the test when it is absent."""
    root = real_data_root()
    if root is None:
        pytest.skip("real data not found (set JAXSQL_REAL_DATA or place ../shared/data)")
    return root
