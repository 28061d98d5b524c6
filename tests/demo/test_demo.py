"""The demo pipeline end to end on real components, its resume logic and its refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

import jaxsql.rewards
from data.records import Example
from jaxsql.cli import main as cli_main
from jaxsql.errors import JaxsqlError
from jaxsql.metrics import MetricsWriter
from rl import demo
from rl.evaluate import summarise

_BASE = demo.smoke_config(seed=0, minutes=30.0)
SMOKE = dataclasses.replace(_BASE, sft_overrides=_BASE.sft_overrides + ("steps=4", "checkpoint.every_steps=2"))
# the smoke run's SFT and GRPO settings (its recipes with the overrides above)
SFT_STEPS, RL_STEPS, RL_PROMPTS, RL_GENERATIONS = 4, 2, 2, 2


# --- refusals ----------------------------------------------------------------------------------


def test_refuses_a_foreign_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    with pytest.raises(JaxsqlError, match="not a jaxsql demo directory"):
        demo.run_demo(out, SMOKE)
    assert cli_main(["demo", "--out", str(out), "--smoke"]) == 1
    assert "not a jaxsql demo directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "my thesis"


def test_refuses_a_file_and_other_settings(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(JaxsqlError, match="not a directory"):
        demo.run_demo(f, SMOKE)
    out = tmp_path / "run"
    demo.DemoDir(out, SMOKE)  # claims the directory (writes the marker)
    with pytest.raises(JaxsqlError, match="different settings .*seed"):
        demo.DemoDir(out, dataclasses.replace(SMOKE, seed=1))
    # the budget is not part of a run's identity
    demo.DemoDir(out, dataclasses.replace(SMOKE, minutes=99.0))


def test_cli_rejects_bad_minutes(tmp_path):
    assert cli_main(["demo", "--out", str(tmp_path / "x"), "--minutes", "0"]) == 2
    assert not (tmp_path / "x").exists()


# --- pure pieces -------------------------------------------------------------------------------


def test_weak_supervision_drops_gold_sql():
    ex = Example(id="a", db_path="x.sqlite", question="q", gold_sql="SELECT 1", gold_answers=("1",))
    (weak,) = demo.weak_supervision([ex])
    assert weak.gold_sql is None and weak.gold_answers == ("1",) and ex.gold_sql == "SELECT 1"
    with pytest.raises(JaxsqlError, match="gold_answers"):
        demo.weak_supervision([dataclasses.replace(ex, gold_answers=None)])


def test_summarise_by_hand():
    rows = [{"ex_set": True, "ex_bag": False, "executed": True, "cell_precision": 1.0, "cell_recall": 0.5,
             "tuple_cardinality": 0.5, "denotation_exact": None},
            {"ex_set": False, "ex_bag": False, "executed": False, "cell_precision": 0.0, "cell_recall": 0.0,
             "tuple_cardinality": 0.0, "denotation_exact": None}]
    s = summarise(rows)
    assert s["ex_set"] == 0.5 and s["ex_bag"] == 0.0 and s["error_rate"] == 0.5
    assert s["qatch"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    assert "denotation_exact" not in s


# --- end to end with resume ----------------------------------------------------------------------


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A smoke run killed mid-SFT, resumed to the end of SFT, then resumed to the end."""
    out = tmp_path_factory.mktemp("demo") / "out"
    log: list[str] = []
    calls: list[list[Example]] = []
    real_score = jaxsql.rewards.score_batch
    real_write = MetricsWriter.write

    def spy_score(pool, completions, examples, config, **kw):  # kw: sqls / episodes of multi-turn draws
        calls.append(list(examples))
        return real_score(pool, completions, examples, config, **kw)

    def dying_write(self, step, metrics, phase=None):
        real_write(self, step, metrics, phase=phase)
        if phase == "sft" and step == 3:
            raise _Killed  # after the checkpoint of step 2, before the one of step 4

    mp = pytest.MonkeyPatch()
    mp.setattr(MetricsWriter, "write", dying_write)
    with pytest.raises(_Killed):
        demo.run_demo(out, SMOKE, say=log.append, progress=False)
    mp.setattr(MetricsWriter, "write", real_write)
    first = json.loads((out / demo.MARKER).read_text())
    demo.run_demo(out, SMOKE, say=log.append, progress=False, stop_after="sft")
    after_sft = json.loads((out / demo.MARKER).read_text())
    mp.setattr(jaxsql.rewards, "score_batch", spy_score)
    try:
        state = demo.run_demo(out, SMOKE, say=log.append, progress=False)
    finally:
        mp.undo()
    return {"out": out, "log": log, "first": first, "after_sft": after_sft, "state": state, "calls": calls}


@pytest.mark.slow
def test_killed_phase_resumes_from_its_checkpoint(demo_run):
    assert list(demo_run["first"]["phases"]) == ["data"]
    assert "sft: resuming from checkpoint step 2" in demo_run["log"]
    assert demo_run["after_sft"]["phases"]["sft"]["steps"] == SFT_STEPS
    assert "eval_sft" not in demo_run["after_sft"]["phases"]
    text = "\n".join(demo_run["log"])
    assert "at phase 'sft'" in text  # the killed phase
    assert "at phase 'eval_sft'" in text  # the phase after the one that completed
    steps = [r["step"] for r in demo.DemoDir(demo_run["out"], SMOKE).read_metrics("sft")]
    # steps 1-3 logged before the kill, 3-4 after resuming from step 2: nothing before 2 was redone
    assert steps == [1, 2, 3, 3, 4]


@pytest.mark.slow
def test_outputs_exist_and_load(demo_run):
    out = demo_run["out"]
    for rel in ("metrics.jsonl", "report.md", "plot.png", "hf_export/config.json",
                "hf_export/model.safetensors.index.json", "eval_sft.json", "eval_rl.json"):
        assert (out / rel).is_file(), rel
    assert (out / "checkpoints" / "rl" / "checkpoints").is_dir()
    assert (out / "hf_export" / "tokenizer.json").is_file()
    assert list(out.glob("tensorboard/events.out.tfevents.*"))
    phases = demo_run["state"]["phases"]
    assert all(phases[p]["done"] for p in demo.PHASES)
    assert phases["rl"]["steps"] == RL_STEPS
    assert "loads hf_export" in phases["export"]["hf_check"]
    assert phases["export"]["max_logit_diff"] < 1e-4
    report = (out / "report.md").read_text()
    assert "| EX (set semantics) |" in report and "Peak resident memory" in report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"sft", "rl", "eval"}
    assert all("reward/mean" in r for r in rows if r["phase"] == "rl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "hf_export")
    assert len(AutoTokenizer.from_pretrained(out / "hf_export")) == phases["data"]["vocab"]


@pytest.mark.slow
def test_reward_never_sees_gold_sql(demo_run):
    rl_calls = [c for c in demo_run["calls"] if any(e.gold_sql is None for e in c)]
    assert len(rl_calls) == RL_STEPS
    for c in rl_calls:
        assert len(c) == RL_PROMPTS * RL_GENERATIONS
        assert all(e.gold_sql is None and e.gold_answers for e in c)


@pytest.mark.slow
def test_rerun_on_a_complete_directory_does_nothing(demo_run):
    out = demo_run["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    log: list[str] = []
    demo.run_demo(out, SMOKE, say=log.append, progress=False)
    assert any("already complete" in line for line in log)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_report_names_the_cap_when_it_bites(tmp_path):
    from rl.demo_report import write_report

    settings = {"seed": 0, "n_train": 10, "n_dev": 5, "minutes": 30.0, "sft_batch": 32, "sft_examples": 10,
                "sft_lr": 2e-3, "rl_questions": "new_databases", "rl_prompts": 16, "rl_generations": 8,
                "rl_temperature": 1.0, "rl_lr": 1e-4, "rl_eps_low": 0.2, "rl_eps_high": 0.28, "rl_beta": 0.0,
                "rl_loss_agg": "token_mean", "rl_advantage": "grpo", "rl_dynamic_sampling": True,
                "reward": (1.0, 0.0, 0.0), "hidden_size": 192, "num_layers": 3, "num_heads": 4,
                "num_kv_heads": 2, "prompt_len": 128, "max_new_tokens": 40}
    phases = {"sft": {"steps": 110, "of_steps": 110, "stopped_early": False, "seconds": 50.0},
              "rl": {"steps": 150, "of_steps": 200, "stopped_early": True, "seconds": 900.0},
              "eval_sft": {"summary": {"ex_set": 0.19}}, "eval_rl": {"summary": {"ex_set": 0.3}}}
    text = write_report(tmp_path / "report.md", settings, phases, 950.0, 2**31, demo.PHASES).read_text()
    assert "| EX (set semantics) | 19.0% | 30.0% | +11.0 pts |" in text
    assert text.count("cut by the time cap") == 1 and "(`--minutes 30`) at step 150 of 200" in text
