"""HF checkpoint IO: file formats, error messages, overwrite protection."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jaxsql.errors import JaxsqlError
from models import hf_io
from models.safetensors_io import SafetensorsReader, write_safetensors


def test_streaming_writer_and_reader_agree_with_safetensors(tmp_path):
    rng = np.random.RandomState(0)
    tensors = {"a": rng.randn(3, 5).astype(np.float32), "b": rng.randn(7).astype(ml_dtypes.bfloat16),
               "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], tensors.__getitem__)
    theirs = safetensors.numpy.load_file(path)
    assert theirs["a"].tobytes() == tensors["a"].tobytes() and theirs["c"].tobytes() == tensors["c"].tobytes()
    assert theirs["b"].view(np.uint16).tobytes() == tensors["b"].view(np.uint16).tobytes()
    other = tmp_path / "y.safetensors"
    safetensors.numpy.save_file({"a": tensors["a"], "c": tensors["c"]}, other)
    r = SafetensorsReader(other)
    assert np.array_equal(r.read("a"), tensors["a"]) and r.shape("c") == (2, 3)
    assert SafetensorsReader(path).read("b").dtype == ml_dtypes.bfloat16


def test_single_file_checkpoint(hf_dirs, tmp_path):
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs["qwen2"])
    d = tmp_path / "single"
    hf_io.save_hf_checkpoint(d, cfg, params)
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert files == ["model-00001-of-00001.safetensors"]
    # also accept a plain model.safetensors without index
    (d / files[0]).rename(d / "model.safetensors")
    (d / hf_io.INDEX_NAME).unlink()
    cfg2, params2 = hf_io.load_hf_checkpoint(d)
    assert cfg2 == cfg


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_index(d, fn):
    index = json.loads((d / hf_io.INDEX_NAME).read_text())
    fn(index["weight_map"])
    (d / hf_io.INDEX_NAME).write_text(json.dumps(index))


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["qwen2"], tmp_path / "m")
    _edit_index(d, lambda wm: wm.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(JaxsqlError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        hf_io.load_hf_checkpoint(d)


def test_unexpected_tensor_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["qwen3"], tmp_path / "u")
    _edit_index(d, lambda wm: wm.update({"model.layers.0.self_attn.extra.weight": next(iter(wm.values()))}))
    with pytest.raises(JaxsqlError, match="unexpected tensors.*self_attn.extra.weight"):
        hf_io.load_hf_checkpoint(d)


def test_wrong_shape_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama3"], tmp_path / "s")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JaxsqlError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[128, 64\], expected \[96, 64\]"):
        hf_io.load_hf_checkpoint(d)


def test_export_refuses_foreign_non_empty_directory(hf_dirs, tmp_path):
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs["qwen2"])
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    with pytest.raises(JaxsqlError, match="not empty"):
        hf_io.save_hf_checkpoint(d, cfg, params)
    assert (d / "notes.txt").read_text() == "precious"
    hf_io.save_hf_checkpoint(d, cfg, params, overwrite=True)
    # a previous export may be replaced; stale shards are removed
    hf_io.save_hf_checkpoint(d, cfg, params, max_shard_bytes=30_000)
    names = {p.name for p in d.glob("*.safetensors")}
    index = json.loads((d / hf_io.INDEX_NAME).read_text())
    assert names == set(index["weight_map"].values())
    hf_io.save_hf_checkpoint(d, cfg, params)
    assert len(list(d.glob("*.safetensors"))) == 1


@pytest.mark.parametrize("header,n,tail", [
    (b"{}", 1 << 62, b""),  # a length past the end of the file (was a MemoryError)
    (b"[1, 2]", None, b""),  # not an object
    (b'{"w": 5}', None, b""),
    (b'{"w": {"dtype": "F32"}}', None, b""),  # keys missing
    (b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', None, b"\0" * 8),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99999]}}', None, b"\0" * 8),
    (b'{"__metadata__": [1]}', None, b""),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', None, b"\0" * 8),  # truncated JSON
])
def test_corrupt_header_is_one_error(tmp_path, header, n, tail):
    import struct

    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + tail)
    with pytest.raises(JaxsqlError, match="bad.safetensors: (corrupt safetensors header|not a readable)"):
        SafetensorsReader(path)


def test_corrupt_header_through_the_cli(hf_dirs, tmp_path, capsys):
    from jaxsql.cli import main

    d = _copy(hf_dirs["qwen2"], tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    del header[first]["data_offsets"]  # valid JSON, broken entry (was a KeyError traceback)
    raw = json.dumps(header).encode()
    data[8:8 + n] = raw + b" " * (n - len(raw))
    shard.write_bytes(bytes(data))
    assert main(["convert", "--hf-in", str(d), "--hf-out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and shard.name in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
