"""``SOURCE:PATH`` data arguments shared by commands that read examples (``data cocte``, ``prm ...``)."""

from __future__ import annotations

from data.records import Example
from jaxsql.errors import JaxsqlError, UsageError

SPEC_HELP = ("examples as SOURCE:PATH: a reader name (spider, bird, geoquery, wikitq, temptabqa_c, jsonl) or "
             "'synthetic' (a directory written by `jaxsql data synth`), a colon, and its path")


def parse_data_spec(spec: str) -> tuple[str, str]:
    """(source, path) of ``SOURCE:PATH``; a `UsageError` naming the expected form otherwise."""
    source, sep, path = spec.partition(":")
    if not sep or not source or not path:
        raise UsageError(f"data {spec!r}: expected SOURCE:PATH, e.g. geoquery:../shared/data/geoquery")
    return source, path


def load_data_spec(spec: str, split: str | None = None) -> list[Example]:
    """The examples of ``SOURCE:PATH`` (`split` as the reader takes it; synthetic: train or dev)."""
    source, path = parse_data_spec(spec)
    if source == "synthetic":
        from data.synthetic import load_benchmark

        bench = load_benchmark(path)
        if (split or "train") not in ("train", "dev"):
            raise UsageError(f"synthetic data has splits train and dev, got {split!r}")
        examples = bench.train if (split or "train") == "train" else bench.dev
    else:
        from data.readers import read_examples

        examples = read_examples(source, path, split=split)
    if not examples:
        raise JaxsqlError(f"{spec}: no examples")
    return list(examples)
