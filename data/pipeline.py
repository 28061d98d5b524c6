"""Grain input pipelines: seeded shuffle, epochs, per-process shards, batches, resumable state.

The chain (grain 0.2 ``MapDataset``)::

    source ──[shard_index::shard_count]──► shuffle(seed) ──► repeat(num_epochs)
           ──► map(to_example) ──► batch(batch_size, batch_fn=list) ──► iterator

* ``source`` is any random-access sequence: a list of `Example` (or of dicts),
  ``tfds.data_source(...)`` over ArrayRecord files (see `data.tfds_builders`),
  or ``grain.sources.ArrayRecordDataSource``. Records that are dicts are turned
  into `Example` with `example_from_record`.
* Sharding happens before shuffling, by position: process ``i`` of ``n`` gets
  records ``i, i+n, i+2n, ...`` (defaults: ``jax.process_index()`` /
  ``jax.process_count()``), so shards are disjoint and cover the data.
  ``even_shards=True`` first drops the last ``len % n`` records so every
  process sees the same number of batches (needed in lock-step multi-host
  training).
* Each epoch is reshuffled from the seed (grain's ``reseed_each_epoch``).
* A batch is a Python list of `Example` (the prompts of one step; the trainer
  repeats each prompt G times for a GRPO group).
* The iterator's position is `iterator_state(it)` (JSON bytes, small) and
  `restore_iterator(it, state)` moves a fresh iterator built with the same
  arguments to exactly that position, mid-epoch included.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from data.records import Example
from jaxsql.errors import JaxsqlError


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if hasattr(v, "item") and not isinstance(v, str):  # a numpy scalar from tfds
        v = v.item()
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return str(v)


def example_from_record(record: Any) -> Example:
    """An `Example` from an `Example`, its ``to_dict()``, or a TFDS record (text fields as bytes).

    In TFDS records ``gold_sql`` is ``""`` for None and ``gold_answers`` is a
    JSON list (``"null"`` for None); see `data.tfds_builders`.
    """
    if isinstance(record, Example):
        return record
    if not isinstance(record, Mapping):
        raise JaxsqlError(f"pipeline record of type {type(record).__name__} is not an Example or a dict")
    d = {k: _text(v) if k != "gold_answers" or not isinstance(v, (list, tuple)) else v for k, v in record.items()}
    answers = d.get("gold_answers")
    if isinstance(answers, str):
        answers = json.loads(answers)
    if d.get("gold_sql") == "":
        d["gold_sql"] = None
    d["gold_answers"] = answers
    return Example.from_dict(d, where=f"record {d.get('id', '?')}")


def make_dataset(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    even_shards: bool = False,
    drop_remainder: bool = False,
    transform: Callable[[Example], Any] | None = None,
):
    """The grain ``MapDataset`` of batches described in the module docstring.

    Args:
      source: random-access records (list, tfds data source, ArrayRecord source).
      batch_size: records per batch.
      seed: shuffle seed (same seed, same order on every run).
      num_epochs: passes over the shard; None repeats forever.
      shuffle: False keeps the source order (evaluation).
      shard_index, shard_count: this process's shard; default from jax.
      even_shards: drop the tail so all shards have equal length.
      drop_remainder: drop a last, short batch.
      transform: applied to each `Example` after conversion (e.g. tokenisation).
    """
    import grain

    if batch_size < 1:
        raise JaxsqlError(f"batch_size must be positive, got {batch_size}")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise JaxsqlError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
    ds = grain.MapDataset.source(source)
    if even_shards:
        ds = ds[: (len(ds) // shard_count) * shard_count]
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise JaxsqlError(f"shard {shard_index} of {shard_count} is empty ({len(source)} records)")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(example_from_record)
    if transform is not None:
        ds = ds.map(transform)
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)


def make_iterator(source: Sequence[Any], **kwargs: Any):
    """A checkpointable iterator (``grain.DatasetIterator``) over `make_dataset(source, **kwargs)`."""
    return iter(make_dataset(source, **kwargs).to_iter_dataset())


def iterator_state(iterator: Any) -> bytes:
    """The iterator's position as JSON bytes (store it with the checkpoint)."""
    return json.dumps(iterator.get_state(), sort_keys=True).encode()


def restore_iterator(iterator: Any, state: bytes | str | Mapping[str, Any]) -> Any:
    """Move `iterator` (built with the same arguments) to a saved position; returns it."""
    if isinstance(state, (bytes, str)):
        state = json.loads(state)
    iterator.set_state(dict(state))
    return iterator
