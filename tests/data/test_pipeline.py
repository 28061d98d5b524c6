"""Grain pipelines: exact resume mid-epoch, global batches split over processes, tfds-style records."""

import json

import pytest

from data.pipeline import example_from_record, iterator_state, make_iterator, process_rows, restore_iterator
from jaxsql.errors import JaxsqlError


def _ids(batches):
    return [[e.id for e in b] for b in batches]


def test_resume_mid_epoch_matches_uninterrupted(small_bench):
    kw = dict(batch_size=7, seed=11, num_epochs=3, process_index=0, process_count=1)
    full = _ids(make_iterator(small_bench.train, **kw))
    assert len(full) == -(-3 * 120 // 7)
    it = make_iterator(small_bench.train, **kw)
    for _ in range(9):  # 63 records: mid-way through the first epoch
        next(it)
    state = iterator_state(it)
    json.loads(state)
    resumed = restore_iterator(make_iterator(small_bench.train, **kw), state)
    assert _ids(resumed) == full[9:]
    # Epochs are reshuffled and a different seed gives a different order.
    flat = [i for b in full for i in b]
    assert flat[:120] != flat[120:240] and sorted(flat[:120]) == sorted(flat[120:240])
    assert _ids(make_iterator(small_bench.train, **{**kw, "seed": 12})) != full


def _global(source, process_count, take=None, state=None, **kw):
    """The global batches that `process_count` processes read together (their slices joined),
    optionally from a saved position; also returns the position after `take` batches."""
    its = [make_iterator(source, process_index=p, process_count=process_count, **kw)
           for p in range(process_count)]
    if state is not None:
        its = [restore_iterator(it, state) for it in its]
    out = []
    for parts in zip(*its):
        assert len({len(b) for b in parts}) == 1  # every process holds as many rows
        out.append([e.id for b in parts for e in b])
        if take is not None and len(out) == take:
            break
    states = {iterator_state(it) for it in its}
    assert len(states) == 1  # the position is the same on every process
    return out, states.pop()


def test_processes_read_slices_of_the_same_global_batches(small_bench):
    kw = dict(batch_size=12, seed=3, num_epochs=3)
    one, _ = _global(small_bench.train, 1, **kw)
    assert len(one) == 30 and sorted(i for b in one[:10] for i in b) == sorted(e.id for e in small_bench.train)
    for n in (2, 3, 4):
        many, _ = _global(small_bench.train, n, **kw)
        assert many == one, n  # same batches, same order, same position of every row
    # a process's rows are its block of the global batch
    assert process_rows(12, 1, 4) == slice(3, 6)
    p1 = [[e.id for e in b] for b in make_iterator(small_bench.train, process_index=1, process_count=4, **kw)]
    assert p1 == [b[3:6] for b in one]
    # resume: the position counts global batches, whatever the process count that saved it
    first, state = _global(small_bench.train, 2, take=7, **kw)
    assert first == one[:7]
    for n in (1, 2, 4):
        rest, _ = _global(small_bench.train, n, state=state, **kw)
        assert rest == one[7:], n
    # endless streams too (batches run across epoch boundaries)
    forever = dict(kw, num_epochs=None)
    one_f, _ = _global(small_bench.train, 1, take=25, **forever)
    two_f, state = _global(small_bench.train, 2, take=13, **forever)
    assert two_f == one_f[:13] and _global(small_bench.train, 2, take=12, state=state, **forever)[0] == one_f[13:]


def test_batches_that_do_not_split_over_processes_are_errors(small_bench):
    with pytest.raises(JaxsqlError, match="batch_size 10 .* does not split over 3 processes"):
        make_iterator(small_bench.train, batch_size=10, process_index=0, process_count=3)
    with pytest.raises(JaxsqlError, match="process_index 3 is outside 0..2"):
        make_iterator(small_bench.train, batch_size=3, process_index=3, process_count=3)
    # 120 records make 7.5 global batches of 16: the processes would disagree on the step count
    with pytest.raises(JaxsqlError, match="do not make whole global batches of 16"):
        make_iterator(small_bench.train, batch_size=16, process_index=0, process_count=2)
    kept = _global(small_bench.train, 2, batch_size=16, drop_remainder=True)[0]
    assert len(kept) == 7 and all(len(b) == 16 for b in kept)
    # one process keeps the short last batch unless told otherwise
    assert len(_global(small_bench.train, 1, batch_size=16)[0][-1]) == 8


def test_default_process_from_jax_and_no_shuffle(small_bench):
    batches = _ids(make_iterator(small_bench.dev, batch_size=10, shuffle=False))
    assert [i for b in batches for i in b] == [e.id for e in small_bench.dev]


def test_tfds_style_record():
    rec = {"id": b"x", "db_path": b"/d.db", "question": b"q?", "evidence": b"", "gold_sql": b"",
           "gold_answers": b'["1", "2"]', "difficulty": b"", "source": b"s"}
    ex = example_from_record(rec)
    assert ex.gold_sql is None and ex.gold_answers == ("1", "2") and ex.id == "x"


def test_resume_infinite_repeat(small_bench):
    kw = dict(batch_size=16, seed=5, num_epochs=None, process_index=0, process_count=1)
    it = make_iterator(small_bench.train, **kw)
    for _ in range(20):  # past two epochs of 120 records
        next(it)
    state = iterator_state(it)
    expected = [_ids([next(it)]) for _ in range(10)]
    resumed = restore_iterator(make_iterator(small_bench.train, **kw), state)
    assert [_ids([next(resumed)]) for _ in range(10)] == expected
