"""Two `jax.distributed` CPU processes x 4 devices against one process x 8 devices: HF import,
the sampler (each process gives its own prompts), the rows of the data pipeline, and the HF
export (gathered one tensor at a time, written by the lead process only)."""

import json
import os

import numpy as np
import pytest

from models.safetensors_io import SafetensorsReader
from tests.multihost import run_processes

_CODE = r"""
import json, os
import numpy as np
from jaxsql import distributed as d
assert d.initialize_from_env()
import jax
from data.pipeline import process_rows
from jaxsql.errors import JaxsqlError
from jaxsql.sharding import logical_to_sharding
from models.hf_io import save_hf_checkpoint
from models.sampler import generate
from rl import setup
from rl.config import MeshSection, ModelSection

model, out = os.environ["TEST_MODEL"], os.environ["TEST_OUT"]
p = d.process_index()
rng = np.random.RandomState(0)
prompts = [rng.randint(3, 100, size=rng.randint(2, 12)).tolist() for _ in range(8)]
rows = process_rows(len(prompts))  # this process's block of the global batch
result = {"process": p, "rows": [rows.start, rows.stop]}
for name, section in [("dp", MeshSection(data=-1)), ("fsdp", MeshSection(data=1, fsdp=-1, rules="fsdp"))]:
    mesh = setup.build_mesh(section)
    result[name + "_share"] = list(d.row_share(logical_to_sharding(("batch",), mesh, section.sharding_rules())))
    cfg, params = setup.load_policy(ModelSection(path=model), mesh, section.sharding_rules())
    for kind, kw in [("greedy", dict(greedy=True, num_samples=2)),
                     ("sampled", dict(temperature=0.9, top_k=40, num_samples=3))]:
        o = generate(params, cfg, prompts[rows], key=jax.random.key(7), max_new_tokens=6, ignore_stop=True,
                     rules=section.sharding_rules(), **kw)
        result[f"{name}_{kind}"] = {k: d.to_host(getattr(o, k)).tolist() for k in ("tokens", "logprobs", "lengths")}
        result[f"{name}_{kind}_local"] = d.local_rows(o.tokens).tolist()
    if name == "fsdp":
        result["fsdp_addressable"] = all(x.is_fully_addressable for x in jax.tree.leaves(params))
        # every process asks for its own directory: only the lead's may appear
        save_hf_checkpoint(os.path.join(out, f"hf-{p}"), cfg, params, max_shard_bytes=50_000)
        try:  # the lead refuses a foreign directory: every process must hear of it, none may hang
            save_hf_checkpoint(os.path.join(out, "foreign"), cfg, params)
        except JaxsqlError as e:
            result["refused"] = str(e)
        try:
            generate(params, cfg, prompts[: 4 - p], key=jax.random.key(0), max_new_tokens=2)
        except JaxsqlError as e:
            result["unequal"] = str(e)
print(json.dumps(result))
d.sync("done")
"""


def _run(n, model, out, devices):
    (out / "foreign").mkdir(parents=True)
    (out / "foreign" / "notes.txt").write_text("mine")
    outs = run_processes(_CODE, n, devices_per_process=devices, timeout=600,
                         extra_env={"TEST_MODEL": str(model), "TEST_OUT": str(out)})
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


@pytest.mark.slow
def test_two_processes_sample_and_export_what_one_process_does(tmp_path):
    from models.testing import save_random_checkpoint

    model = save_random_checkpoint(tmp_path / "model", "tiny", seed=1, vocab_size=128, hidden_size=64,
                                   intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    one = _run(1, model, tmp_path / "one", 8)[0]
    two = _run(2, model, tmp_path / "two", 4)
    assert [o["rows"] for o in two] == [[0, 4], [4, 8]] and one["rows"] == [0, 8]
    for name in ("dp", "fsdp"):
        assert [o[name + "_share"] for o in two] == [[0, 2], [1, 2]] and one[name + "_share"] == [0, 1]
        for kind, G in (("greedy", 2), ("sampled", 3)):
            want = one[f"{name}_{kind}"]
            for p, o in enumerate(two):
                got = o[f"{name}_{kind}"]
                assert got["tokens"] == want["tokens"], (name, kind, p)
                assert got["lengths"] == want["lengths"]
                np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)
                # local_rows: this process's prompts' samples, in order
                assert o[f"{name}_{kind}_local"] == want["tokens"][4 * G * p: 4 * G * (p + 1)]
    # samples differ between rows and between a prompt's samples: the keys are per row
    tokens = np.asarray(one["dp_sampled"]["tokens"])
    assert len({tuple(r) for r in tokens}) > len(tokens) // 2
    assert not two[0]["fsdp_addressable"]  # the export had to gather across processes
    # the lead wrote the export, the other process wrote nothing, and it equals one process's export
    assert not os.path.exists(tmp_path / "two" / "hf-1")
    a, b = tmp_path / "one" / "hf-0", tmp_path / "two" / "hf-0"
    files = sorted(f.name for f in a.iterdir())
    assert files == sorted(f.name for f in b.iterdir()) and len([f for f in files if f.startswith("model-")]) > 1
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    for f in files:
        if f.endswith(".safetensors"):
            ra, rb = SafetensorsReader(a / f), SafetensorsReader(b / f)
            assert ra.keys() == rb.keys()
            for k in ra.keys():
                np.testing.assert_array_equal(ra.read(k), rb.read(k))
    for o in two:
        assert "the processes hold [4, 3] prompts" in o["unequal"]
    assert "is not empty and is not a previous jaxsql export" in two[0]["refused"]
    assert "HF export refused on the lead process" in two[1]["refused"]
    assert sorted(p.name for p in (tmp_path / "two" / "foreign").iterdir()) == ["notes.txt"]
