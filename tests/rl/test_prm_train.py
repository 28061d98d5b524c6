"""PRM training through the shared loop: the registered loss, the held-out split, the trainer
(learning, resume, export in the head's format), bad input, and the end-to-end synthetic run."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsql.cli import main
from jaxsql.cocte import STEP_TAG, prm_segments
from rl.losses import LOSSES, LossContext
from rl.prm import (LabelRecord, PrmLossConfig, StepLabel, assemble, encode_row, flat_batch, prm_loss,
                    read_label_file)
from rl.prm_train import split_heldout


def _records(bench, n: int) -> list[LabelRecord]:
    """Two trajectories per question: a chain that runs (labels 1) and one whose first step
    fails (labels 0), each with its rendered result, as `jaxsql prm label` writes them."""
    out = []
    for ex in bench.train[:n]:
        good = [StepLabel(f"WITH step1 AS ({ex.gold_sql}),", "cte", True, "{(1,): 1}", 1.0, 0.75, 3, 4),
                StepLabel("SELECT * FROM step1", "final", True, "{(1,): 1}", 1.0, 1.0)]
        bad = [StepLabel("WITH step1 AS (SELECT nope FROM missing),", "cte", False,
                         "Execution error: no such table: missing", 0.0, 0.0),
               StepLabel("SELECT * FROM step1", "final", False, "Execution error: no such table: missing", 0.0, 0.0)]
        for i, steps in enumerate((good, bad)):
            out.append(LabelRecord(ex, i, "\n\n".join(s.text for s in steps), i == 0, tuple(steps)))
    return out


def _write(records, path: Path) -> Path:
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def label_file(tiny_env, tmp_path_factory):
    return _write(_records(tiny_env["bench"], 24), tmp_path_factory.mktemp("prm_labels") / "labels.jsonl")


def _overrides(env, run_dir, labels, **extra) -> list[str]:
    base = {"run_dir": str(run_dir), "model.path": env["model"], "data.labels": str(labels),
            "data.heldout_fraction": 0.25, "data.batch_size": 8, "data.max_prompt_len": 48, "prm.max_len": 400,
            "optim.learning_rate": 3e-3, "steps": 4, "progress": False, "tensorboard": False,
            "checkpoint.async_save": False, "mesh.data": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _config(env, run_dir, labels, **extra):
    from rl.config import load_prm_train_config

    return load_prm_train_config(None, _overrides(env, run_dir, labels, **extra))


# --- the registered loss ----------------------------------------------------------------------


@pytest.mark.parametrize("head", ["lm", "value"])
def test_registered_prm_bce_equals_prm_loss(tiny_env, label_file, head):
    from models.hf_io import load_hf_checkpoint
    from models.prm import value_head_from_lm
    from rl.setup import load_tokenizer
    from rl.config import ModelSection

    cfg, params = load_hf_checkpoint(tiny_env["model"])
    tok = load_tokenizer(ModelSection(path=tiny_env["model"]))
    cands = (5, 9)
    if head == "value":
        cfg, params = value_head_from_lm(params, cfg, cands)
        params["score"]["bias"] = params["score"]["bias"] + 0.3
    recs = read_label_file(label_file)[:6]
    rows = [encode_row(tok, tok("question", add_special_tokens=False)["input_ids"],
                       prm_segments([s.text for s in r.steps], [s.result for s in r.steps], STEP_TAG), max_len=200)
            for r in recs]
    batch = assemble(rows, [r.labels("soft") for r in recs], pad_id=0)
    want = prm_loss(params, batch, model_cfg=cfg, head=head, candidates=cands)
    got = LOSSES["prm_bce"](params, flat_batch(batch), LossContext(cfg, settings=PrmLossConfig(head, cands)))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    assert float(got[1]) == float(want[1]) == sum(len(r.steps) for r in recs)
    assert float(got[2]["tokens"]) == float(want[2]["steps"])
    for k in ("agree", "score", "label"):
        np.testing.assert_allclose(float(got[2][k]), float(want[2][k]), rtol=1e-5)


def test_split_heldout_by_question(tiny_env):
    recs = _records(tiny_env["bench"], 10)
    train, held = split_heldout(recs, 0.25, seed=0)
    assert len({r.example.id for r in held}) == 3 and len(train) + len(held) == len(recs)
    assert not {r.example.id for r in train} & {r.example.id for r in held}  # a question on one side only
    assert split_heldout(recs, 0.25, seed=0) == (train, held)
    assert split_heldout(recs, 0.25, seed=1) != (train, held)
    assert split_heldout(recs, 0.0, seed=0) == (recs, [])
    assert len({r.example.id for r in split_heldout(recs, 0.99, seed=0)[0]}) == 1  # one question stays


# --- the trainer ----------------------------------------------------------------------------------


def test_prm_trainer_learns_resumes_and_exports(tiny_env, label_file, tmp_path):
    from models.prm import load_prm
    from rl.prm_train import PrmTrainer

    run = tmp_path / "run"
    cfg = _config(tiny_env, run, label_file, steps=12, eval_every=6, **{"checkpoint.every_steps": 4})
    with PrmTrainer(cfg) as t:
        out = t.run(until=8)  # a partial session ends with a checkpoint
    assert out["step"] == 8 and [e["step"] for e in out["eval"]] == [0, 6, 8]
    first = out["eval"][0]
    assert first["eval/steps"] == 6 * 2 * 2  # 6 held-out questions x 2 trajectories x 2 steps
    with PrmTrainer(cfg, resume=True) as t:
        assert t.start_step == 8
        out2 = t.run()
        params = jax.device_get(t.state["params"])
    assert out2["step"] == 12 and [e["step"] for e in out2["eval"]] == [12]
    last = out2["eval"][-1]
    assert last["eval/bce"] < first["eval/bce"] - 0.1 and last["eval/auc"] > 0.9, (first, last)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if r.get("phase") == "eval"} == {0, 6, 8, 12}
    prm = load_prm(run / "hf", head="lm")  # the export is an lm PRM directory with its sidecar
    assert (run / "hf" / "jaxsql_prm.json").is_file()
    np.testing.assert_allclose(np.asarray(prm.params["final_norm"]), np.asarray(params["final_norm"]), rtol=1e-6)
    # `jaxsql export` of a PRM checkpoint writes the same PRM directory
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")]) == 0
    again = load_prm(tmp_path / "exp", head="lm")
    np.testing.assert_array_equal(np.asarray(again.params["embed"]), np.asarray(prm.params["embed"]))


def test_prm_trainer_sigterm_saves_and_resumes(tiny_env, label_file, tmp_path):
    """SIGTERM in the middle of a step: the step finishes, a checkpoint is saved, the signal
    handler is restored, and --resume finishes the run (with the final held-out evaluation)."""
    import signal

    from rl.prm_train import PrmTrainer

    cfg = _config(tiny_env, tmp_path / "run", label_file, steps=4, **{"checkpoint.every_steps": 0})
    before = signal.getsignal(signal.SIGTERM)
    with PrmTrainer(cfg) as t:
        step = t.step

        def step_and_preempt(i):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(i)

        t.step = step_and_preempt
        out = t.run()
    assert out["stopped"] and out["step"] == 2 and signal.getsignal(signal.SIGTERM) is before
    assert [e["step"] for e in out["eval"]] == [0]  # no evaluation on the way out
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert not (tmp_path / "run" / "hf").exists()  # no export before the last step
    with PrmTrainer(cfg, resume=True) as t:
        out = t.run()
    assert out["step"] == 4 and [e["step"] for e in out["eval"]] == [4] and (tmp_path / "run" / "hf").is_dir()


def test_prm_train_cli_value_head(tiny_env, label_file, tmp_path, capsys):
    """A value head converted from the policy, sharded over all 8 simulated devices, exported as
    token classification; the export trains on as it is."""
    from transformers import AutoModelForTokenClassification

    run = tmp_path / "value"
    assert main(["prm", "train", "--config", str(_empty(tmp_path)),
                 *_overrides(tiny_env, run, label_file, **{"prm.head": "value", "steps": 2, "mesh.data": -1})]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2 and out["eval_first"]["step"] == 0 and out["eval_last"]["step"] == 2
    assert json.loads((run / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForTokenClassification"]
    assert AutoModelForTokenClassification.from_pretrained(run / "hf").config.num_labels == 1
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    from models.prm import load_prm
    a, b = load_prm(run / "hf", head="value"), load_prm(tmp_path / "exp", head="value")
    np.testing.assert_array_equal(np.asarray(a.params["score"]["kernel"]), np.asarray(b.params["score"]["kernel"]))
    # the exported value PRM trains on as it is
    assert main(["prm", "train", "--config", str(_empty(tmp_path)),
                 *_overrides(tiny_env, tmp_path / "again", label_file,
                             **{"prm.head": "value", "steps": 1, "model.path": run / "hf"})]) == 0
    capsys.readouterr()


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return p


# --- bad input ----------------------------------------------------------------------------------


def test_prm_train_bad_input_is_one_line(tiny_env, label_file, tmp_path, capsys):
    cfg = str(_empty(tmp_path))

    def err(code=1, **extra) -> str:
        assert main(["prm", "train", "--config", cfg, *_overrides(tiny_env, tmp_path / "r", label_file, **extra)]) == code
        e = capsys.readouterr().err.strip()
        assert e.startswith("error:") and "\n" not in e and "Traceback" not in e, e
        return e

    bad = tmp_path / "bad.jsonl"
    lines = label_file.read_text().splitlines()
    d = json.loads(lines[1])
    del d["steps"][0]["soft"]
    bad.write_text(lines[0] + "\n" + json.dumps(d) + "\n")
    assert "bad.jsonl:2: steps[0] is missing field(s) ['soft']" in err(**{"data.labels": bad})
    assert "label file not found" in err(**{"data.labels": tmp_path / "none.jsonl"})
    assert "PrmSection.label_kind" in err(2, **{"prm.label_kind": "mc"})
    assert "PrmDataSection.heldout_fraction" in err(2, **{"data.heldout_fraction": 1.0})
    assert "more than the" in err(**{"data.batch_size": 1000})
    # a value-head PRM directory trained as lm
    assert main(["prm", "init", "--policy", tiny_env["model"], "--out", str(tmp_path / "v"), "--head", "value"]) == 0
    capsys.readouterr()
    assert "holds a 'value'-head PRM but prm.head is 'lm'" in err(**{"model.path": tmp_path / "v"})
    # a PRM whose tokenizer is not the labelling policy's
    other = tmp_path / "other"
    assert main(["model", "init", "--preset", "tiny", "--out", str(other), "--test-tokenizer"]) == 0
    capsys.readouterr()
    meta = Path(str(label_file) + ".meta.json")
    labels2 = tmp_path / "l2.jsonl"
    labels2.write_text(label_file.read_text())
    Path(str(labels2) + ".meta.json").write_text(json.dumps({"policy": tiny_env["model"]}))
    assert "whose tokenizer differs from the PRM's" in err(**{"data.labels": labels2, "model.path": other})
    assert not meta.exists()


# --- end to end on the synthetic benchmark ----------------------------------------------------------


def _tiny_cocte_policy_init(root: Path, n_train: int, hidden: int) -> tuple[str, str]:
    """The synthetic benchmark with CoCTE targets, a BPE tokenizer trained on its CoCTE prompts and
    targets, and a random decoder (`data synth --cocte` is the CLI; the rest is what the docs paste)."""
    from data.prompts import render_prompt
    from data.readers import read_examples
    from data.tokenizer import train_tokenizer
    from models.testing import save_random_checkpoint
    from rl.rollout import PromptEncoder

    assert main(["data", "synth", "--out", str(root / "syn"), "--cocte", "--n-train", str(n_train), "--n-dev", "20",
                 "--max-level", "1"]) == 0
    exs = read_examples("jsonl", root / "syn" / "train.cocte.jsonl")
    enc = PromptEncoder(None, "cocte")
    texts = [t for ex in exs for t in (render_prompt(ex, enc.schema(ex.db_path), "cocte"), ex.gold_sql)]
    tok = train_tokenizer(texts * 2, vocab_size=800, out_dir=root / "tok")
    save_random_checkpoint(root / "init", "tiny", seed=0, tokenizer_dir=root / "tok", vocab_size=len(tok),
                           hidden_size=hidden, intermediate_size=2 * hidden, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=hidden // 4, bos_token_id=tok.bos_token_id,
                           eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    return str(root / "syn"), str(root / "init")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 12 minutes on 2 loaded cores (SFT is most of it)
def test_end_to_end_cocte_sft_labels_prm(tmp_path, capsys):
    """CoCTE SFT data -> CoCTE SFT policy (`jaxsql sft`) -> step labels (`jaxsql prm label`) ->
    `jaxsql prm train`: held-out BCE falls and held-out step AUC beats 0.5 (docs/rewardsql.md has
    the same pipeline as commands, with figures at a larger size)."""
    syn, init = _tiny_cocte_policy_init(tmp_path, 300, 128)
    cfg = str(_empty(tmp_path))
    capsys.readouterr()
    common = ["mesh.data=1", "checkpoint.every_steps=0", "checkpoint.async_save=false", "progress=false",
              "tensorboard=false"]
    assert main(["sft", "--config", cfg, f"run_dir={tmp_path / 'sft'}", f"model.path={init}", "data.source=jsonl",
                 f"data.path={syn}/train.cocte.jsonl", "data.prompt_format=cocte", "data.batch_size=16",
                 "data.max_prompt_len=256", "data.max_target_len=96", "optim.learning_rate=3e-3",
                 "optim.warmup_steps=10", "optim.schedule=cosine", "optim.final_lr_ratio=0.1", "steps=300",
                 *common]) == 0
    capsys.readouterr()
    labels = tmp_path / "labels.jsonl"
    assert main(["prm", "label", "--policy", str(tmp_path / "sft" / "hf"), "--data", f"synthetic:{syn}:train",
                 "--k", "4", "--trajectories", "4", "--limit", "32", "--max-new-tokens", "96", "--temperature", "0.7",
                 "--batch-size", "8", "--max-prompt-len", "256", "--max-vm-steps", "100000", "--out", str(labels),
                 "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert 0 < stats["positive_steps"] < stats["steps"], stats  # both classes: the policy is neither hopeless nor perfect
    assert main(["prm", "train", "--config", cfg, f"run_dir={tmp_path / 'prm'}", f"model.path={tmp_path / 'sft' / 'hf'}",
                 f"data.labels={labels}", "data.heldout_fraction=0.25", "data.batch_size=8", "data.max_prompt_len=256",
                 "prm.label_kind=hard", "prm.max_len=512", "optim.learning_rate=1e-4", "steps=30", "eval_every=10",
                 *common]) == 0
    out = json.loads(capsys.readouterr().out)
    first, last = out["eval_first"], out["eval_last"]
    print(f"\nPRM end to end: labels {stats}; held-out first {first}; last {last}")
    assert last["eval/steps"] >= 40
    # measured (seed 0): BCE 0.705 -> 0.655 and 0.697 -> 0.683 in two environments, AUC 0.63 at the end
    assert last["eval/bce"] < first["eval/bce"], (first, last)
    assert last["eval/auc"] > 0.56, (first, last)
