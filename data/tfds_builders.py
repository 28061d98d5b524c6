"""TFDS dataset builders over the readers: ArrayRecord files, no TensorFlow needed.

One ``tfds.core.GeneratorBasedBuilder`` per source (`BUILDERS`); each reads
the user's copy of the data from ``manual_dir`` (none of these datasets is
downloaded by jaxsql; see ``MANUAL_DOWNLOAD_INSTRUCTIONS``) with the
matching reader in `data.readers`, and writes ArrayRecord shards plus
``dataset_info.json`` under ``data_dir/<builder name>/<version>/``. Verified
with tensorflow-datasets 4.9.10 and no TensorFlow installed: building,
``builder.as_data_source(split)``, ``tfds.data_source(name, data_dir=...)``
and ``tfds.builder_from_directory(dir).as_data_source(split)`` all work.

Features are the `Example` fields as text: ``id, db_path, question,
evidence, gold_sql, gold_answers, difficulty, source``; ``gold_sql`` is
``""`` for None and ``gold_answers`` is a JSON list (``"null"`` for None).
`data.pipeline.example_from_record` turns a record back into an `Example`.
``db_path`` is absolute: the databases stay where the reader found (or, for
TempTabQA-C, built) them; TempTabQA-C databases are built under
``data_dir/jaxsql_temptabqa_c_databases``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds

from data.records import Example
from jaxsql.errors import JaxsqlError

FIELDS = ("id", "db_path", "question", "evidence", "gold_sql", "gold_answers", "difficulty", "source")


def example_to_record(ex: Example) -> dict[str, str]:
    """The TFDS record of an example (all fields text)."""
    return {
        "id": ex.id, "db_path": ex.db_path, "question": ex.question, "evidence": ex.evidence,
        "gold_sql": ex.gold_sql or "",
        "gold_answers": json.dumps(list(ex.gold_answers) if ex.gold_answers is not None else None),
        "difficulty": ex.difficulty, "source": ex.source,
    }


class _ReaderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body: splits come from the reader of `SOURCE` over ``manual_dir``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    SOURCE = ""
    SPLITS: tuple[str, ...] = ()
    READER_OPTIONS: dict[str, Any] = {}

    # tfds looks for checksum files beside the builder's code through
    # `importlib_resources`, which is not installed; our builders download
    # nothing, so point it at this file directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # noqa: D102
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, reader_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._reader_options = dict(self.READER_OPTIONS, **(reader_options or {}))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"jaxsql examples read by the {self.SOURCE!r} reader (see docs/data.md).",
            features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in FIELDS}),
        )

    def _reader_kwargs(self) -> dict[str, Any]:
        return dict(self._reader_options)

    def _split_names(self, manual_dir: Path) -> tuple[str, ...]:
        return self.SPLITS

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        manual = Path(dl_manager.manual_dir)
        if not manual.is_dir():
            raise JaxsqlError(f"{self.name}: manual_dir {manual} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {split: self._generate_examples(manual, split) for split in self._split_names(manual)}

    def _generate_examples(self, manual_dir: Path, split: str) -> Iterator[tuple[str, dict[str, str]]]:
        from data.readers import read_examples

        for ex in read_examples(self.SOURCE, manual_dir, split=split, **self._reader_kwargs()):
            yield ex.id, example_to_record(ex)


class JaxsqlSpider(_ReaderBuilder):
    """Spider (Yu et al. 2018) with its SQLite databases."""

    SOURCE, SPLITS = "spider", ("train", "dev")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download Spider from https://yale-lily.github.io/spider and pass its root "
                                    "(dev.json, train_spider.json, tables.json, database/) as manual_dir.")


class JaxsqlBird(_ReaderBuilder):
    """BIRD (Li et al. 2023) dev set with evidence and difficulty."""

    SOURCE, SPLITS = "bird", ("dev",)
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download BIRD dev from https://bird-bench.github.io and pass the folder "
                                    "holding dev.json and dev_databases/ as manual_dir.")


class JaxsqlGeoquery(_ReaderBuilder):
    """GeoQuery in the text2sql-data format; configs choose the question or the query split."""

    SOURCE, SPLITS = "geoquery", ("train", "dev", "test")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="question", description="question-split"),
                       tfds.core.BuilderConfig(name="query", description="query-split")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Get geography.json and geography.sqlite from "
                                    "https://github.com/jkkummerfeld/text2sql-data and pass their folder as manual_dir.")

    def _reader_kwargs(self) -> dict[str, Any]:
        return dict(self._reader_options, split_kind=self.builder_config.name)


class JaxsqlWikitq(_ReaderBuilder):
    """WikiTableQuestions unseen-table test questions over the SQUALL databases."""

    SOURCE, SPLITS = "wikitq", ("test",)
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass a folder with pristine-unseen-tables.tsv (WikiTableQuestions) and the "
                                    "SQUALL db/ and json/ folders as manual_dir.")


class JaxsqlTemptabqaC(_ReaderBuilder):
    """TempTabQA-C with one database per athlete built from the infobox text."""

    SOURCE, SPLITS = "temptabqa_c", ("dev", "test")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the TempTabQA-C folder (dev_set.tsv, test_original.tsv, schema.sql) "
                                    "as manual_dir.")

    def _reader_kwargs(self) -> dict[str, Any]:
        db_dir = Path(str(self.data_dir_root)) / "jaxsql_temptabqa_c_databases"
        return dict(self._reader_options, db_dir=db_dir)


class JaxsqlJsonl(_ReaderBuilder):
    """Users' own data (or `jaxsql data synth` output): one split per ``<split>.jsonl`` in manual_dir."""

    SOURCE = "jsonl"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass a folder of <split>.jsonl files (see docs/data.md) as manual_dir."

    def _split_names(self, manual_dir: Path) -> tuple[str, ...]:
        names = tuple(sorted(p.stem for p in manual_dir.glob("*.jsonl")))
        if not names:
            raise JaxsqlError(f"{manual_dir}: no *.jsonl files")
        return names

    def _generate_examples(self, manual_dir: Path, split: str) -> Iterator[tuple[str, dict[str, str]]]:
        from data.readers.jsonl import read_jsonl

        for ex in read_jsonl(manual_dir / f"{split}.jsonl", **self._reader_kwargs()):
            yield ex.id, example_to_record(ex)


BUILDERS: dict[str, type[_ReaderBuilder]] = {
    "spider": JaxsqlSpider, "bird": JaxsqlBird, "geoquery": JaxsqlGeoquery, "wikitq": JaxsqlWikitq,
    "temptabqa_c": JaxsqlTemptabqaC, "jsonl": JaxsqlJsonl, "synthetic": JaxsqlJsonl,
}


def build_dataset(source: str, manual_dir: str | Path, data_dir: str | Path, *, config: str | None = None,
                  reader_options: dict[str, Any] | None = None) -> _ReaderBuilder:
    """Build (or reuse) the ArrayRecord dataset of `source`; returns the prepared builder."""
    cls = BUILDERS.get(source)
    if cls is None:
        raise JaxsqlError(f"no TFDS builder for source {source!r}; expected one of {sorted(BUILDERS)}")
    if not Path(manual_dir).is_dir():
        raise JaxsqlError(f"manual_dir not found: {manual_dir}")
    kwargs: dict[str, Any] = {"data_dir": str(data_dir), "file_format": "array_record"}
    if config is not None:
        kwargs["config"] = config
    builder = cls(reader_options=reader_options, **kwargs)
    dl_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    builder.download_and_prepare(download_config=dl_config)
    return builder


def data_source(dataset_dir: str | Path, split: str):
    """Random-access source of a built dataset directory (``.../<name>/<config>/<version>``)."""
    d = Path(dataset_dir)
    if not (d / "dataset_info.json").is_file():
        raise JaxsqlError(f"{d}: not a built TFDS dataset (no dataset_info.json)")
    return tfds.builder_from_directory(str(d)).as_data_source(split=split)
