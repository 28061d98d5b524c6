"""The multi-host helpers of `jaxsql.distributed` on two real `jax.distributed` CPU processes."""

import json

import numpy as np

from tests.multihost import run_processes

_CODE = r"""
import json
import numpy as np
from jaxsql import distributed as d
assert d.initialize_from_env()
import jax
from jax.sharding import NamedSharding, PartitionSpec
from jaxsql.sharding import make_mesh

mesh = make_mesh(2, 2, 1)
rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
p = d.process_index()
local = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) + 100 * p
x = d.to_global(local, rows)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
print(json.dumps({
    "process": p, "count": d.process_count(), "lead": d.is_lead_process(),
    "shape": list(x.shape), "sum": float(d.to_host(total)),
    "host": d.to_host(x).tolist(), "back": d.local_rows(x).tolist(),
    "any_mine": d.any_process(p == 1), "any_none": d.any_process(False),
    # rows replicated over the mesh (the batch axes do not split them): the blocks are gathered
    "replicated_rows": d.to_host(d.rows_to_global(local, NamedSharding(mesh, PartitionSpec()))).tolist(),
    "split_rows": d.to_host(d.rows_to_global(local, rows)).tolist(),
    "from_host": d.local_rows(d.from_host(np.arange(8.0) * 2, rows)).tolist(),
    "objects": d.process_objects({"p": p, "text": "x" * (5 + 100 * p)}),
}))
d.sync("done")
"""


def test_two_processes_share_global_rows_and_decisions():
    outs = [json.loads(o.strip().splitlines()[-1]) for o in run_processes(_CODE, 2, devices_per_process=2)]
    want = np.concatenate([np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * p for p in (0, 1)])
    for p, o in enumerate(outs):
        assert o["process"] == p and o["count"] == 2 and o["lead"] == (p == 0)
        assert o["shape"] == [8, 3]
        assert o["sum"] == float(want.sum())
        assert np.array_equal(np.asarray(o["host"]), want)  # every process sees all rows
        assert np.array_equal(np.asarray(o["back"]), want[4 * p: 4 * p + 4])  # and gets its own back
        assert o["any_mine"] is True and o["any_none"] is False
        assert np.array_equal(np.asarray(o["replicated_rows"]), want)
        assert np.array_equal(np.asarray(o["split_rows"]), want)
        assert o["from_host"] == (np.arange(8.0) * 2)[4 * p: 4 * p + 4].tolist()
        assert o["objects"] == [{"p": 0, "text": "x" * 5}, {"p": 1, "text": "x" * 105}]
