"""Fixtures of the evaluation tests: small real SQLite databases in the Spider and BIRD layouts."""

from tests.sql.conftest import tiny_db  # noqa: F401 - re-exported fixture
