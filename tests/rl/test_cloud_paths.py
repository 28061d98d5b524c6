"""Run directories, HF import/export, config and data files in a bucket (``gs://``).

The stand-in for Cloud Storage is a local GCS JSON-API emulator (``gcp-storage-emulator``) that
the real clients talk to: `etils.epath` through ``gcsfs`` (``STORAGE_EMULATOR_HOST``) and orbax's
arrays through TensorStore's own GCS driver (``TENSORSTORE_GCS_HTTP_URL``). Nothing in jaxsql
knows it is an emulator.
"""

import importlib.util
import json
import os
import socket
import time

# gcsfs's experimental bucket-type probe asks the real control plane (with credential look-ups
# that time out here); read at gcsfs's import, so before anything imports it
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gcsfs (the jaxsql[gcs] extra) is not installed", allow_module_level=True)
emulator = pytest.importorskip("gcp_storage_emulator.server")

from jaxsql.cli import main  # noqa: E402
from jaxsql.errors import JaxsqlError  # noqa: E402
from jaxsql.paths import as_path, upload_dir  # noqa: E402
from rl import run_dir as run_dir_mod  # noqa: E402
from rl.prm import read_label_file  # noqa: E402
from rl.run_dir import RunDir, RunDirError  # noqa: E402

BUCKET = "jaxsql-test"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """gs://jaxsql-test served by a local emulator; the clients' environment pointed at it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = emulator.create_server("127.0.0.1", port, in_memory=False, default_bucket=BUCKET,
                                    data_dir=str(tmp_path_factory.mktemp("gcs")))
    server.start()
    server._api._httpd.handle_error = lambda *a: None  # clients closing early: not our concern
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
           "JAXSQL_CACHE": str(tmp_path_factory.mktemp("cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{BUCKET}"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _overrides(env, run_dir, **extra) -> list[str]:
    base = {"run_dir": run_dir, "model.path": env["model"], "data.path": env["synthetic"],
            "data.batch_size": 2, "data.max_prompt_len": 48, "data.max_target_len": 8, "steps": 2,
            "progress": False, "tensorboard": True, "checkpoint.export_hf": True, "mesh.data": 1,
            "checkpoint.every_steps": 1, "checkpoint.async_save": True}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _params(model_dir):
    from models.hf_io import load_hf_checkpoint

    _, params = load_hf_checkpoint(model_dir)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow  # four short SFT runs, three exports and a convert through the emulator
def test_sft_run_resume_and_export_in_a_bucket(tiny_env, bucket, capsys):
    run = f"{bucket}/runs/sft"
    # the config file in the bucket too
    cfg = as_path(f"{bucket}/configs/sft.yaml")
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("optim:\n  learning_rate: 0.001\n")
    assert main(["sft", "--config", str(cfg), *_overrides(tiny_env, run)]) == 0
    r = as_path(run)
    assert sorted(p.name for p in (r / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") and p.stat().length > 0 for p in (r / "tb").iterdir())
    assert (r / "hf" / "config.json").exists() and (r / "hf" / ".jaxsql-export").exists()
    assert not (r / run_dir_mod.LOCK_NAME).exists()  # the lease ends with the run

    # resume from the bucket's checkpoint: one more step, metrics appended
    assert main(["sft", "--config", str(cfg), "--resume", *_overrides(tiny_env, run, steps=3)]) == 0
    rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3]
    assert sorted(int(p.name) for p in (r / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3
    # starting over a bucket run without --resume is refused as locally
    assert main(["sft", "--config", str(cfg), *_overrides(tiny_env, run, steps=3)]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err

    # export the last step to the bucket, import it back: the run's own export's parameters
    out = f"{bucket}/exports/sft"
    assert main(["export", "--checkpoint", run, "--out", out]) == 0
    exported, final = _params(out), _params(f"{run}/hf")
    assert len(exported) == len(final) and all(np.array_equal(a, b) for a, b in zip(exported, final))
    # a second export into the same place replaces the first; a foreign directory is refused
    assert main(["export", "--checkpoint", run, "--out", out, "--step", "2"]) == 0
    foreign = as_path(f"{bucket}/exports/foreign")
    foreign.mkdir(parents=True, exist_ok=True)
    (foreign / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", run, "--out", str(foreign)]) == 1
    assert "not a previous jaxsql export" in capsys.readouterr().err
    # convert reads from and writes to the bucket
    assert main(["convert", "--hf-in", out, "--hf-out", f"{bucket}/exports/converted"]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(_params(f"{bucket}/exports/converted"), _params(out)))

    # a run whose model and tokenizer live in the bucket
    run2 = f"{bucket}/runs/sft-from-bucket"
    assert main(["sft", "--config", str(cfg), *_overrides(tiny_env, run2, **{"model.path": out, "steps": 1})]) == 0
    assert (as_path(run2) / "hf" / "tokenizer.json").exists()


def test_a_bucket_run_dir_is_leased(bucket):
    path = f"{bucket}/runs/leased"
    first = RunDir.claim(path)
    lease = as_path(path) / run_dir_mod.LOCK_NAME
    held = json.loads(lease.read_text())
    assert held["pid"] == os.getpid()
    with pytest.raises(RunDirError, match=rf"run_dir {path} is in use by another jaxsql process "
                                          rf"\(pid {os.getpid()} on .*lease renewed \d+ s ago\)"):
        RunDir.claim(path)
    first.release()
    assert not lease.exists()
    # a lease its holder stopped renewing (a killed run) is taken over after the expiry
    lease.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t",
                                 "renewed": time.time() - run_dir_mod.LEASE_EXPIRY_S - 1}))
    taken = RunDir.claim(path)
    assert json.loads(lease.read_text())["pid"] == os.getpid()
    taken.release()
    # foreign files in a bucket run_dir are refused before anything is written
    foreign = as_path(f"{bucket}/runs/foreign")
    foreign.mkdir(parents=True, exist_ok=True)
    (foreign / "data.csv").write_text("x")
    with pytest.raises(RunDirError, match="holds files that are not a jaxsql run's"):
        RunDir.claim(str(foreign))
    assert not (foreign / run_dir_mod.LOCK_NAME).exists()


def test_sqlite_stays_local_and_jsonl_may_live_in_a_bucket(tiny_env, bucket):
    from data.readers import read_examples
    from rl.config import DataSection
    from rl.setup import load_examples

    with pytest.raises(JaxsqlError, match=r"DataSection\.path gs://.*SQLite databases stay on local disk.*"
                                          r"stage_data\.sh"):
        load_examples(DataSection(source="synthetic", path=f"{bucket}/synthetic"), "/tmp/run")
    with pytest.raises(JaxsqlError, match=r"synthetic benchmark is SQLite.*set data\.path to a local directory"):
        load_examples(DataSection(source="synthetic"), f"{bucket}/runs/x")
    with pytest.raises(JaxsqlError, match=r"spider data\) gs://.*stay on local disk"):
        read_examples("spider", f"{bucket}/spider")
    local = tiny_env["bench"].train[:3]
    rows = [ex.to_dict() for ex in local]
    f = as_path(f"{bucket}/data/train.jsonl")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_examples("jsonl", str(f))
    assert [e.question for e in got] == [e.question for e in local] and got[0].db_path == local[0].db_path
    rows[0]["db_path"] = "dbs/x.sqlite"  # relative: would be a database in the bucket
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(JaxsqlError, match=r"train\.jsonl:1: a relative db_path .*stay on local disk"):
        read_examples("jsonl", str(f))


@pytest.mark.slow  # a short GRPO run through the emulator
def test_grpo_run_in_a_bucket(tiny_env, bucket, tmp_path):
    """jaxsql train into gs://: checkpoints, metrics and samples.jsonl (rewritten whole, since an
    object cannot be appended to) land in the bucket; the SQLite databases stay local."""
    from .conftest import grpo_overrides

    run = f"{bucket}/runs/grpo"
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main(["train", "--config", str(tmp_path / "none.yaml"), *grpo_overrides(tiny_env, run, steps=2,
                                                                  **{"checkpoint.every_steps": 1})]) == 0
    r = as_path(run)
    samples = [json.loads(x) for x in (r / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in samples] == [0, 1] and all(len(x["ids"]) == 2 for x in samples)
    assert [json.loads(x)["step"] for x in (r / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (r / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


@pytest.mark.slow  # a short PRM run and two tiny evaluations through the emulator
def test_prm_train_and_eval_out_in_a_bucket(tiny_env, bucket, tmp_path, capsys):
    """`jaxsql prm train` from a PRM (here the policy, an lm head) and a label file in the bucket
    into a bucket run directory; `jaxsql eval --out gs://...` with that PRM from the bucket
    (`--prm`), and its rerun resuming from the bucket's results file."""
    from .test_prm_train import _records

    model = f"{bucket}/models/prm-init"
    upload_dir(tiny_env["model"], model)
    labels = as_path(f"{bucket}/labels/labels.jsonl")
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text("".join(json.dumps(r.to_json()) + "\n" for r in _records(tiny_env["bench"], 16)))
    run = f"{bucket}/runs/prm"
    (tmp_path / "none.yaml").write_text("{}\n")
    over = {"run_dir": run, "model.path": model, "data.labels": str(labels), "data.heldout_fraction": 0.25,
            "data.batch_size": 8, "data.max_prompt_len": 48, "prm.max_len": 400, "steps": 2, "progress": False,
            "tensorboard": False, "checkpoint.async_save": False, "mesh.data": 1}
    assert main(["prm", "train", "--config", str(tmp_path / "none.yaml"),
                 *[f"{k}={v}" for k, v in over.items()]]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    r = as_path(run)
    assert {json.loads(x)["step"] for x in (r / "metrics.jsonl").read_text().splitlines()} >= {1, 2}
    assert (r / "hf" / "config.json").exists() and (r / "hf" / "jaxsql_prm.json").exists()
    assert sorted(p.name for p in (r / "checkpoints").iterdir() if p.name.isdigit())[-1] == "2"

    out = f"{bucket}/evals/bon"
    argv = ["eval", "--model", tiny_env["model"], "--data", f"synthetic:{tiny_env['synthetic']}:dev",
            "--prompt-format", "cocte", "--max-new-tokens", "8", "--max-prompt-len", "48", "--batch-size", "8",
            "--devices", "1", "--no-progress", "--prm", f"{run}/hf", "--select", "prm-best-of-n",
            "--num-samples", "2", "--out", out]
    assert main(argv) == 0
    capsys.readouterr()
    o = as_path(out)
    rows = [json.loads(x) for x in (o / "results.jsonl").read_text().splitlines()]
    n = len(tiny_env["bench"].dev)
    assert len(rows) == n and all(x["samples"] == 2 for x in rows)
    metrics = json.loads((o / "metrics.json").read_text())
    assert metrics["config"]["prm"] == f"{run}/hf" and (o / metrics["predictions_file"]).exists()
    assert (o / "metrics.md").exists()
    # a rerun resumes from the bucket's results (nothing is generated again, nothing duplicated)
    (o / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:-1]) + '{"id": "cut')
    assert main(argv) == 0
    capsys.readouterr()
    again = [json.loads(x) for x in (o / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in again] == [x["id"] for x in rows]
    # another run's settings into the same bucket directory are refused, as locally
    assert main([*argv, "--seed", "7"]) == 1
    assert "holds a run with different settings" in capsys.readouterr().err


@pytest.mark.slow  # a short labelling, a scoring and an evaluation through the emulator
def test_prm_label_score_and_eval_model_from_a_bucket(tiny_env, bucket, capsys):
    """`prm label` from a policy in the bucket into a label file in the bucket (and its resume),
    `prm score` with the PRM, policy and completions in the bucket, `eval --model gs://...`."""
    policy = f"{bucket}/models/policy"
    upload_dir(tiny_env["model"], policy)
    data = f"synthetic:{tiny_env['synthetic']}:train"
    labels = f"{bucket}/labels/sampled.jsonl"
    args = ["prm", "label", "--policy", policy, "--data", data, "--k", "2", "--out", labels, "--limit", "2",
            "--trajectories", "2", "--max-new-tokens", "16", "--batch-size", "1", "--no-progress"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 4
    assert len(read_label_file(labels)) == 4
    meta = json.loads(as_path(labels + ".meta.json").read_text())
    assert meta["policy"] == policy
    # a crash mid-write of the second batch leaves a cut line: the rerun drops it and labels
    # only that batch again, giving the same file
    text = as_path(labels).read_text()
    first_batch = len("".join(text.splitlines(keepends=True)[:2]))
    as_path(labels).write_text(text[:first_batch + 20])
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["resumed_batches"] == 1
    assert as_path(labels).read_text() == text

    ex = tiny_env["bench"].train[0]
    comps = as_path(f"{bucket}/completions.jsonl")
    comps.write_text(json.dumps({"id": ex.id, "completion": "WITH a AS (" + ex.gold_sql + ")\n\nSELECT * FROM a"})
                     + "\n")
    assert main(["prm", "score", "--prm", policy, "--data", data, "--completions", str(comps),
                 "--policy", policy]) == 0
    line = json.loads(capsys.readouterr().out)
    assert len(line["steps"]) == 2 and set(line["scores"]) >= {"min", "entropy"}

    out = f"{bucket}/evals/greedy"
    assert main(["eval", "--model", policy, "--data", f"synthetic:{tiny_env['synthetic']}:dev", "--max-new-tokens",
                 "8", "--max-prompt-len", "48", "--batch-size", "8", "--devices", "1", "--no-progress",
                 "--out", out]) == 0
    capsys.readouterr()
    metrics = json.loads((as_path(out) / "metrics.json").read_text())
    assert metrics["config"]["model"] == policy
    assert len((as_path(out) / "results.jsonl").read_text().splitlines()) == len(tiny_env["bench"].dev)
