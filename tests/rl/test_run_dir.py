"""Runs that cannot be silently damaged: the run-directory lock, foreign files, tokenizer/model
mismatch, a damaged latest checkpoint, strict JSON, one-line errors for unusable directories."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsql.checkpoint import CheckpointError
from jaxsql.cli import main
from jaxsql.errors import JaxsqlError
from rl.config import load_sft_config
from rl.sft import SftTrainer


def _sft_overrides(env, run_dir, **extra) -> list[str]:
    base = {"run_dir": str(run_dir), "model.path": env["model"], "data.path": env["synthetic"],
            "data.batch_size": 2, "data.max_prompt_len": 48, "data.max_target_len": 8, "steps": 3,
            "progress": False, "tensorboard": False, "checkpoint.export_hf": False, "mesh.data": 1,
            "checkpoint.async_save": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(env, run_dir, **extra):
    return load_sft_config(None, _sft_overrides(env, run_dir, **extra))


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_second_trainer_on_a_run_dir_fails_naming_the_first(tiny_env, tmp_path):
    run = tmp_path / "run"
    first = SftTrainer(_cfg(tiny_env, run))
    try:
        with pytest.raises(JaxsqlError, match=rf"in use by another jaxsql process \(pid {os.getpid()}\)"):
            SftTrainer(_cfg(tiny_env, run))
    finally:
        first.close()
    # released by close(): the same directory can be trained (and resumed) again
    with SftTrainer(_cfg(tiny_env, run)) as again:
        assert again.start_step == 0


def test_lock_held_by_another_process_and_stale_lock(tiny_env, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rl.run_dir import RunDir; RunDir.claim(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(JaxsqlError, match=rf"pid {holder.pid}\)"):
            SftTrainer(_cfg(tiny_env, run))
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is gone with it and the next trainer takes the directory over
    assert (run / "run.lock").read_text().strip() == str(holder.pid)
    with SftTrainer(_cfg(tiny_env, run)):
        assert (run / "run.lock").read_text().strip() == str(os.getpid())


def test_foreign_run_dir_and_foreign_hf_are_refused_before_writing(tiny_env, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my thesis")
    before = _tree(run)
    with pytest.raises(JaxsqlError, match=r"holds files that are not a jaxsql run's \(notes.txt\)"):
        SftTrainer(_cfg(tiny_env, run))
    assert _tree(run) == before
    run2 = tmp_path / "hfrun"
    (run2 / "hf").mkdir(parents=True)
    (run2 / "hf" / "weights.bin").write_text("someone else's model")
    before = _tree(run2)
    with pytest.raises(JaxsqlError, match="not a jaxsql export"):
        SftTrainer(_cfg(tiny_env, run2, **{"checkpoint.export_hf": True}))
    assert _tree(run2) == before


def test_tokenizer_larger_than_the_vocabulary_is_refused(tiny_env, tmp_path):
    from models.hf_io import load_hf_checkpoint
    from models.testing import save_random_checkpoint

    cfg, _ = load_hf_checkpoint(tiny_env["model"])
    small = save_random_checkpoint(tmp_path / "small", "tiny", vocab_size=cfg.vocab_size - 50,
                                   hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                   num_layers=1, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, eos_token_ids=cfg.eos_token_ids)
    with pytest.raises(JaxsqlError, match=rf"has {cfg.vocab_size} tokens but the model's vocabulary has "
                                          rf"{cfg.vocab_size - 50}"):
        SftTrainer(_cfg(tiny_env, tmp_path / "run", **{"model.path": small,
                                                        "model.tokenizer": tiny_env["tokenizer"]}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_tokenizer_is_refused_on_resume(tiny_env, tmp_path):
    """Resuming after the tokenizer files were removed: transformers returns an empty tokenizer."""
    model = tmp_path / "model"
    shutil.copytree(tiny_env["model"], model)
    run = tmp_path / "run"
    with SftTrainer(_cfg(tiny_env, run, **{"model.path": model, "steps": 1})) as t:
        t.run()
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    with pytest.raises(JaxsqlError, match="tokenizer loaded from .* is empty"):
        SftTrainer(_cfg(tiny_env, run, **{"model.path": model, "steps": 2}), resume=True)


def test_damaged_latest_checkpoint_names_it_and_offers_the_previous(tiny_env, tmp_path):
    run = tmp_path / "run"
    with SftTrainer(_cfg(tiny_env, run, **{"checkpoint.every_steps": 1, "steps": 2})) as t:
        t.run()
    ck = run / "checkpoints"
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [1, 2]
    for f in (ck / "2" / "state").rglob("*"):  # truncate every array file of the latest step
        if f.is_file() and f.stat().st_size > 0 and not f.name.endswith(".json"):
            f.write_bytes(f.read_bytes()[:10])
    cfg = _cfg(tiny_env, run, **{"checkpoint.every_steps": 1, "steps": 3})
    with pytest.raises(CheckpointError) as err:
        SftTrainer(cfg, resume=True)
    msg = str(err.value)
    assert "\n" not in msg and f"{ck}/2" in msg and "--resume-from-previous" in msg and "step 1" in msg
    # the CLI flag: the damaged step is moved aside and the run continues from step 1
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert main(["sft", "--config", str(empty), "--resume-from-previous",
                 *_sft_overrides(tiny_env, run, **{"checkpoint.every_steps": 1, "steps": 3})]) == 0
    assert (ck / "2.damaged").is_dir()
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())[-1] == 3


def test_summary_json_is_strict_when_the_loss_is_nan(tiny_env, tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    # an absurd learning rate: the first update sends the weights to inf, the next loss is NaN
    assert main(["sft", "--config", str(empty), *_sft_overrides(
        tiny_env, tmp_path / "run", **{"steps": 2, "optim.learning_rate": 1e30, "optim.max_grad_norm": 0,
                                       "checkpoint.every_steps": 0})]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]

    def no_constants(name):
        raise AssertionError(f"{name} in the JSON summary: {out}")

    summary = json.loads(out, parse_constant=no_constants)
    assert summary["train/loss"] is None  # NaN printed as null
    rows = [json.loads(line, parse_constant=no_constants)
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/loss"] is None and not math.isnan(rows[0]["train/loss"])


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_unusable_run_dir_is_a_one_line_error(tiny_env, tmp_path, capsys, kind):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    if kind == "file":
        run = tmp_path / "a_file"
        run.write_text("x")
        want = "exists and is not a directory"
    else:
        run = Path("/sys/jaxsql_run_dir_test")  # sysfs: even root cannot create it
        want = "cannot create it"
    assert main(["sft", "--config", str(empty), *_sft_overrides(tiny_env, run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run_dir") and want in err and "\n" not in err


def test_demo_out_unusable_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out, want in ((f, "not a directory"), (Path("/sys/jaxsql_demo_test"), "cannot create it")):
        assert main(["demo", "--out", str(out), "--smoke"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and want in err and "\n" not in err, err


READ_ONLY_PROBE = """
import os, sys
from jaxsql.cli import main
from rl.run_dir import RunDir, RunDirError
root = sys.argv[1]
try:
    open(os.path.join(root, "probe"), "w")
    print("writable")
except OSError:
    pass
for name in ("run_new", "run_resumed"):
    try:
        RunDir.claim(os.path.join(root, name))
        print(name, "claimed")
    except RunDirError as e:
        print(name, "error:", e)
for name in ("demo_new", "demo_resumed"):
    print(name, "rc", main(["demo", "--out", os.path.join(root, name), "--smoke"]), flush=True)
"""


def test_read_only_run_dir_and_demo_out_are_one_line_errors(tmp_path):
    """Existing directories on a read-only mount (not even root writes there): new and resumed runs."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs root and unshare/mount for a read-only bind mount")
    if subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a mount namespace")
    from rl.demo import DemoDir, smoke_config

    ro = tmp_path / "ro"
    for name in ("run_new", "run_resumed/checkpoints", "demo_new"):
        (ro / name).mkdir(parents=True)
    (ro / "run_resumed" / "run.lock").write_text("1\n")
    DemoDir(ro / "demo_resumed", smoke_config(minutes=10.0))  # what `demo --smoke` wrote before
    before = _tree(ro)
    script = f"mount --bind -o ro {ro} {ro} && exec {sys.executable} -c \"$0\" {ro}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), JAX_PLATFORMS="cpu")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, READ_ONLY_PROBE],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:2] == [f"run_new error: run_dir {ro / 'run_new'}: cannot write in it (Read-only file system)",
                         f"run_resumed error: run_dir {ro / 'run_resumed'}: cannot write in it "
                         f"(Read-only file system)"], proc.stdout
    assert lines[2:] == ["demo_new rc 1", "demo_resumed rc 1"], proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --out {ro / name}: cannot write in it (Read-only file system)"
                      for name in ("demo_new", "demo_resumed")], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(ro) == before
