"""``jaxsql eval --model``: one code path with `rl.evaluate.evaluate`, selection strategies, resume, the demo."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jaxsql.cli import main
from jaxsql.errors import JaxsqlError
from jaxsql.sql import ExecResult, SqlPool
from rl.evaluate import SELECTORS, Candidate, choose_by_vote, evaluate, get_selector
from tests.rl.conftest import build_env

GEN = ["--max-new-tokens", "8", "--max-prompt-len", "64", "--batch-size", "6", "--devices", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("eval_env"), n_train=16)


def run(capsys, *argv):
    code = main(["eval", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def test_cli_equals_evaluate(capsys, tmp_path, env):
    from jaxsql.cli.model_cmds import load_tokenizer
    from models.hf_io import load_hf_checkpoint

    run(capsys, "--model", env["model"], "--data", f"synthetic:{env['synthetic']}:dev", "--out", tmp_path / "o", *GEN)
    cli = rows(tmp_path / "o")
    cfg, params = load_hf_checkpoint(env["model"])
    tok = load_tokenizer(env["model"], cfg.vocab_size)
    with SqlPool(2, timeout_s=30.0) as pool:
        direct = evaluate(params, cfg, tok, env["bench"].dev, pool, max_new_tokens=8, max_prompt_len=64,
                          batch_size=6)
    assert [r["id"] for r in cli] == [e.id for e in env["bench"].dev]
    assert cli == [json.loads(json.dumps(r)) for r in direct.rows]
    summary = json.loads((tmp_path / "o" / "metrics.json").read_text())["summary"]
    assert summary == pytest.approx(direct.summary)
    for key in ("ex_set", "ex_bag", "error_rate", "qatch", "bird_ex", "spider_ex", "wikitq_accuracy"):
        assert key in summary  # the demo report reads the first four


def test_resume_generates_only_what_is_missing(capsys, tmp_path, env, monkeypatch):
    import models.sampler

    args = ("--model", env["model"], "--data", f"synthetic:{env['synthetic']}:dev", "--out", tmp_path / "o", *GEN)
    run(capsys, *args)
    first = rows(tmp_path / "o")
    n = len(first)
    assert n == 16  # chunks of 6: [0-5], [6-11], [12-15]
    lines = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    (tmp_path / "o" / "results.jsonl").write_text("\n".join(lines[:8]) + "\n" + lines[8][:20])
    calls = []
    real = models.sampler.generate

    def counting(params, cfg, prompts, **kw):
        calls.append(len(prompts))
        return real(params, cfg, prompts, **kw)

    monkeypatch.setattr(models.sampler, "generate", counting)
    run(capsys, *args)
    assert calls == [6, 6]  # chunk 0 was complete; chunks 1 and 2 had missing examples
    assert rows(tmp_path / "o") == first


def test_vote_selection(capsys, tmp_path, env):
    args = ("--model", env["model"], "--data", f"synthetic:{env['synthetic']}:dev", *GEN, "--select", "vote",
            "--n", "3", "--temperature", "1.5", "--seed", "7")
    run(capsys, *args, "--out", tmp_path / "a")
    run(capsys, *args, "--out", tmp_path / "b")
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert a == b  # seeded per chunk: the same samples and the same choices
    assert all(r["samples"] == 3 and 0 <= r["selected"] < 3 and 0 <= r["votes"] <= 3 for r in a)
    assert all(r["votes"] >= 1 for r in a if r["executed"])
    config = json.loads((tmp_path / "a" / "eval_config.json").read_text())
    assert config["select"] == "vote" and config["n"] == 3 and config["temperature"] == 1.5


def _ok(*rows_):
    return ExecResult(ok=True, columns=("a",), rows=tuple(rows_))


def test_choose_by_vote():
    fail = ExecResult.failure("syntax", "x")
    cands = [Candidate("c0", "s0", -1.0, _ok((1,))), Candidate("c1", "s1", -3.0, _ok((2,))),
             Candidate("c2", "s2", -2.0, _ok((2,))), Candidate("c3", "s3", -0.1, fail)]
    assert choose_by_vote(cands) == 2  # the result two samples agree on; its likelier sample
    tie = [Candidate("c0", "s0", -2.0, _ok((1,))), Candidate("c1", "s1", -1.0, _ok((2.0,))),
           Candidate("c2", "s2", -0.5, fail)]
    assert choose_by_vote(tie) == 1  # one vote each: the better mean log-prob wins (2.0 agrees with 2)
    assert choose_by_vote([Candidate("c0", "s0", -2.0, fail), Candidate("c1", "s1", -1.0, fail)]) == 1
    assert choose_by_vote([Candidate("a", "x", -1.0, _ok((1, "a"), (1, "a"))),
                           Candidate("b", "y", -9.0, _ok((1.0, "a"), (1, "a"))),
                           Candidate("c", "z", -0.5, _ok((1, "a")))]) == 0  # bags: duplicates count


def test_selector_registry():
    assert set(SELECTORS) == {"greedy", "vote", "prm-best-of-n", "prm-beam"}
    from jaxsql.cli.eval_cmds import AGGREGATE_CHOICES, SELECT_CHOICES
    from rl.prm_score import AGGREGATIONS

    assert set(SELECT_CHOICES) == set(SELECTORS) and set(AGGREGATE_CHOICES) == set(AGGREGATIONS)
    with pytest.raises(JaxsqlError, match="unknown selection strategy 'prm-best-of-k'"):
        get_selector("prm-best-of-k")


@pytest.mark.slow
def test_eval_reproduces_the_demo(capsys, tmp_path):
    """``jaxsql eval --model`` on the smoke demo's export equals the demo's own evaluation."""
    from rl import demo

    config = dataclasses.replace(demo.smoke_config(seed=0, minutes=30.0))
    out = tmp_path / "demo"
    demo.run_demo(out, config, say=lambda s: None, progress=False)
    reported = json.loads((out / "eval_rl.json").read_text())
    # The demo evaluates with its GRPO recipe's lengths (prompt and completion).
    from jaxsql.config import load_config
    from rl.config import TrainConfig

    rl_cfg = load_config(TrainConfig, demo.recipe_path(config.rl_recipe), list(config.rl_overrides))
    max_new_tokens, prompt_len = rl_cfg.sampling.max_new_tokens, rl_cfg.data.max_prompt_len
    run(capsys, "--model", out / "hf_export", "--data", f"synthetic:{out / 'data'}:dev", "--out", tmp_path / "o",
        "--max-new-tokens", max_new_tokens, "--max-prompt-len", prompt_len,
        "--batch-size", config.eval_batch, "--devices", "1")
    summary = json.loads((tmp_path / "o" / "metrics.json").read_text())["summary"]
    assert summary == reported["summary"]
    assert [r["completion"] for r in rows(tmp_path / "o")] == [r["completion"] for r in reported["rows"]]
