"""Prompt formats and SFT targets agree with the extraction rules the rewards use."""

import sqlite3

import pytest
from transformers import AutoTokenizer

from data.prompts import PROMPT_FORMATS, render_prompt, render_target, to_cocte
from data.records import Example
from data.schema import serialize_schema
from data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from jaxsql.errors import JaxsqlError
from jaxsql.extract import cocte_format_ok, extract_sql, format_ok


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, small_bench):
    texts = [e.question + " " + e.gold_sql for e in small_bench.train] * 3
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=400, out_dir=out)
    return AutoTokenizer.from_pretrained(out)


def _rows(db, sql):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_targets_extract_to_equivalent_sql(small_bench):
    assert set(PROMPT_FORMATS) == {"plain", "think", "cocte", "tool"}
    for e in small_bench.train:
        gold = _rows(e.db_path, e.gold_sql)
        for fmt in PROMPT_FORMATS:
            target = render_target(e, fmt)
            tag = "solution" if fmt == "tool" else "answer"
            assert _rows(e.db_path, extract_sql(target, answer_tag=tag)) == gold, (fmt, target)
        assert render_target(e, "plain") == e.gold_sql
        assert format_ok(render_target(e, "think"))
        assert cocte_format_ok(render_target(e, "cocte"))


def test_cocte_golden():
    assert to_cocte("SELECT name FROM t WHERE a > 3 ORDER BY b LIMIT 2") == \
        "WITH step1 AS (SELECT * FROM t WHERE a > 3) SELECT name FROM step1 ORDER BY b LIMIT 2"
    assert to_cocte("SELECT COUNT(*) FROM t") == "WITH step1 AS (SELECT COUNT(*) FROM t) SELECT * FROM step1"


def test_plain_template_and_evidence():
    e = Example(id="a", db_path="x.db", question="How many?", evidence="x means y", gold_sql="SELECT 1")
    text = render_prompt(e, "t(a int)", "plain")
    assert text == (PROMPT_FORMATS["plain"].instruction + "\n\nt(a int)\n-- Evidence: x means y\n\n"
                    "Question: How many?\nResponse:\n")
    with pytest.raises(JaxsqlError, match="unknown prompt format"):
        render_prompt(e, "t(a int)", "yaml")
    with pytest.raises(JaxsqlError, match="no gold SQL"):
        render_target(Example(id="b", db_path="x", question="q", gold_answers=("1",)), "plain")


def test_chat_template_and_special_tokens(tokenizer, small_bench):
    e = small_bench.dev[0]
    text = render_prompt(e, serialize_schema(e.db_path, style="compact", sample_values=0), "think", tokenizer)
    assert text.startswith("<|im_start|>system\n" + PROMPT_FORMATS["think"].instruction + "<|im_end|>\n")
    assert text.endswith("Question: " + e.question + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for tok in SPECIAL_TOKENS:
        assert len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1, tok
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 0
