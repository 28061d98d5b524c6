"""SQL extraction and completion-shape checks."""

import pytest

from jaxsql.extract import cocte_format_ok, extract_sql, format_ok


@pytest.mark.parametrize(
    "completion,sql",
    [
        ("<think>hmm</think><answer>SELECT 1</answer>", "SELECT 1"),
        ("<answer>SELECT 1</answer> then <answer> SELECT 2 </answer>", "SELECT 2"),
        ("<think>x</think><answer>\n```sql\nSELECT 3\n```\n</answer>", "SELECT 3"),
        ("text ```sql\nSELECT 4\n``` more ```sql\nSELECT 5;\n```", "SELECT 5;"),
        ("```\nSELECT 6\n```", "SELECT 6"),
        ("```SQLite\nSELECT 7\n```", "SELECT 7"),
        ("  SELECT 8  \n", "SELECT 8"),
        ("<think>cut off</think><answer>SELECT 9 FROM", "SELECT 9 FROM"),
        ("<ans>SELECT 10</ans>", "<ans>SELECT 10</ans>"),
        ("", ""),
    ],
)
def test_extract_sql(completion, sql):
    assert extract_sql(completion) == sql


def test_extract_sql_custom_tag():
    assert extract_sql("<sql>SELECT 1</sql><answer>no</answer>", answer_tag="sql") == "SELECT 1"


@pytest.mark.parametrize(
    "completion,ok",
    [
        ("<think>reason</think><answer>SELECT 1</answer>", True),
        ("  <think>a\nb</think>\n\n<answer>\nSELECT 1\n</answer>\n", True),
        ("<think></think><answer>SELECT 1</answer>", True),
        ("<think>a</think><answer>  </answer>", False),
        ("<answer>SELECT 1</answer>", False),
        ("<think>a</think>", False),
        ("preamble <think>a</think><answer>x</answer>", False),
        ("<think>a</think><answer>x</answer> trailing", False),
        ("<think>a</think><answer>x</answer><answer>y</answer>", False),
        ("<think>a<think>b</think><answer>x</answer>", False),
        ("<answer>x</answer><think>a</think>", False),
    ],
)
def test_format_ok(completion, ok):
    assert format_ok(completion) is ok


def test_format_ok_custom_tags():
    assert format_ok("<reasoning>r</reasoning><sql>SELECT 1</sql>", think_tag="reasoning", answer_tag="sql")
    assert not format_ok("<think>r</think><answer>SELECT 1</answer>", think_tag="reasoning", answer_tag="sql")


@pytest.mark.parametrize(
    "sql,ok",
    [
        ("WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a) SELECT x FROM b", True),
        ("with step1 as (select name from people) select count(*) from step1;", True),
        ("WITH a AS (SELECT 1) SELECT * FROM a UNION SELECT 2", True),
        ("SELECT 1", False),
        ("SELECT * FROM (WITH a AS (SELECT 1) SELECT * FROM a)", False),
        ("WITH a AS (SELECT 1) SELECT * FROM a; SELECT 2", False),
        ("WITH a AS (SELEC 1) SELECT", False),
        ("", False),
    ],
)
def test_cocte_format_ok(sql, ok):
    assert cocte_format_ok(sql) is ok
