"""Grain input pipelines: seeded shuffle, epochs, global batches split over processes, resumable state.

The chain (grain 0.2 ``MapDataset``)::

    source ──► shuffle(seed) ──► repeat(num_epochs) ──► map(to_example)
           ──► batch(batch_size / P) ──[process_index::P]──► iterator

* ``source`` is any random-access sequence: a list of `Example` (or of dicts),
  ``tfds.data_source(...)`` over ArrayRecord files (see `data.tfds_builders`),
  or ``grain.sources.ArrayRecordDataSource``. Records that are dicts are turned
  into `Example` with `example_from_record`.
* ``batch_size`` is the size of the *global* batch. The global batches, their
  order and the position of every record in them depend only on the source,
  the seed and the batch size, never on how many processes read them: with P
  processes (``process_count``), process p reads rows
  ``[p * B/P, (p + 1) * B/P)`` of every global batch (the rows its devices own
  on a mesh built by `jaxsql.sharding.make_mesh`, see
  `jaxsql.distributed.row_share`), so P processes together read exactly what
  one process reads. `process_rows` gives that slice, i.e. the global position
  of each local row. ``B`` not divisible by P is an error. Defaults:
  `jaxsql.distributed.process_index` / `process_count`.
* Each epoch is reshuffled from the seed (grain's ``reseed_each_epoch``);
  global batches run across epoch boundaries. ``drop_remainder`` drops a last,
  short global batch; on several processes a finite pipeline must have whole
  global batches (or ``drop_remainder``), since every process takes the same
  number of steps.
* A batch is a Python list of `Example` (the prompts of one step; the trainer
  repeats each prompt G times for a GRPO group).
* The iterator's position is `iterator_state(it)` (JSON bytes, small; it counts
  global batches, so it is the same on every process) and
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


def process_rows(batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's rows of a global batch of `batch_size`: the contiguous block
    ``[p * B/P, (p + 1) * B/P)``; the slice's start is the global position of local row 0."""
    p, n = _process(process_index, process_count)
    if batch_size < 1:
        raise JaxsqlError(f"batch_size must be positive, got {batch_size}")
    if batch_size % n:
        raise JaxsqlError(f"batch_size {batch_size} (the global batch) does not split over {n} processes; "
                          f"use a multiple of {n}")
    local = batch_size // n
    return slice(p * local, (p + 1) * local)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        from jaxsql import distributed

        process_index = distributed.process_index() if process_index is None else process_index
        process_count = distributed.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise JaxsqlError(f"process_index {process_index} is outside 0..{process_count - 1}")
    return process_index, process_count


def make_dataset(
    source: Sequence[Any],
    *,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = False,
    transform: Callable[[Example], Any] | None = None,
    as_examples: bool = True,
):
    """The grain ``MapDataset`` of this process's slices of the global batches (module docstring).

    Args:
      source: random-access records (list, tfds data source, ArrayRecord source).
      batch_size: records per global batch (all processes together).
      seed: shuffle seed (same seed, same order on every run).
      num_epochs: passes over the source; None repeats forever.
      shuffle: False keeps the source order (evaluation).
      process_index, process_count: this process and how many read the batches;
        default from `jaxsql.distributed`.
      drop_remainder: drop a last, short global batch.
      transform: applied to each `Example` after conversion (e.g. tokenisation).
      as_examples: convert each record to an `Example` (False: records pass as they are, e.g.
        indices into a list of label records, `rl.prm_train`).
    """
    import grain

    p, n = _process(process_index, process_count)
    rows = process_rows(batch_size, p, n)
    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
        raise JaxsqlError("the data source is empty")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if drop_remainder:
        ds = ds[: (len(ds) // batch_size) * batch_size]
        if len(ds) == 0:
            raise JaxsqlError(f"batch_size {batch_size} is more than the {len(source)} records "
                              f"x {num_epochs} epochs (drop_remainder leaves no batch)")
    elif n > 1 and num_epochs is not None and len(ds) % batch_size:
        raise JaxsqlError(f"{len(ds)} records ({len(source)} x {num_epochs} epochs) do not make whole global "
                          f"batches of {batch_size}, so the {n} processes would take different numbers of "
                          f"steps; pass drop_remainder=True")
    if as_examples:
        ds = ds.map(example_from_record)
    if transform is not None:
        ds = ds.map(transform)
    # Global batch b is the consecutive local batches b*P .. b*P + P-1; process p takes the p-th.
    return ds.batch(rows.stop - rows.start, drop_remainder=drop_remainder, batch_fn=list)[p::n]


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
