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

`build_dataset` records a fingerprint of ``manual_dir`` beside the build
(`SOURCE_RECORD`); building again reuses the build only when the source is
unchanged, and otherwise refuses with a line naming what changed (or, with
``rebuild=True``, builds afresh).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds

from data.records import Example
from jaxsql.errors import JaxsqlError

FIELDS = ("id", "db_path", "question", "evidence", "gold_sql", "gold_answers", "difficulty", "source")
#: File written beside ``dataset_info.json``: what the build was made from.
SOURCE_RECORD = "jaxsql_source.json"
#: Files up to this size are fingerprinted by content; larger ones (databases) by size and mtime.
_HASH_CONTENT_BYTES = 64 << 20


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

        yield from _nonempty(self.name, split, manual_dir, (
            (ex.id, example_to_record(ex))
            for ex in read_examples(self.SOURCE, manual_dir, split=split, **self._reader_kwargs())))


def _nonempty(name: str, split: str, manual_dir: Path, records: Iterator) -> Iterator:
    """`records`, or a one-line error when the split has none (tfds would assert deep inside its writer)."""
    n = 0
    for n, record in enumerate(records, 1):
        yield record
    if n == 0:
        raise JaxsqlError(f"{name}: split {split!r} of {manual_dir} has no examples; nothing was built")


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

        yield from _nonempty(self.name, split, manual_dir, (
            (ex.id, example_to_record(ex))
            for ex in read_jsonl(manual_dir / f"{split}.jsonl", **self._reader_kwargs())))


BUILDERS: dict[str, type[_ReaderBuilder]] = {
    "spider": JaxsqlSpider, "bird": JaxsqlBird, "geoquery": JaxsqlGeoquery, "wikitq": JaxsqlWikitq,
    "temptabqa_c": JaxsqlTemptabqaC, "jsonl": JaxsqlJsonl, "synthetic": JaxsqlJsonl,
}


def source_fingerprint(manual_dir: str | Path, exclude: Path | None = None) -> dict[str, Any]:
    """What a build is made of: every file under `manual_dir` (hidden ones and `exclude` skipped).

    Files up to 64 MiB count by content (SHA-256), larger ones (databases) by
    size and modification time. Returns ``{"digest": hex, "files": {relative
    path: fingerprint}}``.
    """
    root = Path(manual_dir).resolve()
    skip = exclude.resolve() if exclude is not None else None
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip))
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or not path.is_file():
                continue
            st = path.stat()
            if st.st_size <= _HASH_CONTENT_BYTES:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                files[path.relative_to(root).as_posix()] = "sha256:" + h.hexdigest()
            else:
                files[path.relative_to(root).as_posix()] = f"size:{st.st_size}:mtime_ns:{st.st_mtime_ns}"
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "files": files}


def _changes(old: dict[str, str], new: dict[str, str]) -> str:
    parts = [f"changed {k}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
    parts += [f"added {k}" for k in sorted(new.keys() - old.keys())]
    parts += [f"removed {k}" for k in sorted(old.keys() - new.keys())]
    shown = ", ".join(parts[:3])
    return shown + (f" and {len(parts) - 3} more" if len(parts) > 3 else "")


def _existing_dirs(root: Path) -> set[Path]:
    """Every directory under `root` (and `root` itself) that exists now."""
    if not root.is_dir():
        return set()
    return {root, *(p for p in root.rglob("*") if p.is_dir())}


def _remove_empty_dirs(root: Path, keep: set[Path]) -> None:
    """Remove the directories under `root` that are not in `keep` and hold no file (deepest first)."""
    if not root.is_dir():
        return
    for d in sorted((p for p in [root, *root.rglob("*")] if p.is_dir() and p not in keep),
                    key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()  # only succeeds when empty: a file someone else put there is kept
        except OSError:
            pass


def build_dataset(source: str, manual_dir: str | Path, data_dir: str | Path, *, config: str | None = None,
                  reader_options: dict[str, Any] | None = None, rebuild: bool = False) -> _ReaderBuilder:
    """Build the ArrayRecord dataset of `source` (or reuse an up-to-date build); returns the prepared builder.

    A build records `source_fingerprint` of `manual_dir` in `SOURCE_RECORD`.
    An existing build is reused when the fingerprint (and the reader options)
    are unchanged; otherwise this raises `JaxsqlError` naming what changed,
    unless `rebuild` is True, which deletes that build and makes a new one.
    The builder's ``jaxsql_reused`` attribute says which happened.
    """
    cls = BUILDERS.get(source)
    if cls is None:
        raise JaxsqlError(f"no TFDS builder for source {source!r}; expected one of {sorted(BUILDERS)}")
    manual = Path(manual_dir)
    if not manual.is_dir():
        raise JaxsqlError(f"manual_dir not found: {manual_dir}")
    if not any(p for p in manual.iterdir() if not p.name.startswith(".")):
        raise JaxsqlError(f"manual_dir {manual_dir} is empty. {cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    kwargs: dict[str, Any] = {"data_dir": str(data_dir), "file_format": "array_record"}
    if config is not None:
        kwargs["config"] = config
    existed = _existing_dirs(Path(data_dir))
    builder = cls(reader_options=reader_options, **kwargs)
    fingerprint = source_fingerprint(manual, exclude=Path(data_dir))
    record = {"source": source, "manual_dir": str(manual.resolve()), "config": config,
              "reader_options": {k: str(v) for k, v in sorted((reader_options or {}).items())}, **fingerprint}
    version_dir = Path(str(builder.data_dir))
    if (version_dir / "dataset_info.json").is_file():
        old_path = version_dir / SOURCE_RECORD
        try:
            old = json.loads(old_path.read_text())
        except (OSError, ValueError):
            old = None
        same = ("digest", "config", "reader_options")
        if old is not None and all(old.get(k) == record[k] for k in same):
            builder.jaxsql_reused = True
            return builder
        if not rebuild:
            if old is None:
                why = f"it has no {SOURCE_RECORD}, so whether {manual_dir} changed since cannot be told"
            elif old.get("digest") != record["digest"]:
                why = f"{manual_dir} changed since it was built ({_changes(old['files'], record['files'])})"
            else:
                why = "it was built with another config or other reader options"
            raise JaxsqlError(f"a build of {source} already exists in {version_dir} but {why}; "
                              "pass --rebuild to replace it")
        shutil.rmtree(version_dir)
        builder = cls(reader_options=reader_options, **kwargs)
    dl_config = tfds.download.DownloadConfig(manual_dir=str(manual))
    try:
        builder.download_and_prepare(download_config=dl_config)
    except BaseException:
        _remove_empty_dirs(Path(data_dir), keep=existed)  # a failed build leaves nothing behind
        raise
    (version_dir / SOURCE_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    builder.jaxsql_reused = False
    return builder


def data_source(dataset_dir: str | Path, split: str):
    """Random-access source of a built dataset directory (``.../<name>/<config>/<version>``)."""
    d = Path(dataset_dir)
    if not (d / "dataset_info.json").is_file():
        raise JaxsqlError(f"{d}: not a built TFDS dataset (no dataset_info.json)")
    return tfds.builder_from_directory(str(d)).as_data_source(split=split)
