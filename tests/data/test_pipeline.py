"""Grain pipelines: exact resume mid-epoch, disjoint covering shards, tfds-style records."""

import json

import pytest

from data.pipeline import example_from_record, iterator_state, make_iterator, restore_iterator
from jaxsql.errors import JaxsqlError


def _ids(batches):
    return [[e.id for e in b] for b in batches]


def test_resume_mid_epoch_matches_uninterrupted(small_bench):
    kw = dict(batch_size=7, seed=11, num_epochs=3, shard_index=0, shard_count=1)
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


def test_shards_disjoint_and_cover(small_bench):
    shards = [{e.id for b in make_iterator(small_bench.train, batch_size=5, shard_index=i, shard_count=3)
               for e in b} for i in range(3)]
    assert sum(map(len, shards)) == 120
    assert set().union(*shards) == {e.id for e in small_bench.train}
    even = [sum(len(b) for b in make_iterator(small_bench.train[:100], batch_size=5, shard_index=i,
                                              shard_count=3, even_shards=True)) for i in range(3)]
    assert even == [33, 33, 33]
    with pytest.raises(JaxsqlError, match="shard_index"):
        make_iterator(small_bench.train, batch_size=2, shard_index=3, shard_count=3)


def test_default_shard_from_jax_and_no_shuffle(small_bench):
    batches = _ids(make_iterator(small_bench.dev, batch_size=10, shuffle=False))
    assert [i for b in batches for i in b] == [e.id for e in small_bench.dev]


def test_tfds_style_record():
    rec = {"id": b"x", "db_path": b"/d.db", "question": b"q?", "evidence": b"", "gold_sql": b"",
           "gold_answers": b'["1", "2"]', "difficulty": b"", "source": b"s"}
    ex = example_from_record(rec)
    assert ex.gold_sql is None and ex.gold_answers == ("1", "2") and ex.id == "x"


def test_resume_infinite_repeat(small_bench):
    kw = dict(batch_size=16, seed=5, num_epochs=None, shard_index=0, shard_count=1)
    it = make_iterator(small_bench.train, **kw)
    for _ in range(20):  # past two epochs of 120 records
        next(it)
    state = iterator_state(it)
    expected = [_ids([next(it)]) for _ in range(10)]
    resumed = restore_iterator(make_iterator(small_bench.train, **kw), state)
    assert [_ids([next(resumed)]) for _ in range(10)] == expected
