"""Multi-turn SFT traces from gold SQL (`data.multiturn`), the ``tool`` prompt format, and the
token encoding with its observation mask."""

import json

import pytest

from data.multiturn import (KEPT, _columns_of, build_traces, encode_trace, filtered_text_column, trace_report,
                            trace_segments)
from data.prompts import PROMPT_FORMATS, render_prompt, render_target
from data.records import Example
from jaxsql.extract import extract_sql
from jaxsql.sql import SqlPool
from jaxsql.tools import ToolConfig, ToolRunner, parse_segment

COLS = {"student": {"id", "name", "city"}, "exam": {"id", "student_id", "subject", "mark"}}


@pytest.fixture(scope="module")
def pool():
    with SqlPool(num_workers=2, timeout_s=5.0, max_rows=100_000) as p:
        yield p


@pytest.mark.parametrize("sql, want", [
    ("SELECT name FROM student WHERE city = 'oslo'", ("student", "city", "oslo")),
    ("SELECT name FROM student WHERE 'oslo' != city", ("student", "city", "oslo")),
    ("SELECT s.name FROM student AS s JOIN exam AS e ON s.id = e.student_id WHERE e.subject = 'math'",
     ("exam", "subject", "math")),
    ("SELECT name FROM student WHERE id IN (SELECT student_id FROM exam WHERE subject = 'art')",
     ("exam", "subject", "art")),
    ("SELECT name FROM student WHERE id = 3", None),  # a number, not text
    ("SELECT * FROM student JOIN exam ON student.id = exam.student_id WHERE id = '3'", None),  # ambiguous
    ("SELECT name FROM student WHERE nope = 'x'", None),
    ("not sql at all (", None),
])
def test_filtered_text_column(sql, want):
    assert filtered_text_column(sql, COLS) == want


def test_traces_on_the_synthetic_benchmark(small_bench, pool):
    examples = small_bench.train
    traces = build_traces(examples, pool.execute_batch)
    report = trace_report(examples, traces).to_json()
    by = report["by_reason"]
    assert report["kept"] == len(examples) and sum(by.values()) == len(examples)
    assert min(by["lookup"], by["peek"], by["direct"]) > 0.15 * len(examples)
    cfg = ToolConfig()
    for e, t in zip(examples, traces):
        assert t.final_sql == " ".join(e.gold_sql.split())
        assert [o for _, o in t.segments] == [False, True] * len(t.calls) + [False]
        assert extract_sql(t.text, answer_tag=cfg.answer_tag) == t.final_sql
        if t.reason == "lookup":
            table, col, literal = filtered_text_column(e.gold_sql, _columns_of(e.db_path))
            assert literal in e.gold_sql and t.calls[0].startswith("SELECT DISTINCT ") and f"\n{literal}\n" in t.segments[1][0]
    # Replaying every kept trace through the runner (the scripted policy the rollout loop will be)
    # reproduces its observations exactly.
    runner = ToolRunner(pool, cfg)
    eps = [runner.new_episode(e.db_path) for e in examples]
    pending = [[s for s, obs in t.segments if not obs] for t in traces]
    while any(not ep.done for ep in eps):
        segs = [p.pop(0) if not ep.done else None for ep, p in zip(eps, pending)]
        runner.step(eps, segs)
    for ep, t in zip(eps, traces):
        assert ep.segments == list(t.segments) and ep.end == "answer" and ep.answer == t.final_sql


def test_failures_are_counted_by_reason(small_bench, pool, tmp_path):
    e = small_bench.train[0]
    bad = [Example("x1", e.db_path, "q", gold_sql="SELECT nope FROM nowhere"),
           Example("x2", e.db_path, "q", gold_answers=("1",)),
           Example("x3", str(tmp_path / "missing.sqlite"), "q", gold_sql="SELECT 1")]
    traces = build_traces(bad, pool.execute_batch)
    assert [t.reason for t in traces] == ["gold_fails", "no_gold_sql", "gold_fails"]
    assert not any(t.kept for t in traces)
    # the tool format trains such an example on a direct answer, as the other formats train on gold
    assert trace_segments(bad[0]) == [("<solution>SELECT nope FROM nowhere</solution>", False)]


def test_tool_prompt_format(small_bench):
    fmt = PROMPT_FORMATS["tool"]
    cfg = ToolConfig()
    for word in ("<sql></sql>", "<observation></observation>", "<solution></solution>", f"at most {cfg.max_turns}"):
        assert word in fmt.instruction
    ex = next(e for e in small_bench.train if "= '" in e.gold_sql)
    prompt = render_prompt(ex, "t(a int)", "tool")
    assert prompt.startswith(fmt.instruction) and ex.question in prompt
    target = render_target(ex, "tool")
    segs = fmt.segments(ex)
    assert target == "".join(s for s, _ in segs) and any(obs for _, obs in segs)
    assert parse_segment(segs[0][0], cfg).status == "call"


def test_cli_tooltraces(small_bench, tmp_path, capsys):
    from jaxsql.cli import main

    out, traces = tmp_path / "t.jsonl", tmp_path / "t.traces.jsonl"
    args = ["data", "tooltraces", f"synthetic:{small_bench.out_dir}:dev", "--out", str(out), "--traces", str(traces)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] == printed["kept"] == len(small_bench.dev)
    assert sum(printed["by_reason"].values()) == len(small_bench.dev)
    rows = [json.loads(line) for line in traces.read_text().splitlines()]
    assert {r["trace"]["reason"] for r in rows} <= set(KEPT)
    from data.readers import read_examples

    assert [e.id for e in read_examples("jsonl", str(out))] == [e.id for e in small_bench.dev]
    assert main(args) != 0 and "exists" in capsys.readouterr().err  # no silent overwrite
    assert main(args + ["--overwrite", "--peek-share", "2"]) != 0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data.tokenizer import train_tokenizer

    texts = ["SELECT DISTINCT city FROM student WHERE city = 'oslo'", "<observation>\ncity\noslo\n(1 row)\n",
             "<sql>SELECT name FROM student</sql>", "</observation>\n<solution>SELECT 1</solution>"] * 20
    return train_tokenizer(texts, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


def test_encode_trace_golden(tokenizer):
    segments = [("<sql>SELECT DISTINCT city FROM student</sql>", False),
                ("\n<observation>\ncity\noslo\n(1 row)\n</observation>\n", True),
                ("<solution>SELECT name FROM student WHERE city = 'oslo'</solution>", False)]
    eos = tokenizer.eos_token_id
    ids, mask = encode_trace(tokenizer, segments, 200, eos)
    pieces = [tokenizer(s, add_special_tokens=False)["input_ids"] for s, _ in segments]
    a, b, c = (len(p) for p in pieces)
    # golden: the exact positions of the observation's tokens, from this tokenizer
    assert (a, b, c) == (GOLDEN_A, GOLDEN_B, GOLDEN_C)
    assert mask == [1] * a + [0] * b + [1] * c + [1]
    assert ids[-1] == eos and len(ids) == a + b + c + 1
    assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]) == segments[1][0]
    assert tokenizer.decode(ids[:-1]) == "".join(s for s, _ in segments)
    # cut at max_len: the first max_len - 1 tokens, then EOS (scored)
    ids2, mask2 = encode_trace(tokenizer, segments, a + 3, eos)
    assert ids2 == ids[: a + 2] + [eos] and mask2 == [1] * a + [0, 0, 1]


GOLDEN_A, GOLDEN_B, GOLDEN_C = 21, 21, 32
