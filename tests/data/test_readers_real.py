"""Readers on the real benchmark data in ../shared/data (skipped when absent)."""

import sqlite3

import pytest

from data.readers import read_examples
from data.readers.spider import read_spider_schemas
from data.readers.wikitq import wikitq_column_comments
from data.schema import serialize_schema, tables_in_sql
from jaxsql.sql.sandbox import execute


def test_geoquery_877_and_gold_executes(real_data):
    examples = read_examples("geoquery", real_data / "geoquery")
    assert len(examples) == 877
    assert not any("state_name0" in e.question or "state_name0" in e.gold_sql for e in examples)
    ok = sum(execute(e.db_path, e.gold_sql, timeout_s=5.0, max_rows=100_000).ok for e in examples)
    print(f"geoquery gold SQL executes: {ok}/877")
    assert ok / 877 >= 0.95
    q = read_examples("geoquery", real_data / "geoquery", split="train", split_kind="question")
    qq = read_examples("geoquery", real_data / "geoquery", split="train", split_kind="query")
    assert (len(q), len(qq)) == (549, 536)
    first = examples[0]
    assert first.question == "what is the biggest city in arizona" and "'arizona'" in first.gold_sql


def test_wikitq_4344_and_every_database_opens(real_data):
    examples = read_examples("wikitq", real_data / "wikitq")
    assert len(examples) == 4344
    assert examples[0].gold_answers == ("Italy",) and examples[0].db_path.endswith("db/203_733.db")
    assert any(len(e.gold_answers) > 1 for e in examples)
    dbs = sorted({e.db_path for e in examples})
    for db in dbs:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert conn.execute("SELECT COUNT(*) FROM w").fetchone()[0] >= 0
        conn.close()
    comments = wikitq_column_comments(examples[0].db_path)
    schema = serialize_schema(examples[0].db_path, column_comments=comments)
    assert "c2 TEXT,  -- cyclist (" in schema and "c2_first TEXT,  -- cyclist (first)" in schema


def test_temptabqa_published_sql_reproduction(real_data, tmp_path):
    from data.temptabqa_check import check_reproduction

    examples = read_examples("temptabqa_c", real_data / "temptabqa_c", db_dir=tmp_path)
    assert len(examples) == 282
    assert len({e.db_path for e in examples}) == 198
    conn = sqlite3.connect(examples[0].db_path)
    medals = conn.execute("SELECT COUNT(*) FROM Medal").fetchone()[0]
    assert conn.execute("SELECT name FROM Athlete").fetchone() == ("Linda Efler",)
    assert conn.execute("SELECT birth_year, birth_month, birth_day FROM PersonalInformation").fetchone() == (1995, 1, 23)
    assert medals == 10  # 1 + 1 + 4 + 4, counted by hand from the infobox
    per_tournament = conn.execute(
        "SELECT t.name, COUNT(*) FROM Medal m JOIN Format f ON m.format_id = f.format_id "
        "JOIN Tournament t ON f.tournament_id = t.tournament_id GROUP BY t.tournament_id ORDER BY t.tournament_id"
    ).fetchall()
    assert per_tournament == [("European Games", 1), ("European Championships", 1),
                              ("European Mixed Team Championships", 4), ("European Women", 4)]
    assert conn.execute("SELECT type, year, location FROM Medal WHERE medal_id = 1").fetchone() == \
        ("MedalBronze", 2023, "Kraków")
    report = check_reproduction(real_data / "temptabqa_c", tmp_path, split="dev")
    print(f"TempTabQA-C dev: published SQL reproduces {report.reproduced}/{report.total} "
          f"= {report.fraction:.3f} (executed {report.executed})")
    assert report.total == 282 and report.executed == 282
    assert report.fraction >= 0.80
    # Nothing was written into the source directory.
    assert not list((real_data / "temptabqa_c").glob("*.sqlite"))


def test_spider_questions_and_schemas(real_data):
    examples = read_examples("spider", real_data / "spider", require_databases=False)
    assert len(examples) == 1034
    schemas = read_spider_schemas(real_data / "spider" / "tables.json")
    assert len(schemas) == 166
    for db_id, tables in schemas.items():
        text = serialize_schema(tables)
        conn = sqlite3.connect(":memory:")
        conn.executescript(text)  # every serialised schema is valid DDL
        conn.close()
    ex = examples[0]
    db_id = ex.db_path.split("/")[-2]
    keep = tables_in_sql(ex.gold_sql)
    assert keep and keep <= {t.name.lower() for t in schemas[db_id]}
    with pytest.raises(Exception, match="--no-databases"):
        read_examples("spider", real_data / "spider")
