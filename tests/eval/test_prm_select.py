"""PRM-guided selection: best-of-N with a stub scorer, beam search against brute force, the CLI."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import jax
import numpy as np
import pytest

from data.records import Example
from jaxsql.cli import main
from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.sql import SqlPool
from rl.evaluate import PrmGuide, _select, get_selector
from tests.rl.conftest import build_env

GOOD_A = "WITH a AS (SELECT name FROM t WHERE x > 1),\n\nb AS (SELECT COUNT(*) AS n FROM a)\n\nSELECT n FROM b"
GOOD_B = "WITH a AS (SELECT name FROM t),\n\nb AS (SELECT MAX(x) AS m FROM t)\n\nSELECT m FROM b"
BROKEN = "WITH a AS (SELECT name FROM missing_table)\n\nSELECT * FROM a"
PLAIN = "SELECT name FROM t WHERE x = 2"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("prm_db") / "d.sqlite"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE t (name TEXT, x INT); INSERT INTO t VALUES ('a', 1), ('b', 2), ('c', 3);")
    con.commit()
    con.close()
    return str(path)


class StubScorer:
    """Fixed step scores per completion; records which completions it was asked about."""

    def __init__(self, table):
        self.table = table
        self.asked: list[str] = []

    def __call__(self, examples, trajectories):
        self.asked += [t.completion for t in trajectories]
        return [list(self.table[t.completion]) for t in trajectories]


TABLE = {GOOD_A: [0.9, 0.4, 0.5], GOOD_B: [0.7, 0.5, 0.6], BROKEN: [1.0, 1.0], PLAIN: [0.45]}


def pick(db, texts, logprobs, how, table=TABLE, entropies=None):
    ex = Example("q1", db, "how many?", gold_sql="SELECT 1")
    scorer = StubScorer(table)
    strategy = get_selector("prm-best-of-n")
    with SqlPool(2, timeout_s=30.0) as pool:
        pred, = _select(strategy, pool, [ex], texts, logprobs, len(texts), PrmGuide(scorer, aggregate=how),
                        entropies)
    return pred, scorer


@pytest.mark.parametrize("how, winner", [("min", GOOD_B), ("last", GOOD_B), ("product", PLAIN),
                                         ("mean", GOOD_A)])
def test_best_of_n_picks_the_best_executable_candidate(db, how, winner):
    """min: B 0.5 > plain 0.45 > A 0.4; last: B 0.6 > A 0.5; product: the one-step plain query's
    0.45 > 0.21 > 0.18; mean: A and B tie at 0.6, A has the better mean log-prob. The broken
    chain, scored 1.0 by the stub, is dropped before scoring."""
    texts = [BROKEN, GOOD_A, PLAIN, GOOD_B]
    pred, scorer = pick(db, texts, [-0.1, -0.5, -2.0, -0.9], how)
    assert pred.completion == winner and pred.extra["selected"] == texts.index(winner)
    assert pred.extra["executable"] == 3 and BROKEN not in scorer.asked and len(scorer.asked) == 3


def test_best_of_n_ties_and_all_dropped(db):
    tie = {GOOD_A: [0.5], GOOD_B: [0.5], BROKEN: [0.9]}
    pred, _ = pick(db, [GOOD_A, GOOD_B], [-1.0, -0.2], "min", tie)
    assert pred.completion == GOOD_B  # equal scores: the better mean log-prob
    pred, _ = pick(db, [GOOD_B, GOOD_A], [-0.3, -0.3], "min", tie)
    assert pred.completion == GOOD_B  # equal log-probs too: the earlier sample
    pred, scorer = pick(db, [BROKEN, "not sql at all", BROKEN + " "], [-3.0, -1.0, -2.0], "min",
                        {**tie, "not sql at all": [1.0], BROKEN + " ": [1.0]})
    assert pred.completion == "not sql at all" and pred.extra["executable"] == 0 and scorer.asked == []
    assert pred.extra["prm_score"] is None


def test_best_of_n_entropy_weighting(db):
    """Entropies [0, 5, 0] put nearly all weight on the second step: A scores ~0.4, B ~0.5."""
    def entropies(examples, completions, spans):
        assert [len(s) for s in spans] == [3] * len(completions)
        return [[0.0, 5.0, 0.0] for _ in completions]

    pred, _ = pick(db, [GOOD_A, GOOD_B], [-0.1, -0.9], "entropy", entropies=entropies)
    assert pred.completion == GOOD_B
    with pytest.raises(JaxsqlError, match="step entropies"):
        pick(db, [GOOD_A], [-0.1], "entropy")


def test_prm_guide_validates():
    with pytest.raises(ConfigError, match="PrmGuide.aggregate"):
        PrmGuide(lambda e, t: [], aggregate="max")
    with pytest.raises(ConfigError, match="PrmGuide.beam_width"):
        PrmGuide(lambda e, t: [], beam_width=0)


# --- beam search against brute force ---------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("prm_env"), n_train=8)


def _hash_score(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def hash_scorer(examples, trajectories):
    """A deterministic stand-in PRM: each step's score is a hash of the text up to it."""
    return [[_hash_score(t.completion + f"#{k}") for k in range(len(t.steps))] or [_hash_score(t.completion)]
            for t in trajectories]


@pytest.mark.slow
def test_beam_search_matches_brute_force(env):
    """Enumerate every path of `expand` candidates per node to `max_steps` depths with the continuable
    sampler (candidate j at depth d draws from fold_in(fold_in(key, d), j)), score them all, and check
    that the beam keeps exactly the top `width` texts at every depth and returns the best."""
    from jaxsql.cli.model_cmds import load_tokenizer
    from models.hf_io import load_hf_checkpoint
    from models.sampler import StopRule, decode, fork, reseed, resume, sampler_model, start, tokens
    from rl.prm_search import beam_search

    cfg, params = load_hf_checkpoint(env["model"])
    tok = load_tokenizer(env["model"], cfg.vocab_size)
    model = sampler_model(params, cfg)
    examples = env["bench"].dev[:2]
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    V = cfg.vocab_size
    eos = tuple(cfg.eos_token_ids)
    ids = np.zeros(V, bool)
    ids[np.arange(V) % 7 == 0] = True  # a step ends at about one token in seven
    ids[list(eos)] = True
    boundary = StopRule(jax.numpy.asarray(ids), jax.numpy.zeros((1, V), bool), jax.numpy.zeros((1, V), bool))
    key = jax.random.key(5)
    width, expand, depth, budget = 2, 3, 3, 20
    kw = dict(temperature=1.3, stop_ids=eos, stop=boundary, max_length=budget)
    with SqlPool(2, timeout_s=30.0) as pool:
        got = beam_search(model, tok, examples, prompts, pool, hash_scorer, key=key, width=width, expand=expand,
                          max_steps=depth, max_new_tokens=budget, eos_ids=eos, boundary=boundary,
                          temperature=1.3, is_final=lambda text: False)

    def text_of(seq):
        return tok.decode([t for t in seq if t not in eos], skip_special_tokens=True)

    def finished(seq):
        return (bool(seq) and seq[-1] in eos) or len(seq) >= budget

    for e, res in enumerate(got):
        # brute force: the whole tree of this example, children[seq] = its `expand` continuations
        children: dict[tuple, list[tuple]] = {}
        level = [((), start(model, [prompts[e]], key=key, capacity=32))]
        for d in range(1, depth + 1):
            nxt = []
            for seq, st in level:
                if finished(seq):
                    continue
                kids = decode(model, resume(reseed(fork(model, st, [0] * expand), jax.random.fold_in(key, d))),
                              budget - len(seq), **kw)
                t, _, n = tokens(kids)
                children[seq] = [tuple(int(x) for x in t[j, :n[j]]) for j in range(expand)]
                nxt += [(c, fork(model, kids, [j])) for j, c in enumerate(children[seq])]
            level = nxt
        score: dict[str, float] = {}

        def agg(text):
            if text not in score:
                from jaxsql.cocte import execute_completions

                with SqlPool(1, timeout_s=30.0) as p:
                    traj, = execute_completions(p, [(examples[e].db_path, text)])
                score[text] = min(hash_scorer(None, [traj])[0])
            return score[text]

        # replay the search over the enumerated tree
        frontier, done, kept, seqs, sampled = [()], [], [], {}, 0
        for d in range(1, depth + 1):
            if not frontier:
                break
            sampled += expand * len(frontier)
            candidates: dict[str, tuple] = {}
            for seq in done + [c for f in frontier for c in children[f]]:
                candidates.setdefault(text_of(seq), seq)
            seqs.update(candidates)
            best = sorted(candidates, key=agg, reverse=True)[:width]
            kept.append(tuple(best))
            done = [candidates[t] for t in best if finished(candidates[t])]
            frontier = [candidates[t] for t in best if not finished(candidates[t])]
        assert res.kept == tuple(kept)
        assert len(res.kept) >= 2 and res.candidates == sampled > expand  # past the first step
        assert res.best.text == max(res.kept[-1], key=lambda t: (finished(seqs[t]), agg(t)))


# --- a real PRM and the CLI ---------------------------------------------------------------------


def test_prm_step_scorer_equals_prm_score(env):
    """The scorer the selectors use gives `score_completions`' step scores (a causal LM read as an lm PRM)."""
    from jaxsql.cocte import execute_completions
    from models.prm import load_prm
    from rl.prm_score import score_completions
    from rl.prm_search import prm_step_scorer
    from rl.rollout import PromptEncoder

    prm = load_prm(env["model"])
    exs = env["bench"].dev[:3]
    table = exs[0].gold_sql.split(" FROM ")[1].split()[0]
    comps = [f"WITH a AS (SELECT * FROM {table})\n\nSELECT COUNT(*) FROM a", exs[1].gold_sql, "not sql"]
    enc = PromptEncoder(prm.tokenizer, "cocte", 64)
    with SqlPool(2, timeout_s=30.0) as pool:
        ref = score_completions(prm, exs, comps, pool, prompt_ids=enc, max_len=1024)
        trajs = execute_completions(pool, [(e.db_path, c) for e, c in zip(exs, comps)])
    got = prm_step_scorer(prm, enc, max_len=1024)(exs, trajs)
    assert [len(g) for g in got] == [2, 1, 1]
    np.testing.assert_allclose([x for g in got for x in g], [x for r in ref for x in r.step_scores], atol=1e-6)


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_prm_selection_end_to_end(capsys, tmp_path, env):
    """`jaxsql eval --model M --prm P --select prm-best-of-n | prm-beam` on the synthetic benchmark
    (tiny random policy, the policy itself as an lm PRM, the real sandbox); bad combinations are
    one line."""
    common = ["eval", "--model", env["model"], "--data", f"synthetic:{env['synthetic']}:dev", "--prompt-format",
              "cocte", "--max-new-tokens", "12", "--max-prompt-len", "64", "--batch-size", "8", "--devices", "1",
              "--no-progress", "--prm", env["model"]]
    assert main([*common, "--out", str(tmp_path / "bon"), "--select", "prm-best-of-n", "--num-samples", "3"]) == 0
    capsys.readouterr()
    rows = _rows(tmp_path / "bon")
    assert len(rows) == 16 and all(r["samples"] == 3 and 0 <= r["selected"] < 3 and 0 <= r["executable"] <= 3
                                   for r in rows)
    metrics = json.loads((tmp_path / "bon" / "metrics.json").read_text())
    assert "ex_set" in metrics["summary"] and metrics["config"]["prm_aggregate"] == "min"
    assert main([*common, "--out", str(tmp_path / "beam"), "--select", "prm-beam", "--beam-width", "2",
                 "--beam-expand", "2", "--beam-max-steps", "2", "--prm-aggregate", "last"]) == 0
    capsys.readouterr()
    rows = _rows(tmp_path / "beam")
    assert len(rows) == 16 and all(1 <= r["depth"] <= 2 and r["candidates"] >= 2 for r in rows)

    def refused(*argv):
        assert main(list(argv)) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        return err[0]

    no_prm = common[:-2] + ["--out", str(tmp_path / "x")]
    assert "--prm DIR" in refused(*no_prm, "--select", "prm-best-of-n")
    assert "--prompt-format cocte" in refused(*[a if a != "cocte" else "plain" for a in common],
                                               "--out", str(tmp_path / "x"), "--select", "prm-beam")
    assert "only used by" in refused(*common, "--out", str(tmp_path / "x"), "--select", "vote")
    other = build_env(tmp_path / "other", n_train=8, vocab=500)
    swapped = common[:-1] + [other["model"]]
    assert "different tokenizers" in refused(*swapped, "--out", str(tmp_path / "x"), "--select", "prm-best-of-n")


def test_cli_prm_flags_need_a_model(capsys, tmp_path):
    assert main(["eval", "--predictions", str(tmp_path / "p.jsonl"), "--data", f"jsonl:{tmp_path / 'd.jsonl'}",
                 "--prm", str(tmp_path), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prm: only used with --model" in err[0]
