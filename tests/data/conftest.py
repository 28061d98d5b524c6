"""Shared fixtures of the data room: one small synthetic benchmark per session."""

import pytest

from data.synthetic import generate_benchmark


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory):
    return generate_benchmark(tmp_path_factory.mktemp("small_bench"), seed=1, n_train=120, n_dev=30)
