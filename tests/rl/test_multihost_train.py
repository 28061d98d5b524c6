"""`jaxsql train` and `jaxsql sft` on two real `jax.distributed` CPU processes x 4 devices give
what one process with 8 devices gives, and only process 0 writes the run's files.

Each run is the real CLI (`jaxsql.cli.main`) started by `tests.multihost.run_processes`
on a data 2 x fsdp 4 mesh (rows over both axes, parameters split along ``embed`` over
fsdp): N steps, a checkpoint, ``--resume`` for one more step, the HF export. An audit
hook in every process records the files it opened for writing (and the directories it
made or renamed) under the run directory.
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from models.safetensors_io import SafetensorsReader
from tests.multihost import run_processes

from .conftest import grpo_overrides

_MAIN = r"""
import json, os, sys
root = os.path.realpath(os.environ["TEST_RUN_DIR"])
written = set()

def _note(path):
    if isinstance(path, int):
        return
    p = os.path.realpath(os.fsdecode(path))
    if p == root or p.startswith(root + os.sep):
        written.add(os.path.relpath(p, root))

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            _note(path)
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir"):
        _note(args[0])

sys.addaudithook(_hook)
from jaxsql.cli import main
rc = main(json.loads(os.environ["TEST_ARGV"]))
from jaxsql import distributed
print("WRITTEN " + json.dumps({"process": distributed.process_index(), "rc": rc, "written": sorted(written)}))
sys.exit(rc)
"""

# 8 prompts (one per batch device) x 2 samples; a constant learning rate so the
# 3 + 1 steps of the resumed run follow one schedule. advantage "none" keeps the
# gradients non-zero for a random model whose SQL never runs (reward -1).
GRPO = {"data.batch_size": 8, "sampling.num_generations": 2, "sampling.max_new_tokens": 6,
        "algo.advantage": "none", "algo.beta": 0.04,
        "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.learning_rate": 1e-3,
        "mesh.data": 2, "mesh.fsdp": 4, "mesh.rules": "fsdp", "checkpoint.async_save": False}
SFT = {"data.batch_size": 8, "data.max_prompt_len": 48, "data.max_target_len": 8,
       "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.learning_rate": 1e-3,
       "progress": False, "tensorboard": False, "mesh.data": 2, "mesh.fsdp": 4, "mesh.rules": "fsdp",
       "checkpoint.async_save": False}
VOLATILE = ("time", "tokens_per_s")  # wall-clock values


def _cli(command: str, config: Path, overrides: list[str], run_dir: Path, processes: int) -> list[dict]:
    argv = [command, "--config", str(config), *overrides]
    outs = run_processes(_MAIN, processes, devices_per_process=8 // processes, timeout=900,
                         extra_env={"TEST_ARGV": json.dumps(argv), "TEST_RUN_DIR": str(run_dir),
                                    "JAXSQL_CPU_DEVICES": str(8 // processes)})
    return [json.loads(next(line for line in o.splitlines() if line.startswith("WRITTEN "))[8:]) for o in outs]


def _run(command: str, overrides, run_dir: Path, processes: int, steps: int) -> tuple[list[dict], list[dict]]:
    """`steps` steps and a checkpoint, then ``--resume`` for one more step and the export."""
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text("{}\n")
    first = _cli(command, config, overrides(run_dir, steps=steps, export=False), run_dir, processes)
    second = _cli(command, config, ["--resume", *overrides(run_dir, steps=steps + 1, export=True)], run_dir,
                  processes)
    return first, second


def _params(hf: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(hf.glob("*.safetensors")):
        r = SafetensorsReader(f)
        out.update({k: r.read(k) for k in r.keys()})
    return out


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _check_same_run(one: Path, two: Path, sessions_two: tuple[list[dict], list[dict]]) -> float:
    """Parameters, metrics and samples of the two-process run against the one-process run;
    the largest parameter difference."""
    a, b = _params(one / "hf"), _params(two / "hf")
    assert a.keys() == b.keys() and a
    diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)
    assert diff <= 1e-5, diff
    assert any(float(np.max(np.abs(a[k]))) > 0 for k in a)
    ma, mb = _metrics(one), _metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] and len(ma) >= 2
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], abs=1e-5), k
            else:
                assert rb[k] == ra[k], k
    # only the lead wrote: the metrics, the samples, the export, the lock; the other process
    # wrote nothing in the run directory but orbax's checkpoint files
    for session in sessions_two:
        lead, other = session
        assert lead["process"] == 0 and other["process"] == 1 and lead["rc"] == other["rc"] == 0
        assert "run.lock" in lead["written"] and "metrics.jsonl" in lead["written"]
        # (".": the run directory itself, `mkdir(exist_ok=True)` on every process)
        stray = [p for p in other["written"] if p.split(os.sep)[0] not in ("checkpoints", ".")]
        assert stray == [], stray
    assert any(p.startswith("hf" + os.sep) for p in sessions_two[1][0]["written"])
    return diff


def _grpo_overrides(env):
    def make(run_dir, steps, export):
        return grpo_overrides(env, run_dir, **{**GRPO, "steps": steps, "checkpoint.export_hf": export})
    return make


def _sft_overrides(env):
    def make(run_dir, steps, export):
        o = {"run_dir": str(run_dir), "model.path": env["model"], "data.path": env["synthetic"], **SFT,
             "steps": steps, "checkpoint.export_hf": export}
        return [f"{k}={v}" for k, v in o.items()]
    return make


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "sft"])
def test_two_processes_train_what_one_process_trains(command, tiny_env, tmp_path):
    overrides = _grpo_overrides(tiny_env) if command == "train" else _sft_overrides(tiny_env)
    steps = 3
    _run(command, overrides, tmp_path / "one", 1, steps)
    t0 = time.perf_counter()
    two = _run(command, overrides, tmp_path / "two", 2, steps)
    seconds = time.perf_counter() - t0
    diff = _check_same_run(tmp_path / "one", tmp_path / "two", two)
    if command == "train":
        one_samples = (tmp_path / "one" / "samples.jsonl").read_text()
        assert (tmp_path / "two" / "samples.jsonl").read_text() == one_samples
        assert len(one_samples.splitlines()) == steps + 1
    print(f"{command}: two processes x 4 devices vs one x 8: max |param diff| = {diff:.3g}, "
          f"two-process wall time {seconds:.1f} s")


@pytest.mark.slow
def test_two_processes_process_rewards_are_global(tiny_env, tmp_path):
    """GRPO with per-token process advantages (a random PRM directory, ``step`` form): each
    process scores its own rows' steps, the PRM runs on the global rows, and the step scores
    and per-token advantages are the global ones: parameters and metrics match one process."""
    from jaxsql.cli import main

    prm = tmp_path / "prm"
    assert main(["prm", "init", "--policy", tiny_env["model"], "--out", str(prm)]) == 0
    runs = {}
    for n in (1, 2):
        run = tmp_path / f"p{n}"
        config = tmp_path / f"p{n}.yaml"
        config.write_text("{}\n")
        over = grpo_overrides(tiny_env, run, **{
            **GRPO, "steps": 2, "checkpoint.export_hf": True, "data.prompt_format": "cocte",
            "sampling.max_new_tokens": 12, "reward.weights.process": 0.5, "reward.process.prm": str(prm),
            "reward.process.form": "step", "reward.process.advantage": "grpo_step"})
        runs[n] = _cli("train", config, over, run, n)
        assert all(s["rc"] == 0 for s in runs[n])
    a, b = _params(tmp_path / "p1" / "hf"), _params(tmp_path / "p2" / "hf")
    assert a.keys() == b.keys() and a
    assert max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a) <= 1e-5
    ma, mb = _metrics(tmp_path / "p1"), _metrics(tmp_path / "p2")
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys() and "reward/process_mean" in ra and "reward/step_score_mean" in ra
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), k
