"""`jaxsql study`: its refusals, its table, and the smoke study end to end with a resume."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxsql.cli import main as cli_main
from jaxsql.errors import ConfigError, JaxsqlError
from rl import study


def test_refuses_a_foreign_directory_and_other_settings(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    assert cli_main(["study", "--out", str(out), "--smoke"]) == 1
    assert "not a jaxsql study directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run = tmp_path / "run"
    study.StudyDir(run, study.smoke_config())  # claims it (writes the marker)
    with pytest.raises(JaxsqlError, match="different settings .*seeds"):
        study.StudyDir(run, study.smoke_config(seeds=(0, 1)))
    study.StudyDir(run, dataclasses.replace(study.smoke_config(), minutes=99.0))  # the cap is not identity


def test_bad_settings_fail_naming_the_field(tmp_path, capsys):
    with pytest.raises(ConfigError, match="StudyConfig.arms"):
        dataclasses.replace(study.smoke_config(), arms=("answers", "nope"))
    with pytest.raises(ConfigError, match="StudyConfig.selectors"):
        dataclasses.replace(study.smoke_config(), selectors=("greedy", "best"))
    with pytest.raises(ConfigError, match="StudyConfig.seeds"):
        dataclasses.replace(study.smoke_config(), seeds=(1, 1))
    assert cli_main(["study", "--out", str(tmp_path / "x"), "--arms", "answers,nope"]) == 2
    assert "--arms: unknown ['nope']" in capsys.readouterr().err
    assert cli_main(["study", "--out", str(tmp_path / "x"), "--seeds", "a"]) == 2
    assert not (tmp_path / "x").exists()


def test_report_cells_are_mean_and_range_over_seeds(tmp_path):
    cfg = dataclasses.replace(study.smoke_config(seeds=(0, 1)), arms=("answers",), selectors=("greedy",))
    res = [{"ex_set": 0.2, "ex_bag": 0.1, "error_rate": 0.5, "qatch": 0.3},
           {"ex_set": 0.4, "ex_bag": 0.3, "error_rate": 0.25, "qatch": 0.5}]
    phases = {}
    for s, r in zip(cfg.seeds, res):
        phases[f"seed{s}/eval"] = {"results": {"answers": {"greedy": r}, "sft": {"greedy": r},
                                               "cocte_sft": {"greedy": r}}}
        phases[f"seed{s}/arm_answers"] = {"seconds": 100.0 + 20 * s}
        phases[f"seed{s}/base"] = {"seconds": 10.0}
    path = study.write_report(tmp_path, {"phases": phases}, cfg, 1234.0)
    line = next(x for x in path.read_text().splitlines() if x.startswith("| answers |"))
    assert "| greedy | 30.0 [20.0, 40.0] | 20.0 [10.0, 30.0] | 37.5 [25.0, 50.0] | 40.0 [30.0, 50.0] | 110 |" in line
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_a_signal_during_prm_training_stops_the_study_not_the_phase(tmp_path, monkeypatch):
    """A SIGTERM / Ctrl-C inside the PRM's training saves its checkpoint and ends the study
    (the phase is not recorded as done); it used to read a key the trainer does not return,
    so a PRM stopped after 2 of 50 steps was recorded as trained and the study went on."""
    from rl import demo, prm_train

    class Stopped:
        def __init__(self, config, resume):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self):
            return {"step": 2, "stopped": True, "history": [], "eval": []}

    monkeypatch.setattr(prm_train, "PrmTrainer", Stopped)
    monkeypatch.setattr(study, "prm_train_config", lambda d, cfg, progress: type("C", (), {"run_dir": tmp_path})())
    with pytest.raises(demo._Interrupted, match="prm_train stopped by a signal after step 2"):
        study._prm_train(None, study.smoke_config(), None, None, False)


def test_a_resumed_phase_counts_the_time_of_every_run(tmp_path):
    """An interrupted phase keeps its time (and stays to do); when a later run finishes it,
    its seconds are the sum, so the table's wall times do not drop the runs before a resume."""
    d = study.StudyDir(tmp_path / "s", study.smoke_config())
    d.record_interrupted("seed0/cocte_sft", 100.0)
    d.record_interrupted("seed0/cocte_sft", 20.5)
    assert not d.done("seed0/cocte_sft")
    again = study.StudyDir(tmp_path / "s", study.smoke_config())  # a new process reads the marker
    again.record("seed0/cocte_sft", seconds=30.0, steps=300)
    rec = json.loads((tmp_path / "s" / "jaxsql_study.json").read_text())["phases"]["seed0/cocte_sft"]
    assert rec == {"done": True, "seconds": 150.5, "steps": 300, "partial_seconds": 120.5, "interrupted_runs": 2}
    again.record_interrupted("seed0/cocte_sft", 9.0)  # a finished phase is not reopened
    assert again.done("seed0/cocte_sft")


def _finished_phases(cfg) -> dict:
    """Marker records of every phase of every seed of `cfg`, with eval results."""
    r = {"ex_set": 0.25, "ex_bag": 0.25, "error_rate": 0.5, "qatch": 0.4}
    phases = {}
    for s in cfg.seeds:
        for p in study._seed_phases(cfg):
            phases[f"seed{s}/{p}"] = {"done": True, "seconds": 1.0}
        phases[f"seed{s}/eval"]["results"] = {name: {"greedy": r} for name, _, _ in study.policies(cfg)}
    return phases


def test_processes_share_one_study_directory(tmp_path):
    """Two processes on one directory: records merge (neither loses the other's), a seed locked by
    another process is not taken, and the table is (re)written for exactly the configured seeds."""
    import subprocess
    import sys

    cfg = dataclasses.replace(study.smoke_config(seeds=(0, 1)), arms=("answers",), selectors=("greedy",))
    run = tmp_path / "run"
    a, b = study.StudyDir(run, cfg), study.StudyDir(run, cfg)  # both read the fresh marker
    a.record("seed0/base", seconds=1.0)
    b.record("seed1/base", seconds=2.0)  # b never saw a's record: merged, not overwritten
    on_disk = json.loads((run / study.MARKER).read_text())["phases"]
    assert on_disk["seed0/base"]["done"] and on_disk["seed1/base"]["done"]
    a.refresh()
    assert a.done("seed1/base")

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(run / "seed1.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert b.take_seed(1, wait=False) is None  # the other process runs seed 1
        mine = a.take_seed(0, wait=False)
        assert mine is not None and b.take_seed(0, wait=False) is None  # one holder per seed, in-process too
        mine.close()
    finally:
        holder.kill()
        holder.wait()
    again = b.take_seed(1, wait=False)  # released when its process ended
    assert again is not None
    again.close()

    # every phase done, the table written for seed 0 only: a run with seeds 0 and 1 writes it again
    state = json.loads((run / study.MARKER).read_text())
    state["phases"] = {**_finished_phases(cfg), "report": {"done": True, "seeds": [0]}}
    (run / study.MARKER).write_text(json.dumps(state))
    said = []
    study.run_study(run, cfg, say=said.append, progress=False)
    assert json.loads((run / study.MARKER).read_text())["phases"]["report"]["seeds"] == [0, 1]
    assert "| answers |" in (run / "study.md").read_text() and not any(x.startswith("== ") for x in said)
    said.clear()
    study.run_study(run, cfg, say=said.append, progress=False)
    assert said and "already complete" in said[0]


@pytest.mark.slow
def test_smoke_study_end_to_end_with_resume(tmp_path, capsys):
    """Every phase of every arm on real components (sandbox, SFT, PRM labels and training, GRPO,
    `jaxsql eval`); stopped after the CoCTE cold start and resumed; a third run does nothing."""
    from jaxsql.metrics import read_metrics

    cfg = study.smoke_config()
    out = tmp_path / "study"
    lines: list[str] = []
    state = study.run_study(out, cfg, say=lines.append, progress=False, stop_after="seed0/cocte_sft")
    assert sorted(state["phases"]) == ["seed0/base", "seed0/cocte_data", "seed0/cocte_sft"]
    base_seconds = state["phases"]["seed0/base"]["seconds"]
    assert cli_main(["study", "--out", str(out), "--smoke", "--quiet"]) == 0
    printed = capsys.readouterr().out
    marker = json.loads((out / study.MARKER).read_text())
    assert marker["phases"]["seed0/base"]["seconds"] == base_seconds  # not redone
    assert marker["phases"]["report"]["done"]
    for name, folder, fmt in study.policies(cfg):
        assert f"{name}: dev EX (set, greedy)" in printed
        assert (out / "seed0" / "checkpoints" / folder / "hf" / "config.json").is_file()
        for select in (s for s in cfg.selectors if study.applies(s, fmt)):
            m = json.loads((out / "seed0" / "eval" / name / select / "metrics.json").read_text())
            assert m["summary"]["n"] == cfg.n_dev
            got = marker["phases"]["seed0/eval"]["results"][name][select]
            assert 0.0 <= got["ex_set"] <= 1.0 and got["ex_set"] == m["summary"]["ex_set"]
    # the Reward-SQL arm trains the CoCTE policy on CoCTE prompts; the others the plain one
    seed_dir = study.demo.DemoDir(out / "seed0", cfg.demo_config(0))
    assert study.arm_config(seed_dir, cfg, "rewardsql").data.prompt_format == "cocte"
    assert study.arm_config(seed_dir, cfg, "dense_batch").data.prompt_format == "plain"
    assert study.arm_config(seed_dir, cfg, "dense_batch").algo.advantage == "batch"
    # the multi-turn arm: the tool SFT start, GRPO on multi-turn rollouts, evaluated through the loop
    multi = study.arm_config(seed_dir, cfg, "multiturn")
    assert multi.rollout.mode == "multi_turn" and multi.data.prompt_format == "tool"
    assert marker["phases"]["seed0/tool_data"]["written"] > 0
    for name in ("tool_sft", "multiturn"):
        m = json.loads((out / "seed0" / "eval" / name / "greedy" / "metrics.json").read_text())
        assert "tool/used_share" in m["summary"] and m["config"]["multi_turn"]
    assert not (out / "seed0" / "eval" / "multiturn" / "prm-best-of-n").exists()
    assert any("tool/used_share" in r for r in read_metrics(out / "seed0" / "metrics.jsonl", "arm_multiturn"))
    assert not (out / "seed0" / "eval" / "answers" / "prm-best-of-n").exists()  # a plain-SQL policy
    assert (out / "seed0" / "eval" / "rewardsql" / "prm-best-of-n" / "metrics.json").is_file()
    table = (out / "study.md").read_text()
    assert all(f"| {a} |" in table for a in cfg.arms) and (out / "study.png").is_file()
    assert marker["phases"]["seed0/prm_train"]["step"] == 2
    arm_rows = read_metrics(out / "seed0" / "metrics.jsonl", "arm_rewardsql")
    assert arm_rows and all("reward/process_mean" in r and "time/prm_s" in r for r in arm_rows)
    assert not any("reward/process_mean" in r for r in read_metrics(out / "seed0" / "metrics.jsonl", "arm_answers"))
    assert cli_main(["study", "--out", str(out), "--smoke"]) == 0
    assert "already complete" in capsys.readouterr().err
