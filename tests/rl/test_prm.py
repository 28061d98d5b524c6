"""PRM pieces of the learning room: BCE loss, batch assembly, step labels, trajectory scores, the CLI."""

import json
import math
import sqlite3

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.records import Example, MalformedRecord
from jaxsql.cli import main
from jaxsql.cocte import STEP_TAG, prm_segments
from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.sql import SqlPool
from rl.prm import (PrmBatch, assemble, binary_auc, encode_row, prm_loss, read_label_file, record_from_json,
                    step_bce)
from rl.prm_label import LabelSettings, label_completions, run_labeling
from rl.prm_score import aggregate, entropy_weighted_score, step_mean_entropies

# --- loss -----------------------------------------------------------------------------------


def test_step_bce_golden():
    z = jnp.array([[0.0, 2.0, -1.0], [-3.0, 0.5, 9.0]])
    y = jnp.array([[1.0, 0.0, 0.5], [0.0, 0.25, 1.0]])
    w = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss_sum, denom, m = step_bce(z, y, w)
    # softplus(z) - y z: log 2; log(1 + e^2); log(1 + e^-3); log(1 + e^0.5) - 0.125
    # = 0.6931472 + 2.1269280 + 0.0485874 + 0.8490770
    assert abs(float(loss_sum) - 3.7177396) < 1e-5 and float(denom) == 4.0
    assert float(m["agree"]) == 1.0  # only z=-3 (score 0.047) and y=0 fall on the same side of 0.5
    assert abs(float(m["score"]) - (0.5 + 0.8807971 + 0.0474259 + 0.6224593)) < 1e-5
    assert abs(float(m["label"]) - 1.25) < 1e-6
    # large logits stay finite
    big, _, _ = step_bce(jnp.array([[80.0, -80.0]]), jnp.array([[0.0, 1.0]]), jnp.ones((1, 2)))
    assert abs(float(big) - 160.0) < 1e-3


def test_prm_loss_sums_over_micro_batches(tmp_path):
    from models.config import ModelConfig
    from models.model import init_params

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    params = init_params(cfg, jax.random.key(0), std=0.3)
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 64, (4, 16)).astype(np.int32)  # tokens 0-2 only as candidates or never
    mask = np.ones((4, 16), np.int32)
    mask[2, 12:] = 0
    positions = np.array([[3, 8, -1], [5, 15, -1], [4, 11, -1], [2, 6, 9]], np.int32)
    labels = rng.rand(4, 3).astype(np.float32)
    weights = np.ones((4, 3), np.float32)
    batch = PrmBatch(tokens, mask, positions, labels, weights)
    loss = jax.jit(prm_loss, static_argnames=("model_cfg", "head", "candidates"))
    full = loss(params, batch, model_cfg=cfg, head="lm", candidates=(0, 1))
    halves = [loss(params, PrmBatch(*(a[s] for a in batch)), model_cfg=cfg, head="lm", candidates=(0, 1))
              for s in (slice(0, 2), slice(2, 4))]
    assert float(full[1]) == 9.0  # padded positions (-1) carry no weight
    assert abs(float(full[0]) - sum(float(h[0]) for h in halves)) < 1e-4
    assert float(full[1]) == sum(float(h[1]) for h in halves)
    grads = jax.jit(jax.grad(lambda p: prm_loss(p, batch, model_cfg=cfg, head="lm", candidates=(0, 1))[0]))(params)
    assert float(jnp.abs(grads["embed"][0]).sum()) > 0 and float(jnp.abs(grads["embed"][2]).sum()) == 0


def test_binary_auc_golden():
    assert binary_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert binary_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert binary_auc([0.9, 0.1], [1, 0]) == 1.0
    assert math.isnan(binary_auc([0.3], [1]))


# --- rows -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from models.testing import save_test_tokenizer

    d = tmp_path_factory.mktemp("bytetok")
    save_test_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def test_encode_row_and_assemble_golden(byte_tokenizer):
    segs = prm_segments(["A", "BC"], ["{}", "x"], STEP_TAG)
    row = encode_row(byte_tokenizer, [1, 2, 3], segs, max_len=100)
    # byte tokens: "A<result>{}</result>" is 20 bytes, the tag " и" 3 bytes; " BC<result>x</result>" 21
    assert row.positions == (3 + 20 + 3 - 1, 3 + 20 + 3 + 21 + 3 - 1) and row.dropped == 0
    assert len(row.tokens) == 50
    assert byte_tokenizer.decode(row.tokens[3:]) == "A<result>{}</result> и BC<result>x</result> и"
    cut = encode_row(byte_tokenizer, [1, 2, 3], segs, max_len=30)
    assert cut.positions == (25,) and cut.dropped == 1 and len(cut.tokens) == 26
    batch = assemble([row, cut], [[1.0, 0.5], [0.0, 1.0]], pad_id=0, length_multiple=16)
    assert batch.tokens.shape == (2, 64) and batch.positions.shape == (2, 4)
    assert batch.positions.tolist() == [[25, 49, -1, -1], [25, -1, -1, -1]]
    assert batch.labels.tolist() == [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert batch.weights.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch.mask.sum(1).tolist() == [50, 26]


# --- labels -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "people.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, city TEXT)")
    con.executemany("INSERT INTO people VALUES (?, ?, ?, ?)",
                    [(1, "Ann", 30, "Paris"), (2, "Bob", 25, "Rome"), (3, "Cid", 35, "Paris"), (4, "Dee", 40, "Oslo")])
    con.commit()
    con.close()
    return str(path)


PARIS = "WITH a AS (SELECT * FROM people WHERE city = 'Paris'),"
OLD = "WITH a AS (SELECT * FROM people WHERE age > 26)"
#: Known continuations of each step prefix: the labels follow from them.
CONTINUATIONS = {
    PARIS: ["\n\nb AS (SELECT name FROM a)\n\nSELECT * FROM b",   # correct
            "\n\nb AS (SELECT age FROM a)\n\nSELECT * FROM b",    # wrong result
            "\n\nb AS (SELECT * FROM a)\n\nSELECT name FROM b",   # correct
            " garbage"],                                          # does not run
    PARIS + "\n\nb AS (SELECT name FROM a)": ["\n\nSELECT name FROM b", "\n\nSELECT * FROM b ORDER BY name",
                                              "\n\nSELECT name FROM b LIMIT 1", "\n\nSELECT name FROM b"],
    OLD: ["\n\nSELECT name FROM a", "\n\nSELECT name FROM a WHERE city = 'Paris'", "x", "y"],
}


def stub_sampler(calls):
    def sample(prompt_ids, prefixes, n, seed):
        calls.append((list(map(list, prompt_ids)), list(prefixes), n, seed))
        return [CONTINUATIONS[p][:n] for p in prefixes]

    return sample


def test_labels_on_known_continuations(people_db):
    ex = Example(id="q1", db_path=people_db, question="Who lives in Paris?",
                 gold_sql="SELECT name FROM people WHERE city = 'Paris'")
    completions = [PARIS + "\n\nb AS (SELECT name FROM a)\n\nSELECT name FROM b",
                   PARIS + "\n\nb AS (SELECT nme FROM a)\n\nSELECT nme FROM b",
                   OLD + "\n\nSELECT name FROM a",
                   "not sql at all"]
    calls = []
    with SqlPool(2) as pool:
        records = label_completions([ex] * 4, completions, [0, 1, 2, 3], pool=pool, prompt_ids=lambda e: [7, 8],
                                    sample=stub_sampler(calls), settings=LabelSettings(k=4), seed=11)
    assert len(calls) == 1  # every prefix of the batch in one sampler call
    prompts, prefixes, n, seed = calls[0]
    assert n == 4 and seed == 11 and all(p == [7, 8] for p in prompts)
    assert sorted(set(prefixes)) == sorted(CONTINUATIONS)

    def table(r):
        return [(s.kind, s.ok, s.hard, s.soft, s.hits, s.k) for s in r.steps]

    assert table(records[0]) == [("cte", True, 1.0, 0.5, 2, 4), ("cte", True, 1.0, 0.75, 3, 4),
                                 ("final", True, 1.0, 1.0, 0, 0)]
    assert records[0].outcome is True
    assert table(records[1]) == [("cte", True, 1.0, 0.5, 2, 4), ("cte", False, 0.0, 0.0, 0, 0),
                                 ("final", False, 0.0, 0.0, 0, 0)]
    assert table(records[2]) == [("cte", True, 1.0, 0.25, 1, 4), ("final", True, 0.0, 0.0, 0, 0)]
    assert records[2].outcome is False
    assert table(records[3]) == [("final", False, 0.0, 0.0, 0, 0)] and records[3].problems == ("not_cocte",)
    assert records[0].steps[0].result == "{(1, 'Ann', 30, 'Paris'): 1, (3, 'Cid', 35, 'Paris'): 1}"
    assert records[1].steps[1].result.startswith("Execution error: no such column: nme")


def test_labels_from_gold_answers_only(people_db):
    ex = Example(id="q2", db_path=people_db, question="Who is oldest?", gold_answers=("Dee",))
    with SqlPool(1) as pool:
        (rec,) = label_completions([ex], ["WITH a AS (SELECT * FROM people WHERE age > 31)\n\nSELECT name FROM a "
                                          "ORDER BY age DESC LIMIT 1"], [0], pool=pool, prompt_ids=lambda e: [1],
                                   sample=lambda p, x, n, s: [["\n\nSELECT name FROM a WHERE age = 40"] * n for _ in x],
                                   settings=LabelSettings(k=2))
    assert [(s.hard, s.soft) for s in rec.steps] == [(1.0, 1.0), (1.0, 1.0)] and rec.outcome


def _examples(db, n):
    return [Example(id=f"e{i}", db_path=db, question="q", gold_sql="SELECT name FROM people WHERE city = 'Paris'")
            for i in range(n)]


def _seeded_sampler(prompt_ids, prefixes, n, seed):
    """Deterministic in the seed, like the policy sampler: trajectories for empty prefixes."""
    out = []
    for p in prefixes:
        if p == "":
            out.append([PARIS + "\n\nSELECT name FROM a" if (seed + j) % 2 else OLD + "\n\nSELECT name FROM a"
                        for j in range(n)])
        else:
            out.append(CONTINUATIONS[p][:n])
    return out


def test_labeling_resumes_exactly_and_refuses_other_settings(people_db, tmp_path):
    settings = LabelSettings(k=2, trajectories=2, batch_size=2, seed=3)
    exs = _examples(people_db, 5)
    meta = {"policy": "stub", "data": "x"}
    with SqlPool(2) as pool:
        whole = tmp_path / "whole.jsonl"
        stats = run_labeling(exs, whole, pool=pool, prompt_ids=lambda e: [1], sample=_seeded_sampler,
                             settings=settings, meta=meta, progress=False)
        assert stats["records"] == 10 and stats["resumed_batches"] == 0

        part = tmp_path / "part.jsonl"
        seen = []

        def dying(prompt_ids, prefixes, n, seed):
            if len(seen) == 3:  # two calls per batch: die inside the second batch
                raise KeyboardInterrupt
            seen.append(seed)
            return _seeded_sampler(prompt_ids, prefixes, n, seed)

        with pytest.raises(KeyboardInterrupt):
            run_labeling(exs, part, pool=pool, prompt_ids=lambda e: [1], sample=dying, settings=settings,
                         meta=meta, progress=False)
        with part.open("a") as f:
            f.write('{"id": "e2", "sam')  # a line cut off by the kill
        again = run_labeling(exs, part, pool=pool, prompt_ids=lambda e: [1], sample=_seeded_sampler,
                             settings=settings, meta=meta, progress=False)
        assert again["resumed_batches"] == 1 and again["records"] == 6
        assert part.read_text() == whole.read_text()

        # a kill inside the last batch's append left three of its four records (and a cut fourth):
        # that batch is labelled again whole, not counted as done because its ids are all there
        lines = whole.read_text().splitlines(keepends=True)
        cut = tmp_path / "cut.jsonl"
        (tmp_path / "cut.jsonl.meta.json").write_text((tmp_path / "whole.jsonl.meta.json").read_text())
        cut.write_text("".join(lines[:7]) + lines[7][:20])
        redo = run_labeling(exs[:4], cut, pool=pool, prompt_ids=lambda e: [1], sample=_seeded_sampler,
                            settings=settings, meta=meta, progress=False)
        assert redo["resumed_batches"] == 1 and redo["records"] == 4
        assert cut.read_text() == "".join(lines[:8])

        with pytest.raises(JaxsqlError, match=r"settings.k: 2 -> 3"):
            run_labeling(exs, part, pool=pool, prompt_ids=lambda e: [1], sample=_seeded_sampler,
                         settings=LabelSettings(k=3, trajectories=2, batch_size=2, seed=3), meta=meta, progress=False)
        foreign = tmp_path / "foreign.jsonl"
        foreign.write_text("precious\n")
        with pytest.raises(JaxsqlError, match="not a label run"):
            run_labeling(exs, foreign, pool=pool, prompt_ids=lambda e: [1], sample=_seeded_sampler,
                         settings=settings, meta=meta, progress=False)
        assert foreign.read_text() == "precious\n"

    records = read_label_file(whole)
    assert [r.example.id for r in records] == [f"e{i}" for i in range(5) for _ in range(2)]


def test_label_file_with_missing_fields_is_one_clear_error(tmp_path, people_db):
    good = {"id": "e0", "sample": 0, "example": _examples(people_db, 1)[0].to_dict(), "completion": "x",
            "outcome": False, "steps": [{"text": "x", "kind": "final", "ok": False, "result": "e", "hard": 0,
                                         "soft": 0}]}
    assert record_from_json(good, "f:1").steps[0].hard == 0.0
    bad = dict(good)
    del bad["outcome"]
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(MalformedRecord, match=r"labels.jsonl:2: label record is missing field\(s\) \['outcome'\]"):
        read_label_file(path)
    step_bad = dict(good, steps=[{"text": "x", "kind": "final", "ok": False, "result": "e", "hard": 0}])
    with pytest.raises(MalformedRecord, match=r"steps\[0\] is missing field\(s\) \['soft'\]"):
        record_from_json(step_bad, "f:1")
    with pytest.raises(MalformedRecord, match="must lie in"):
        record_from_json(dict(good, steps=[dict(good["steps"][0], soft=2)]), "f:1")


# --- trajectory scores ----------------------------------------------------------------------------


def test_aggregations_golden():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "min") == 0.5
    assert abs(aggregate(s, "product") - 0.36) < 1e-12
    assert abs(aggregate(s, "mean") - 2.2 / 3) < 1e-12
    assert aggregate(s, "last") == 0.8
    h = [0.0, math.log(2.0), math.log(3.0)]  # weights exp(H): 1, 2, 3 (tau = 1)
    assert abs(aggregate(s, "entropy", entropies=h) - (0.9 * 1 + 0.5 * 2 + 0.8 * 3) / 6) < 1e-12
    # tau = 0.5 squares the weights: 1, 4, 9
    assert abs(aggregate(s, "entropy", entropies=h, tau=0.5) - (0.9 + 0.5 * 4 + 0.8 * 9) / 14) < 1e-12
    assert abs(entropy_weighted_score(s, [7.0, 7.0, 7.0]) - 2.2 / 3) < 1e-12  # equal entropies: the mean
    assert abs(entropy_weighted_score(s, None) - 2.2 / 3) < 1e-12
    assert abs(aggregate(s, "entropy", entropies=[0.0, 50.0, 0.0], tau=0.01) - 0.5) < 1e-9  # the most uncertain step
    for how in ("min", "product", "mean", "last", "entropy"):
        assert aggregate([], how) == 0.0  # no steps: a defined score
    with pytest.raises(ConfigError, match="unknown step-score aggregation"):
        aggregate(s, "max")
    with pytest.raises(ConfigError, match="tau must be > 0"):
        aggregate(s, "entropy", entropies=h, tau=0.0)
    with pytest.raises(ConfigError, match="takes no parameters"):
        aggregate(s, "min", tau=2.0)


def test_step_mean_entropies_golden():
    # completion "AB CD E": tokens "AB", " CD", " E"; steps "AB" [0, 2) and "CD E" [3, 7)
    spans = [(0, 2), (2, 5), (5, 7)]
    assert step_mean_entropies([1.0, 2.0, 4.0], spans, [(0, 2), (3, 7)]) == [1.0, 3.0]
    # a step inside one token takes that token's entropy
    assert step_mean_entropies([1.0, 2.0, 4.0], spans, [(3, 4)]) == [2.0]


# --- commands -------------------------------------------------------------------------------


def test_prm_cli_init_label_score(tiny_env, tmp_path, capsys):
    model = tiny_env["model"]
    data = f"synthetic:{tiny_env['synthetic']}:train"
    assert main(["prm", "init", "--policy", model, "--out", str(tmp_path / "value"), "--head", "value"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "Qwen2ForTokenClassification"
    labels = tmp_path / "labels.jsonl"
    args = ["prm", "label", "--policy", model, "--data", data, "--k", "2", "--out", str(labels), "--limit", "2",
            "--trajectories", "2", "--max-new-tokens", "16", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 4 and len(read_label_file(labels)) == 4
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["resumed_batches"] == 1

    ex = tiny_env["bench"].train[0]
    comps = tmp_path / "comps.jsonl"
    comps.write_text("\n".join(json.dumps({"id": ex.id, "completion": c}) for c in [
        "WITH a AS (SELECT * FROM " + ex.gold_sql.split(" FROM ")[1].split()[0] + ")\n\nSELECT COUNT(*) FROM a",
        "no sql here", ""]) + "\n")
    for prm_dir in (model, str(tmp_path / "value")):  # a plain causal LM is an lm-head PRM
        assert main(["prm", "score", "--prm", prm_dir, "--data", data, "--completions", str(comps),
                     "--policy", model]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [len(x["steps"]) for x in lines] == [2, 1, 0]
        assert lines[0]["executable"] and all(0 < st["score"] < 1 for st in lines[0]["steps"])
        assert set(lines[0]["scores"]) == {"min", "product", "mean", "last", "entropy"}
        assert lines[2]["scores"]["min"] == 0.0 and lines[1]["problems"] == ["not_cocte"]
    assert main(["prm", "score", "--prm", str(tmp_path / "value"), "--head", "lm", "--data", data,
                 "--completions", str(comps)]) == 1
    assert "'value' head, a 'lm' head was asked" in capsys.readouterr().err
    comps.write_text('{"id": "nope", "completion": "x"}\n')
    assert main(["prm", "score", "--prm", model, "--data", data, "--completions", str(comps)]) == 1
    assert "ids not in" in capsys.readouterr().err
    comps.write_text('{"completion": "x"}\n')
    assert main(["prm", "score", "--prm", model, "--data", data, "--completions", str(comps)]) == 1
    assert "expected {" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["label", "score"])
def test_prm_budgets_are_checked_before_any_work(cmd, tmp_path, capsys):
    """An infinite or NaN --timeout is a usage error before the data or models are read."""
    from jaxsql.cli import main

    missing = str(tmp_path / "missing")
    args = {"label": ["--policy", missing, "--k", "2", "--out", str(tmp_path / "l.jsonl")],
            "score": ["--prm", missing, "--completions", missing]}[cmd]
    for bad in ("inf", "nan"):
        assert main(["prm", cmd, "--data", f"synthetic:{missing}", *args, "--timeout", bad]) == 2
        assert f"--timeout must be a finite number > 0, got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "l.jsonl").exists()
