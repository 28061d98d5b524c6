"""TFDS ArrayRecord builds without TensorFlow, read back through grain; the `jaxsql data` CLI."""

import json
import sys

import pytest

from data.pipeline import iterator_state, make_iterator, restore_iterator
from data.tfds_builders import build_dataset, data_source
from jaxsql.cli import main
from jaxsql.errors import JaxsqlError


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_bench):
    out = tmp_path_factory.mktemp("tfds")
    return build_dataset("synthetic", small_bench.out_dir, out)


def test_no_tensorflow_and_roundtrip(built, small_bench):
    assert "tensorflow" not in sys.modules
    assert (built.info.splits["train"].num_examples, built.info.splits["dev"].num_examples) == (120, 30)
    assert list(built.data_path.glob("*.array_record-*"))
    src = data_source(built.data_dir, "train")
    by_id = {e.id: e for e in small_bench.train}
    batches = list(make_iterator(src, batch_size=8, seed=0, process_index=0, process_count=1))
    got = [e for b in batches for e in b]
    assert sorted(e.id for e in got) == sorted(by_id)
    assert all(e == by_id[e.id] for e in got)


def test_tfds_source_resume_and_shards(built):
    import tensorflow_datasets as tfds

    src = tfds.data_source("jaxsql_jsonl", data_dir=str(built.data_dir_root), split="train")
    kw = dict(batch_size=6, seed=4, num_epochs=2, process_index=1, process_count=2)
    full = [[e.id for e in b] for b in make_iterator(src, **kw)]
    it = make_iterator(src, **kw)
    for _ in range(5):
        next(it)
    resumed = restore_iterator(make_iterator(src, **kw), iterator_state(it))
    assert [[e.id for e in b] for b in resumed] == full[5:]


def test_geoquery_build(real_data, tmp_path):
    b = build_dataset("geoquery", real_data / "geoquery", tmp_path, config="query")
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 536, "dev": 159, "test": 182}


def test_build_errors(tmp_path):
    with pytest.raises(JaxsqlError, match="no TFDS builder"):
        build_dataset("csv", tmp_path, tmp_path / "o")
    with pytest.raises(JaxsqlError, match="manual_dir not found"):
        build_dataset("jsonl", tmp_path / "absent", tmp_path / "o")


def test_cli_synth_stats_build(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--seed", "2", "--n-train", "40",
                 "--n-dev", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["train"], out["dev"], out["databases"]) == (40, 10, 16)
    assert main(["data", "stats", "jsonl", str(tmp_path / "s" / "dev.jsonl")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["examples"] == 10 and stats["gold_sql_execute"] == 10 and stats["databases"] == 4
    assert main(["data", "build", "synthetic", "--manual-dir", str(tmp_path / "s"),
                 "--data-dir", str(tmp_path / "tfds")]) == 0
    printed = capsys.readouterr().out
    built = json.loads(printed[printed.rindex("\n{") + 1:] if "\n{" in printed else printed)
    assert built["splits"] == {"dev": 10, "train": 40}


def test_cli_errors(tmp_path, capsys):
    assert main(["data", "stats", "nope", str(tmp_path)]) == 1
    assert "unknown data source 'nope'" in capsys.readouterr().err
    assert main(["data", "stats", "jsonl", str(tmp_path / "none.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["data", "stats", "jsonl", str(tmp_path), "--db-dir", "x"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["data", "synth"])
    assert e.value.code == 2


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_cli_refuses_a_timeout_that_is_not_a_finite_positive_number(small_bench, tmp_path, capsys, value):
    for argv in (["data", "stats", "synthetic", str(small_bench.out_dir)],
                 ["data", "cocte", f"synthetic:{small_bench.out_dir}", "--out", str(tmp_path / "c.jsonl")]):
        assert main([*argv, "--timeout", value]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err == f"error: --timeout must be a finite number of seconds > 0, got {float(value)}", err
    assert not (tmp_path / "c.jsonl").exists()


def test_build_notices_a_changed_source(tmp_path, capsys):
    from data.synthetic import generate_benchmark

    src = tmp_path / "s"
    generate_benchmark(src, seed=1, n_train=12, n_dev=4, max_level=1)
    out = tmp_path / "tfds"
    assert build_dataset("synthetic", src, out).jaxsql_reused is False
    assert build_dataset("synthetic", src, out).jaxsql_reused is True  # unchanged: reused
    lines = (src / "dev.jsonl").read_text().splitlines()
    (src / "dev.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(JaxsqlError, match=r"changed since it was built \(changed dev.jsonl\).*--rebuild"):
        build_dataset("synthetic", src, out)
    capsys.readouterr()
    assert main(["data", "build", "synthetic", "--manual-dir", str(src), "--data-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a build of synthetic") and "changed dev.jsonl" in err
    assert len(err.strip().splitlines()) == 1
    rebuilt = build_dataset("synthetic", src, out, rebuild=True)
    assert rebuilt.jaxsql_reused is False and rebuilt.info.splits["dev"].num_examples == 2
    assert build_dataset("synthetic", src, out).jaxsql_reused is True
    # a build made before fingerprints were recorded is not trusted either
    (rebuilt.data_path / "jaxsql_source.json").unlink()
    with pytest.raises(JaxsqlError, match="no jaxsql_source.json"):
        build_dataset("synthetic", src, out)


def test_build_of_an_empty_source_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "build", "spider", "--manual-dir", str(tmp_path / "empty"),
                 "--data-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: manual_dir") and "is empty" in err and "Traceback" not in err
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "train.jsonl").write_text("")
    assert main(["data", "build", "jsonl", "--manual-dir", str(tmp_path / "blank"),
                 "--data-dir", str(tmp_path / "o")]) == 1
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]  # after tfds's progress bars
    assert "Traceback" not in full and err.startswith("error:") and "split 'train'" in err and "has no examples" in err


def test_a_failed_build_leaves_no_empty_directories(tmp_path, capsys):
    """A folder that is not the source's data fails in one line, and the build's own empty
    directories are removed; directories that were there before stay."""
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "notes.txt").write_text("not spider")
    out = tmp_path / "out"
    assert main(["data", "build", "spider", "--manual-dir", str(tmp_path / "wrong"), "--data-dir", str(out)]) == 1
    assert "train_spider.json" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
    (out / "mine").mkdir(parents=True)
    assert main(["data", "build", "spider", "--manual-dir", str(tmp_path / "wrong"), "--data-dir", str(out)]) == 1
    assert sorted(p.name for p in out.rglob("*")) == ["mine"]
