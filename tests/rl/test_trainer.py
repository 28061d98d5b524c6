"""The GRPO loop end to end on real components: resume after SIGKILL, SIGTERM mid-step,
dynamic sampling, export, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rl.config import load_train_config
from rl.trainer import GrpoTrainer

from .conftest import grpo_overrides

STEPS = 4
# Runs are configured for many steps (constant learning rate) and stopped with
# run(until=...), so a killed run is still running when we kill it and every run
# in this process shares one compiled step.
# advantage "none" keeps gradients non-zero for a random model whose SQL never runs
# (reward -1 everywhere), so the parameters depend on every sampled token.
COMMON = {"steps": 1000, "algo.advantage": "none", "algo.beta": 0.04, "algo.num_iterations": 2,
          "checkpoint.async_save": True}


def _cfg(env, run_dir, **extra):
    return load_train_config(None, grpo_overrides(env, run_dir, **{**COMMON, **extra}))


def _run(cfg, resume=False, patch=None, until=STEPS):
    t = GrpoTrainer(cfg, resume=resume)
    if patch:
        patch(t)
    try:
        out = t.run(until=until)
        return out, jax.device_get(t.state["params"])
    finally:
        t.close()


def _order(run_dir: Path) -> dict:
    order = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        order[row["step"]] = row["ids"]  # a step redone after a crash overwrites
    return order


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def uninterrupted(tiny_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    out, params = _run(_cfg(tiny_env, run, **{"checkpoint.every_steps": 0}))
    assert out["step"] == STEPS and not out["stopped"]
    return params, _order(run), run


def test_sigkill_after_checkpoint_then_resume_is_exact(tiny_env, tmp_path, uninterrupted):
    run = tmp_path / "killed"
    overrides = grpo_overrides(tiny_env, run, **{**COMMON, "checkpoint.every_steps": 1})
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "jaxsql", "train", "--config", str(empty), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    ck = run / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        if (ck / "2").is_dir() and proc.poll() is None:
            break
        if proc.poll() is not None:
            pytest.fail(f"training exited before being killed: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no checkpoint within the deadline")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    assert killed_at >= 2
    target = killed_at + 2
    out, params_r = _run(_cfg(tiny_env, run, **{"checkpoint.every_steps": 1}), resume=True, until=target)
    assert out["step"] == target and len(out["history"]) == 2
    fresh = tmp_path / "fresh"
    _, params_u = _run(_cfg(tiny_env, fresh, **{"checkpoint.every_steps": 0}), until=target)
    _assert_same_params(params_u, params_r)
    order_r, order_u = _order(run), _order(fresh)
    assert [order_r[s] for s in range(target)] == [order_u[s] for s in range(target)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_mid_step_leaves_usable_checkpoint(tiny_env, tmp_path, uninterrupted, sig):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) alike: the step finishes, a checkpoint is saved."""
    params_u, order_u, _ = uninterrupted
    run = tmp_path / "term"
    before = signal.getsignal(sig)

    def patch(trainer):
        score = trainer._score
        calls = []

        def score_and_preempt(*a):
            calls.append(1)
            if len(calls) == 2:  # in the middle of step 1 (after its rollout, before its update)
                os.kill(os.getpid(), sig)
            return score(*a)

        trainer._score = score_and_preempt

    out, _ = _run(_cfg(tiny_env, run, **{"checkpoint.every_steps": 0}), patch=patch)
    assert out["stopped"] and out["step"] == 2
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert signal.getsignal(sig) is before  # the loop restored the handler
    out, params_r = _run(_cfg(tiny_env, run, **{"checkpoint.every_steps": 0}), resume=True)
    assert out["step"] == STEPS
    _assert_same_params(params_u, params_r)
    assert _order(run) == order_u


def test_close_releases_what_the_trainer_acquired(tiny_env, tmp_path):
    t = GrpoTrainer(_cfg(tiny_env, tmp_path / "own", **{"sql.workers": 1, "sql.timeout_s": 2.5,
                                                        "sql.max_vm_steps": 123456}))
    pool, executor = t.pool, t._executor
    # the run config's sql section sets the limits of the pool the trainer opens
    assert (pool.num_workers, pool.timeout_s, pool.max_vm_steps) == (1, 2.5, 123456)
    t.close()
    assert executor._shutdown and pool._closed
    t.close()  # twice is fine
    from jaxsql.sql import SqlPool

    mine = SqlPool(1)
    try:
        with GrpoTrainer(_cfg(tiny_env, tmp_path / "given"), pool=mine) as t2:
            assert t2.pool is mine
        assert not mine._closed  # not the trainer's to close
    finally:
        mine.close()


def test_mesh_rules_from_the_config_place_the_state(tiny_env, tmp_path):
    """mesh.rules / mesh.rule_overrides decide where the trainer's parameters and optimizer
    state live (not only whether they fit)."""

    def axes(rules, mesh=(1, 4, 2), **extra):
        shape = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh))
        cfg = _cfg(tiny_env, tmp_path / f"{rules}{len(extra)}", **{**shape, "mesh.rules": rules, **extra})
        with GrpoTrainer(cfg) as t:
            assert t.rules == cfg.mesh.sharding_rules()
            named = {}
            for path, leaf in jax.tree_util.tree_leaves_with_path(t.state["params"]):
                spec = leaf.sharding.spec
                named[jax.tree_util.keystr(path)] = {a for d in spec if d for a in ((d,) if isinstance(d, str) else d)}
            return named

    dp = axes("dp", mesh=(2, 1, 1))
    assert all(not used for used in dp.values())  # pure data parallel: every parameter whole on every device
    ft = axes("fsdp_tensor")
    assert any("tensor" in used for used in ft.values()) and any("fsdp" in used for used in ft.values())
    embed = [k for k in ft if "embed" in k.lower()]
    assert embed and all("tensor" in ft[k] for k in embed)  # the vocabulary over tensor by default ...
    no_vocab = axes("fsdp_tensor", **{"mesh.rule_overrides": "{vocab: null}"})
    assert all("tensor" not in no_vocab[k] for k in embed)  # ... and replicated when overridden


def test_refuses_existing_run_without_resume(tiny_env, uninterrupted):
    from jaxsql.errors import JaxsqlError

    with pytest.raises(JaxsqlError, match="--resume"):
        GrpoTrainer(_cfg(tiny_env, uninterrupted[2]))


def test_metrics_and_export(tiny_env, uninterrupted, tmp_path):
    from jaxsql.metrics import read_metrics
    from rl.export import export_checkpoint

    rows = read_metrics(uninterrupted[2])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward/mean", "reward/execution", "sql/ex", "sql/error_rate", "train/kl",
                "train/clip_fraction", "train/entropy", "train/mismatch_abs", "completion/length_mean",
                "time/rollout_s", "time/rewards_s", "time/update_s", "time/reward_hidden_s", "tokens_per_s"):
        assert rows[-1][key] is not None, key
    assert rows[-1]["sql/error_rate"] == 1.0 and rows[-1]["reward/mean"] == -1.0
    out = export_checkpoint(uninterrupted[2], tmp_path / "hf")
    from models.hf_io import load_hf_checkpoint

    _, params = load_hf_checkpoint(out)
    _assert_same_params(uninterrupted[0], params)


def test_dynamic_sampling_refills_and_masks(tiny_env, tmp_path):
    import dataclasses

    G = 4
    plans = [np.array([0, 0, 0, 0, 1, 0, 0, 0], np.float32),   # draw 0: group 1 informative
             np.array([1, 1, 1, 1, 0, 0, 1, 1], np.float32)]   # draw 1: group 1 informative

    def patch(trainer):
        score = trainer._score
        calls = []

        def planned(texts, examples):
            out = score(texts, examples)
            r = plans[len(calls) % 2]
            calls.append(1)
            return dataclasses.replace(out, rewards=r)

        trainer._score = planned

    cfg = _cfg(tiny_env, tmp_path / "dyn", **{"algo.dynamic_sampling": True, "algo.max_refill_batches": 3,
                                              "checkpoint.every_steps": 0})
    out, _ = _run(cfg, patch=patch, until=1)
    m = out["history"][0]
    assert m["dynamic/draws"] == 2 and m["dynamic/kept_groups"] == 2
    assert m["train/tokens"] == 2 * G * 8  # both kept groups, all 8 tokens of each sample

    # never informative: stops after the refills, and the filler groups are masked out
    plans[:] = [np.full(8, -1.0, np.float32)] * 2
    out, _ = _run(_cfg(tiny_env, tmp_path / "flat", **{"algo.dynamic_sampling": True,
                                                      "algo.max_refill_batches": 2,
                                                      "checkpoint.every_steps": 0}), patch=patch, until=1)
    m = out["history"][0]
    assert m["dynamic/draws"] == 3 and m["dynamic/kept_groups"] == 0 and m["train/tokens"] == 0
    assert m["train/update_skipped"] == 0.0


def test_cli_export_and_config_errors(uninterrupted, tmp_path, capsys):
    from jaxsql.cli import main

    assert main(["export", "--checkpoint", str(uninterrupted[2]), "--out", str(tmp_path / "hf"),
                 "--step", "4"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run_dir: x\nmodel: {preset: tiny}\nalgo: {loss_agg: nope}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "AlgoSection.loss_agg" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1


def test_cli_export_of_missing_step_is_one_line(uninterrupted, tmp_path, capsys):
    from jaxsql.cli import main

    assert main(["export", "--checkpoint", str(uninterrupted[2]), "--out", str(tmp_path / "o"),
                 "--step", "99"]) == 1
    err = capsys.readouterr().err
    assert "--step 99: no such checkpoint" in err and "steps saved:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
