"""Subcommands of this room (filled in by its issue)."""

import argparse


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub` and benchmarks to `bench`."""
