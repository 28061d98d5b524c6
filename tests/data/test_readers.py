"""Readers on small hand-made files: layouts, bad input, skip_bad."""

import json
import sqlite3
import warnings

import pytest

from data.readers import READERS, read_examples
from data.readers.temptabqa import mysql_to_sqlite, parse_context
from data.readers.wikitq import _unescape
from data.records import MalformedRecord
from jaxsql.errors import JaxsqlError


def _db(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a INT)")
    conn.commit()
    conn.close()
    return path


def test_jsonl_relative_paths_and_errors(tmp_path):
    _db(tmp_path / "d.sqlite")
    good = {"id": "1", "db_path": "d.sqlite", "question": "q?", "gold_sql": "SELECT 1"}
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "2", "gold_answers": ["1"]}) + "\n")
    exs = read_examples("jsonl", f)
    assert [e.id for e in exs] == ["1", "2"] and exs[0].db_path == str((tmp_path / "d.sqlite").resolve())
    f.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "db_path": "gone.sqlite"}) + "\n")
    with pytest.raises(MalformedRecord, match=r"x\.jsonl:2: invalid JSON"):
        read_examples("jsonl", f)
    with pytest.warns(UserWarning, match=r"skipped 2 bad row\(s\)"):
        exs = read_examples("jsonl", f, skip_bad=True)
    assert [e.id for e in exs] == ["1"]
    f.write_text(json.dumps({**good, "colour": "red"}) + "\n")
    with pytest.raises(MalformedRecord, match=r"x\.jsonl:1: unknown field"):
        read_examples("jsonl", f)
    with pytest.raises(JaxsqlError, match="not found"):
        read_examples("jsonl", tmp_path / "missing.jsonl")
    with pytest.raises(JaxsqlError, match="unknown data source 'csv'"):
        read_examples("csv", f)


def test_spider_and_bird_layouts(tmp_path):
    sp = tmp_path / "spider"
    _db(sp / "database" / "a" / "a.sqlite")
    (sp / "dev.json").write_text(json.dumps([{"db_id": "a", "question": "q", "query": "SELECT a FROM t"},
                                             {"db_id": "b", "question": "q2", "query": "SELECT 1"}]))
    with pytest.raises(MalformedRecord, match=r"dev\.json item 1: database not found"):
        read_examples("spider", sp)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert len(read_examples("spider", sp, skip_bad=True)) == 1
    assert len(read_examples("spider", sp, require_databases=False)) == 2
    bird = tmp_path / "bird"
    _db(bird / "dev_databases" / "a" / "a.sqlite")
    (bird / "dev.json").write_text(json.dumps([{"question_id": 7, "db_id": "a", "question": "q", "SQL": "SELECT 1",
                                                "evidence": "e = mc2", "difficulty": "simple"}]))
    (ex,) = read_examples("bird", bird)
    assert (ex.id, ex.evidence, ex.difficulty, ex.gold_sql) == ("bird-dev-7", "e = mc2", "simple", "SELECT 1")


def test_text2sql_substitution(tmp_path):
    _db(tmp_path / "geo.sqlite")
    entry = {"query-split": "test", "sql": ['SELECT a FROM t WHERE b = "city_name0" AND c = "state_name0" ;'],
             "variables": [{"name": "city_name0", "example": "x"}, {"name": "state_name0", "example": "ohio"}],
             "sentences": [{"question-split": "train", "text": "people in city_name0",
                            "variables": {"city_name0": "o'hare"}}]}
    (tmp_path / "geo.json").write_text(json.dumps([entry]))
    (ex,) = read_examples("geoquery", tmp_path / "geo.json")
    assert ex.question == "people in o'hare"
    assert ex.gold_sql == "SELECT a FROM t WHERE b = 'o''hare' AND c = 'ohio'"
    assert read_examples("geoquery", tmp_path / "geo.json", split="test", split_kind="query")[0].difficulty == "test"
    assert read_examples("geoquery", tmp_path / "geo.json", split="test") == []


def test_wikitq_escapes_and_bad_row(tmp_path):
    assert _unescape(r"a\pb\nc\\d") == "a|b\nc\\d"
    _db(tmp_path / "db" / "1_2.db")
    (tmp_path / "pristine-unseen-tables.tsv").write_text(
        "id\tutterance\tcontext\ttargetValue\nnu-0\thow many?\tcsv/1-csv/2.csv\t3|4\nnu-1\tbad\tnowhere\tx\n")
    with pytest.raises(MalformedRecord, match=r"tsv:3: context 'nowhere'"):
        read_examples("wikitq", tmp_path)
    with pytest.warns(UserWarning):
        (ex,) = read_examples("wikitq", tmp_path, skip_bad=True)
    assert ex.gold_answers == ("3", "4") and ex.gold_sql is None


def test_temptabqa_builder_pieces(tmp_path):
    ddl = mysql_to_sqlite("USE x;\nDROP TABLE IF EXISTS A;\nCREATE TABLE A (\n a_id INT AUTO_INCREMENT PRIMARY KEY,"
                          "\n name VARCHAR(10) NOT NULL\n) ENGINE=InnoDB;")
    assert ddl == "CREATE TABLE A (\n a_id INTEGER PRIMARY KEY,\n name VARCHAR(10) NOT NULL\n);\n"
    ctx = ("Ann Lee\n\nPersonal Information\nBirth Date\n1990-2-3\t\n\nCountry Representing: X\nWorld Cup\n"
           "Singles\tMedalGold | 2010 | Rome, MedalSilver | 2012 | Kuala Lumpur, Malaysia\nTeam \tMedalBronze | 2011 | Oslo\n\n"
           "Asian Games\nDoubles\tMedalGold | 2014 | Incheon\n")
    parsed = parse_context(ctx)
    assert parsed["name"] == "Ann Lee" and parsed["birth"] == (1990, 2, 3)
    assert parsed["tournaments"] == [
        ("World Cup", [("Singles", [("MedalGold", 2010, "Rome"), ("MedalSilver", 2012, "Kuala Lumpur, Malaysia")]),
                       ("Team", [("MedalBronze", 2011, "Oslo")])]),
        ("Asian Games", [("Doubles", [("MedalGold", 2014, "Incheon")])]),
    ]
    with pytest.raises(JaxsqlError, match="db_dir is required"):
        read_examples("temptabqa_c", _temptabqa_dir(tmp_path, ctx))
    src = _temptabqa_dir(tmp_path, ctx)
    (ex,) = read_examples("temptabqa_c", src, db_dir=tmp_path / "built")
    assert ex.gold_answers == ("2",) and ex.difficulty == "type13"
    conn = sqlite3.connect(ex.db_path)
    assert conn.execute("SELECT COUNT(*) FROM Medal m JOIN Format f ON m.format_id = f.format_id "
                        "JOIN Tournament t ON f.tournament_id = t.tournament_id WHERE m.type = 'MedalGold'").fetchone() == (2,)
    assert sorted(p.name for p in src.iterdir()) == ["dev_set.tsv", "schema.sql"]


def _temptabqa_dir(tmp_path, ctx):
    src = tmp_path / "tt"
    src.mkdir(exist_ok=True)
    (src / "schema.sql").write_text(
        "CREATE TABLE Athlete (athlete_id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL);"
        "CREATE TABLE Tournament (tournament_id INT AUTO_INCREMENT PRIMARY KEY, athlete_id INT, name VARCHAR(100));"
        "CREATE TABLE Format (format_id INT AUTO_INCREMENT PRIMARY KEY, tournament_id INT, name VARCHAR(100));"
        "CREATE TABLE Medal (medal_id INT AUTO_INCREMENT PRIMARY KEY, format_id INT, type VARCHAR(50), year INT,"
        " location VARCHAR(100));"
        "CREATE TABLE PersonalInformation (info_id INT AUTO_INCREMENT PRIMARY KEY, athlete_id INT, birth_year INT,"
        " birth_month INT, birth_day INT);")
    quoted = '"' + ctx.replace('"', '""') + '"'
    (src / "dev_set.tsv").write_text("Types\tQuestions\tAnswers\tPlayerName\tContext\n"
                                     f"13\tHow many Gold Medals did Ann Lee win ?\t2\tAnn Lee\t{quoted}\n")
    return src


def test_registry_complete():
    assert {"spider", "bird", "geoquery", "wikitq", "temptabqa_c", "jsonl"} <= set(READERS)
