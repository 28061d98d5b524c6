"""The multi-turn rollout loop (`rl.multiturn`) on a tiny random model, real SQLite and the real pool.

A *scripted* decode (`_Script`) stands in for `models.sampler.decode` where a test
needs the model to write given text (a random model does not call tools): it appends
the row's next scripted segment with the real `extend` (so the cache holds it), marks
those tokens sampled and the rows stopped, exactly what `decode` leaves after a row hit
a closing tag. Everything else (stop handling, the runner, tokenising and appending
observations, resuming, the output arrays) is the real loop.
"""

import sqlite3

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsql.sql import SqlPool
from jaxsql.tools import ToolConfig, ToolRunner

from models.sampler import decode as _REAL_DECODE

SCRIPT_LOGP = -0.5  # the log-prob the scripted decode records for its tokens


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("mt_db") / "shop.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, city TEXT, price REAL);"
        "INSERT INTO item VALUES (1, 'pen', 'oslo', 2.5), (2, 'ink', 'cairo', 4.0), (3, 'pad', 'oslo', 1.0);")
    con.commit()
    con.close()
    return str(path)


@pytest.fixture(scope="module")
def pool():
    with SqlPool(num_workers=2, timeout_s=1.0, max_rows=1000) as p:
        yield p


@pytest.fixture(scope="module")
def policy(tiny_env):
    from transformers import AutoTokenizer

    from models.hf_io import load_hf_checkpoint
    from models.sampler import sampler_model

    tok = AutoTokenizer.from_pretrained(tiny_env["tokenizer"])
    cfg, params = load_hf_checkpoint(tiny_env["model"])
    return cfg, params, sampler_model(params, cfg), tok


def _prompt(tok, text="Question: which items are sold in oslo?"):
    return list(tok(text, add_special_tokens=False)["input_ids"])


class _Script:
    """A `decode` replacement: each live row gets its next scripted segment (then EOS when the
    script is exhausted); rounds listed in `real_after` fall through to the real decode."""

    def __init__(self, tok, scripts, eos, real_after=None):
        self.tok, self.eos, self.real_after = tok, eos, real_after
        self.queues = [[list(tok(s, add_special_tokens=False)["input_ids"]) for s in segs] for segs in scripts]
        self.calls = 0

    def __call__(self, model, state, steps, *, max_length=None, **kw):
        from models import sampler

        self.calls += 1
        if self.real_after is not None and self.calls > self.real_after:
            return _REAL_DECODE(model, state, steps, max_length=max_length, **kw)
        _, _, n = sampler.tokens(state)
        done = np.asarray(state.done_B)
        rows = []
        for r in range(len(n)):
            if done[r]:
                rows.append([])
                continue
            ids = self.queues[r].pop(0) if self.queues[r] else [self.eos]
            rows.append(ids[: max_length - int(n[r])])
        state = sampler.extend(model, state, rows)
        B, M = state.tokens_BM.shape
        col = np.arange(M)[None, :]
        new = (col >= n[:, None]) & (col < (n + np.asarray([len(x) for x in rows]))[:, None])
        return state._replace(sampled_BM=state.sampled_BM | jnp.asarray(new),
                              logprobs_BM=jnp.where(jnp.asarray(new), SCRIPT_LOGP, state.logprobs_BM),
                              done_B=jnp.ones_like(state.done_B))


def _run(monkeypatch, policy, scripts, db_paths, pool, *, tool_cfg=ToolConfig(), real_after=None, prompts=None,
         **kw):
    from models import sampler
    from rl.multiturn import multi_turn_rollout

    cfg, _, model, tok = policy
    script = _Script(tok, scripts, tok.eos_token_id, real_after)
    monkeypatch.setattr(sampler, "decode", script)
    prompts = prompts or [_prompt(tok)] * len(db_paths)
    kw.setdefault("max_new_tokens", 400)
    return multi_turn_rollout(model, prompts, db_paths, ToolRunner(pool, tool_cfg), tok,
                              key=jax.random.key(0), greedy=kw.pop("greedy", True), **kw)


def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_scripted_policy_two_calls_and_an_answer(monkeypatch, policy, db, pool):
    """Two calls, then an answer: exactly the expected observations (text and ids), masks,
    turns and final SQL; the completion is the model's ids and the observations' ids in order."""

    _, _, _, tok = policy
    segs = ["Look first. <sql>SELECT DISTINCT city FROM item</sql>",
            "<sql>SELECT name FROM item WHERE city = 'oslo'</sql>",
            " So: <solution>SELECT name FROM item WHERE city = 'oslo'</solution>"]
    out = _run(monkeypatch, policy, [segs], [db], pool)
    ep = out.episodes[0]
    obs1 = "\n<observation>\ncity\noslo\ncairo\n(2 rows)\n</observation>\n"
    obs2 = "\n<observation>\nname\npen\npad\n(2 rows)\n</observation>\n"
    assert [c.observation for c in ep.calls] == [obs1, obs2]
    assert [c.error for c in ep.calls] == [None, None]
    assert ep.turns == 2 and ep.end == "answer"
    assert out.final_sql == ["SELECT name FROM item WHERE city = 'oslo'"]
    assert [o for _, o in ep.segments] == [False, True, False, True, False]
    # the row ends at the answer's closing tag: no EOS is decoded after it
    parts = [(_ids(tok, segs[0]), 1), (_ids(tok, obs1), 0), (_ids(tok, segs[1]), 1), (_ids(tok, obs2), 0),
             (_ids(tok, segs[2]), 1)]
    want_tok = [t for ids, _ in parts for t in ids]
    want_sampled = [m for ids, m in parts for _ in ids]
    n = len(want_tok)
    assert out.completion_tokens.shape == (1, n) and out.completion_tokens.dtype == np.int32
    assert out.completion_tokens[0].tolist() == want_tok
    assert out.sampled_mask[0].tolist() == want_sampled
    assert out.completion_mask[0].tolist() == [1] * n
    np.testing.assert_array_equal(out.logprobs[0], np.where(np.asarray(want_sampled) == 1, SCRIPT_LOGP, 0.0))
    # the observation tokens decode back to the observation text (what the trainer sees)
    obs_ids = [t for t, m in zip(want_tok, want_sampled) if not m]
    assert tok.decode(obs_ids) == obs1 + obs2
    assert out.stats["turns"] == 2 and out.stats["rounds"] == 3
    assert out.stats["observation_tokens"] == len(_ids(tok, obs1)) + len(_ids(tok, obs2))


def test_continued_decode_equals_one_uninterrupted_forward(monkeypatch, policy, db, pool):
    """After a scripted call and its observation the real sampler decodes on: the log-probs of
    the model's tokens after the observation equal one forward over prompt + whole completion."""
    from models.model import token_logprobs

    cfg, params, _, tok = policy
    prompts = [_prompt(tok), _prompt(tok, "Question: the cheapest item?")]
    segs = [["<sql>SELECT name, price FROM item</sql>"], ["<sql>SELECT city FROM item</sql>"]]
    out = _run(monkeypatch, policy, segs, [db, db], pool, prompts=prompts, real_after=1, greedy=False,
               temperature=0.9, max_new_tokens=120, num_samples=1)
    for r, p in enumerate(prompts):
        n = int(out.completion_mask[r].sum())
        seq = np.asarray(p + out.completion_tokens[r, :n].tolist(), np.int32)[None]
        lp = np.asarray(token_logprobs(params, cfg, jnp.asarray(seq), jnp.ones_like(seq), temperature=0.9))[0]
        first_obs = int(np.argmin(out.sampled_mask[r, :n]))  # the first observation token
        after = [j for j in range(first_obs, n) if out.sampled_mask[r, j]]
        assert len(after) >= 5  # the real decode sampled after the observation
        np.testing.assert_allclose(out.logprobs[r, after], lp[[len(p) + j for j in after]], atol=2e-4)
        assert out.episodes[r].turns == 1


def test_hostile_calls_become_observations_and_the_batch_finishes(monkeypatch, policy, db, pool):
    """A write, a never-ending recursion then a call past the SQL-time budget, a call over
    max_call_chars, calls past max_turns: each an observation with its error kind; a normal
    row in the same batch is unaffected."""
    cfg = ToolConfig(max_turns=2, max_sql_s=0.5, max_call_chars=120)
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    long_q = "SELECT name FROM item WHERE " + " OR ".join(f"id = {i}" for i in range(40))
    answer = "<solution>SELECT name FROM item</solution>"
    scripts = [
        ["<sql>DELETE FROM item</sql>", answer],
        [f"<sql>{forever}</sql>", "<sql>SELECT 1</sql>", answer],
        [f"<sql>{long_q}</sql>", answer],
        ["<sql>SELECT 1</sql>", "<sql>SELECT 2</sql>", "<sql>SELECT 3</sql>", answer],
        ["<sql>SELECT name FROM item WHERE price > 2</sql>", answer],
    ]
    # bounded: the endless recursion ends as "timeout" at its deadline (an unbounded one would
    # hang until pytest's timeout); no wall-clock assertion, which a loaded machine breaks
    out = _run(monkeypatch, policy, scripts, [db] * 5, pool, tool_cfg=cfg, max_new_tokens=600)
    eps = out.episodes
    assert [c.error for c in eps[0].calls] == ["denied"] and eps[0].end == "answer"
    assert [c.error for c in eps[1].calls] == ["timeout", "sql_time"] and eps[1].end == "sql_time"
    assert [c.error for c in eps[2].calls] == ["call_too_long"] and eps[2].end == "answer"
    assert [c.error for c in eps[3].calls] == [None, None, "max_turns"] and eps[3].end == "max_turns"
    assert [c.error for c in eps[4].calls] == [None] and eps[4].end == "answer"
    assert eps[4].calls[0].observation == "\n<observation>\nname\npen\nink\n(2 rows)\n</observation>\n"
    assert out.final_sql == ["SELECT name FROM item", None, "SELECT name FROM item", None, "SELECT name FROM item"]
    with sqlite3.connect(db) as con:  # the write was refused
        assert con.execute("SELECT count(*) FROM item").fetchone() == (3,)
    # an episode the runner ended keeps its refusal observation as context tokens, unsampled
    _, _, _, tok = policy
    for r in (1, 3):
        n = int(out.completion_mask[r].sum())
        tail = _ids(tok, eps[r].calls[-1].observation)
        assert out.completion_tokens[r, n - len(tail):n].tolist() == tail
        assert not out.sampled_mask[r, n - len(tail):n].any()


def test_rows_end_at_different_turns_with_samples_and_budget(monkeypatch, policy, db, pool):
    """num_samples=2 (group-major rows), episodes of 0, 1 and 2 calls in one batch, and a row
    whose observation does not fit in its token budget (cut to it, the row ends)."""
    _, _, _, tok = policy
    ans = "<solution>SELECT 1</solution>"
    call = "<sql>SELECT name FROM item</sql>"
    scripts = [[ans], [call, ans], [call, call, ans], [call, call, call, ans]]
    out = _run(monkeypatch, policy, scripts, [db, db], pool, num_samples=2, max_new_tokens=400)
    assert [e.turns for e in out.episodes] == [0, 1, 2, 3]
    assert [e.end for e in out.episodes] == ["answer", "answer", "answer", "answer"]
    assert out.final_sql == ["SELECT 1"] * 4
    lengths = out.completion_mask.sum(1)
    assert lengths[0] < lengths[1] < lengths[2] < lengths[3]
    assert (out.completion_mask[:, :][np.arange(4), lengths - 1] == 1).all()
    assert out.completion_tokens[0, lengths[0]:].tolist() == [policy[2].pad_id] * (out.completion_tokens.shape[1]
                                                                                    - lengths[0])
    # a budget that ends inside the first observation
    budget = len(_ids(tok, call)) + 5
    cut = _run(monkeypatch, policy, [[call, ans]], [db], pool, max_new_tokens=budget)
    assert cut.episodes[0].end == "no_answer" and cut.final_sql == [None]
    assert cut.completion_mask.sum() == budget and cut.sampled_mask.sum() == len(_ids(tok, call))
    assert cut.stats["observations_cut"] == 1


def test_two_device_data_mesh_gives_the_one_device_tokens(monkeypatch, policy, db, pool, tiny_env):
    """Parameters on a 2-way data mesh: the same completions, masks and episodes as on one device."""
    from jaxsql.sharding import make_mesh
    from models.hf_io import load_hf_checkpoint
    from models.sampler import sampler_model

    cfg, _, _, tok = policy
    _, params_d = load_hf_checkpoint(tiny_env["model"], mesh=make_mesh(2, 1, 1, devices=jax.devices()[:2]))
    meshed = (cfg, params_d, sampler_model(params_d, cfg), tok)
    assert meshed[2].shards == 2
    scripts = [["<sql>SELECT name FROM item</sql>"], ["<sql>SELECT city FROM item</sql>"]] * 2
    prompts = [_prompt(tok), _prompt(tok, "Question: the cheapest item?")]
    got = [_run(monkeypatch, p, [list(s) for s in scripts], [db, db], pool, prompts=prompts, real_after=1,
                greedy=False, temperature=1.0, max_new_tokens=80, num_samples=2) for p in (policy, meshed)]
    a, b = got
    np.testing.assert_array_equal(a.completion_tokens, b.completion_tokens)
    np.testing.assert_array_equal(a.sampled_mask, b.sampled_mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert [e.text for e in a.episodes] == [e.text for e in b.episodes]


@pytest.mark.parametrize("text", ["Look: <sql>SELECT a FROM t WHERE b > 2 AND total>1 AND col>3</sql>", "x<sql>SELECT 1</sql>",
                                  "So <solution>SELECT name FROM item</solution>", "a</sql>"])
def test_tool_stop_rule_fires_at_the_token_closing_a_tag(policy, text):
    """Byte-level BPE splits the closing tags into many tokens (the sampler's two-token rule misses
    them): the tool rule fires at the tag's last token, and on no token of the text whose host
    parse would then decide nothing except where the text so far ends in an opening tag."""
    from jaxsql.tools import parse_segment
    from rl.multiturn import tool_stop_rule

    cfg, _, _, tok = policy
    rule = tool_stop_rule(tok, ToolConfig(), cfg.vocab_size)
    ids = _ids(tok, text)
    assert len(_ids(tok, "</sql>")) > 2 and len(_ids(tok, "</solution>")) > 2  # the case that needs this rule
    ids_V, after, before = (np.asarray(a) for a in rule)
    fires = [bool(ids_V[t]) or (j > 0 and bool((after[:, ids[j - 1]] & before[:, t]).any())) for j, t in enumerate(ids)]
    assert fires[-1], [tok.decode([i]) for i in ids]
    for j in range(len(ids) - 1):
        prefix = tok.decode(ids[: j + 1])
        closed = parse_segment(prefix).status in ("call", "answer", "malformed")
        assert not closed  # no tag closes before the end of these texts
        if fires[j]:  # a false stop: at an opening tag's '>' or a '>' after a piece of a tag ('col' + '>')
            assert prefix.endswith(">"), prefix
    # '>' after a token that cannot be part of a tag (' b', ' ') does not fire
    assert sum(fires) <= text.count(">") - text.count(" > ")


class _ByTurn:
    """A stateless scripted `decode`: a live row that has seen k observations writes SEGMENTS[k]
    (EOS after the last), so it works for any batch the evaluation builds."""

    def __init__(self, tok, segments):
        self.tok, self.segments = tok, segments

    def __call__(self, model, state, steps, *, max_length=None, **kw):
        from models import sampler

        t, _, n = sampler.tokens(state)
        done = np.asarray(state.done_B)
        rows = []
        for r in range(len(n)):
            k = self.tok.decode(t[r, :n[r]].tolist()).count("</observation>")
            ids = [] if done[r] else (_ids(self.tok, self.segments[k]) if k < len(self.segments)
                                       else [self.tok.eos_token_id])
            rows.append(ids[: max_length - int(n[r])])
        state = sampler.extend(model, state, rows)
        col = np.arange(state.tokens_BM.shape[1])[None, :]
        new = jnp.asarray((col >= n[:, None]) & (col < (n + np.asarray([len(x) for x in rows]))[:, None]))
        return state._replace(sampled_BM=state.sampled_BM | new, done_B=jnp.ones_like(state.done_B))


def test_eval_cli_multi_turn_writes_turns_calls_and_tool_metrics(monkeypatch, tiny_env, tmp_path, capsys):
    """``jaxsql eval --multi-turn`` end to end on the tiny model (scripted to make one call, then
    answer): results.jsonl rows carry turns, tool errors and the calls; metrics.json the tool metrics."""
    import json

    from transformers import AutoTokenizer

    from jaxsql.cli import main
    from models import sampler

    tok = AutoTokenizer.from_pretrained(tiny_env["tokenizer"])
    ex0 = tiny_env["bench"].dev[0]
    monkeypatch.setattr(sampler, "decode", _ByTurn(tok, ["<sql>SELECT name FROM sqlite_master</sql>",
                                                         f"<solution>{ex0.gold_sql}</solution>"]))
    out = tmp_path / "ev"
    args = ["eval", "--model", tiny_env["model"], "--data", f"synthetic:{tiny_env['synthetic']}:dev",
            "--out", str(out), "--multi-turn", "--prompt-format", "tool", "--max-new-tokens", "200",
            "--batch-size", "4", "--max-prompt-len", "64", "--max-turns", "2", "--tool-max-rows", "2",
            "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(tiny_env["bench"].dev)
    for r in rows:
        assert r["turns"] == 1 and r["tool_errors"] == 0 and r["tool_end"] == "answer"
        assert r["calls"] == [{"sql": "SELECT name FROM sqlite_master", "error": None}]
    assert next(r for r in rows if r["id"] == ex0.id)["ex_set"] == 1.0  # the answer's SQL is the prediction
    m = json.loads((out / "metrics.json").read_text())
    s = m["summary"]
    assert s["tool/turns_per_completion"] == 1.0 and s["tool/used_share"] == 1.0 and s["tool/error_share"] == 0.0
    assert s["tool/decode_s"] > 0 and "tool/tool_s" in s
    assert m["config"]["multi_turn"]["max_turns"] == 2 and m["config"]["multi_turn"]["max_rows"] == 2
    # a rerun resumes: nothing generated, the tool metrics still cover every row
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["summary"]["tool/turns_per_completion"] == 1.0
    # self-consistency over 2 sampled episodes: both answer alike, so the vote is 2
    vote = tmp_path / "vote"
    assert main([a if a != str(out) else str(vote) for a in args] + ["--select", "vote", "--n", "2"]) == 0
    rows = [json.loads(line) for line in (vote / "results.jsonl").read_text().splitlines()]
    assert all(r["samples"] == 2 and r["turns"] == 1 for r in rows)
    assert next(r for r in rows if r["id"] == ex0.id)["votes"] == 2


@pytest.mark.parametrize("extra, msg", [
    (["--multi-turn"], "--prompt-format tool"),
    (["--multi-turn", "--prompt-format", "tool", "--select", "prm-beam", "--prm", "x"], "not available"),
    (["--prompt-format", "tool"], "add --multi-turn"),
    (["--max-turns", "2"], "only used with --multi-turn"),
    (["--multi-turn", "--prompt-format", "tool", "--max-turns", "-1"], "max_turns"),
])
def test_eval_cli_multi_turn_refuses_bad_combinations(tmp_path, capsys, extra, msg):
    from jaxsql.cli import main

    rc = main(["eval", "--model", str(tmp_path), "--data", f"synthetic:{tmp_path}:dev", "--out",
               str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc != 0 and msg in err and "Traceback" not in err and err.count("\n") == 1
