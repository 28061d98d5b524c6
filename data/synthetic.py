"""The bundled synthetic text-to-SQL benchmark: the embedded default, no download.

`generate_benchmark(out_dir, seed=...)` writes small SQLite databases in four
domains (shop, school, flights, library) and question/gold-SQL/gold-answer
examples from the templates in `data.synthetic_templates` (35 templates,
three phrasings each). Design choices, all aimed at a tiny model trained from
scratch on a CPU in minutes:

* short everything: two tables of 4-5 columns per database, 8-11 rows, SQL
  mostly under 40 tokens, so the compact schema fits in a short prompt;
* train and dev are disjoint in values: dev databases draw names, categories
  and related-table values from pools that train never uses, and numeric
  literals in questions are even in train and odd in dev, so a model must copy
  values from the question rather than memorise them;
* some (template, domain) combinations appear only in dev
  (`heldout_per_domain`), so dev measures composition, not recall;
* `max_level` is the difficulty knob: 1 = one-table selection, filters and
  aggregates; 2 = adds GROUP BY/HAVING/ORDER BY/LIMIT; 3 = adds joins and
  nested queries (default).

Example ids are ``synthetic-<split>-<index>-<template id>``. Gold answers are
the gold query's result cells flattened row by row, each
rendered with `str()`. Same seed, same bytes: the databases are serialised
from in-memory SQLite and the JSONL files store database paths relative to the
output directory (see `data.readers.jsonl`). `write_cocte_splits` adds the
same examples with gold SQL as chains of CTEs (Reward-SQL cold-start data).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
from pathlib import Path
from typing import Sequence

from data.records import Example
from data.synthetic_templates import DOMAINS, TEMPLATES, Domain, Template
from jaxsql.errors import JaxsqlError

MANIFEST = "synthetic.json"
_LEVEL_NAMES = {1: "easy", 2: "medium", 3: "hard"}
_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "to", "zu", "ne", "pi", "sa", "do", "ru", "fe", "li",
              "bo", "ta", "xi", "gu", "me", "no")


@dataclasses.dataclass(frozen=True)
class SyntheticBenchmark:
    """What `generate_benchmark` wrote: examples (absolute db paths) and databases."""

    train: list[Example]
    dev: list[Example]
    db_paths: dict[str, str]
    out_dir: str


@dataclasses.dataclass
class _Database:
    name: str
    domain: Domain
    split: str
    conn: sqlite3.Connection
    names: list[str]
    cats: list[str]
    rel_texts: list[str]


def _ddl(d: Domain) -> str:
    x1, x2 = d.nums
    return (
        f"CREATE TABLE {d.table} (id INTEGER PRIMARY KEY, {d.name_col} TEXT, {d.cat_col} TEXT, "
        f"{x1.name} INTEGER, {x2.name} INTEGER);\n"
        f"CREATE TABLE {d.related} (id INTEGER PRIMARY KEY, "
        f"{d.fk} INTEGER REFERENCES {d.table}(id), {d.rel_text} TEXT, {d.rel_num.name} INTEGER);\n"
    )


def _new_name(rng: random.Random, style: str, used: set[str]) -> str:
    while True:
        if style == "code":
            name = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2)) + str(rng.randint(10, 99))
        else:
            name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in used:
            used.add(name)
            return name


def _split_pool(pool: Sequence[str], split: str) -> list[str]:
    # Even positions feed train, odd positions dev: disjoint by construction.
    return list(pool[0::2] if split == "train" else pool[1::2])


def _build_database(name: str, d: Domain, split: str, rng: random.Random, used: set[str]) -> _Database:
    conn = sqlite3.connect(":memory:")
    conn.executescript(_ddl(d))
    n_rows = rng.randint(8, 11)
    cats = rng.sample(_split_pool(d.cat_pool, split), 4)
    names = [_new_name(rng, d.name_style, used) for _ in range(n_rows)]
    x1, x2 = d.nums
    rows = [(i + 1, names[i], rng.choice(cats), rng.randint(x1.lo, x1.hi), rng.randint(x2.lo, x2.hi))
            for i in range(n_rows)]
    conn.executemany(f"INSERT INTO {d.table} VALUES (?, ?, ?, ?, ?)", rows)
    # About a quarter of the entities get no related rows, so NOT IN has answers.
    with_rel = rng.sample(range(1, n_rows + 1), max(2, (3 * n_rows) // 4))
    rel_texts = rng.sample(_split_pool(d.rel_text_pool, split), 4)
    n_rel = rng.randint(12, 18)
    rel_rows = [(j + 1, rng.choice(with_rel), rng.choice(rel_texts), rng.randint(d.rel_num.lo, d.rel_num.hi))
                for j in range(n_rel)]
    conn.executemany(f"INSERT INTO {d.related} VALUES (?, ?, ?, ?)", rel_rows)
    conn.commit()
    return _Database(name, d, split, conn, names, sorted(set(r[2] for r in rows)), sorted(set(r[2] for r in rel_rows)))


def _literal(rng: random.Random, lo: int, hi: int, split: str) -> int:
    # Parity separates train (even) and dev (odd) numeric literals.
    want = 0 if split == "train" else 1
    n = rng.randint(lo, hi)
    return n if n % 2 == want else (n + 1 if n + 1 <= hi else n - 1)


def _plural(word: str) -> str:
    if word.endswith("y"):
        return word[:-1] + "ies"
    return word + ("es" if word.endswith("s") else "s")


def _fill(t: Template, db: _Database, rng: random.Random) -> tuple[str, str]:
    d = db.domain
    x = rng.choice(d.nums)
    spread = max(2, (x.hi - x.lo) // 4)
    lo = _literal(rng, x.lo, x.hi - spread, db.split)
    rel_n = _literal(rng, d.rel_num.lo, max(d.rel_num.lo, d.rel_num.hi - 1), db.split)
    n = rel_n if "{RX} >" in t.sql else _literal(rng, x.lo + spread, x.hi - spread, db.split)
    values = dict(
        T=d.table, N=d.name_col, C=d.cat_col, X=x.name, R=d.related, FK=d.fk, RC=d.rel_text,
        RX=d.rel_num.name, e=d.e, es=d.es, nw=d.name_word, cw=d.cat_word, xw=x.word, rs=d.rs,
        rcw=d.rel_text_word, rxw=d.rel_num.word, nws=_plural(d.name_word), cws=_plural(d.cat_word),
        rcws=_plural(d.rel_text_word), v=rng.choice(db.cats), n=n, lo=lo,
        hi=_literal(rng, lo + spread, x.hi, db.split), name=rng.choice(db.names),
        r=rng.choice(db.rel_texts), k=rng.choice((2, 3)), m=rng.choice((1, 2)),
    )
    return rng.choice(t.phrasings).format(**values), t.sql.format(**values)


def _answers(conn: sqlite3.Connection, sql: str) -> tuple[str, ...] | None:
    rows = conn.execute(sql).fetchall()
    cells = [c for row in rows for c in row]
    if not cells or any(c is None for c in cells):
        return None
    return tuple(str(c) for c in cells)


def _heldout(rng: random.Random, templates: Sequence[Template], per_domain: int) -> set[tuple[str, str]]:
    out = set()
    for d in DOMAINS:
        for t in rng.sample(list(templates), min(per_domain, len(templates))):
            out.add((t.id, d.name))
    return out


def _examples(split: str, n: int, dbs: list[_Database], templates: Sequence[Template],
              heldout: set[tuple[str, str]], rng: random.Random) -> list[tuple[Example, str]]:
    out: list[tuple[Example, str]] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise JaxsqlError(f"synthetic benchmark: could not generate {n} distinct {split} examples; "
                              f"lower the count or raise max_level")
        db = rng.choice(dbs)
        combos = list(templates) if split == "dev" else \
            [t for t in templates if (t.id, db.domain.name) not in heldout]
        t = rng.choice(combos)
        question, sql = _fill(t, db, rng)
        answers = _answers(db.conn, sql)
        # Dev questions are distinct so that its accuracy counts different questions.
        if answers is None or (split == "dev" and (db.name, question) in seen):
            continue
        seen.add((db.name, question))
        ex = Example(id=f"synthetic-{split}-{len(out):05d}-{t.id}", db_path=db.name + ".sqlite", question=question,
                     gold_sql=sql, gold_answers=answers, difficulty=_LEVEL_NAMES[t.level], source="synthetic")
        out.append((ex, t.id))
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def generate_benchmark(out_dir: str | Path, *, seed: int = 0, n_train: int = 2000, n_dev: int = 300,
                       max_level: int = 3, train_dbs_per_domain: int = 3, dev_dbs_per_domain: int = 1,
                       heldout_per_domain: int = 3) -> SyntheticBenchmark:
    """Write the synthetic benchmark into `out_dir` and return its examples.

    Files: ``<domain>_<split><i>.sqlite`` databases, ``train.jsonl``, ``dev.jsonl``
    (one `Example.to_dict()` per line, db paths relative to `out_dir`) and
    ``synthetic.json`` (the parameters). Rerunning with the same arguments
    rewrites identical bytes; a directory holding other files of those names is
    refused.

    Args:
      out_dir: output directory (created if missing).
      seed: everything (values, databases, template choices) derives from it.
      n_train, n_dev: number of examples per split.
      max_level: difficulty knob, 1..3 (see module docstring).
      train_dbs_per_domain, dev_dbs_per_domain: databases per domain and split.
      heldout_per_domain: templates per domain that occur only in dev.
    """
    if max_level not in (1, 2, 3):
        raise JaxsqlError(f"synthetic benchmark: max_level must be 1, 2 or 3, got {max_level}")
    if n_train < 1 or n_dev < 1 or train_dbs_per_domain < 1 or dev_dbs_per_domain < 1:
        raise JaxsqlError("synthetic benchmark: counts must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own_dir = (out / MANIFEST).exists()
    rng = random.Random(seed)
    templates = [t for t in TEMPLATES if t.level <= max_level]
    used: set[str] = set()
    dbs: dict[str, list[_Database]] = {"train": [], "dev": []}
    for d in DOMAINS:
        for split, count in (("train", train_dbs_per_domain), ("dev", dev_dbs_per_domain)):
            for i in range(count):
                dbs[split].append(_build_database(f"{d.name}_{split}{i}", d, split, rng, used))
    heldout = _heldout(rng, templates, heldout_per_domain)
    train = _examples("train", n_train, dbs["train"], templates, heldout, rng)
    dev = _examples("dev", n_dev, dbs["dev"], templates, heldout, rng)

    manifest = {"generator": "jaxsql-synthetic", "seed": seed, "n_train": n_train, "n_dev": n_dev,
                "max_level": max_level, "train_dbs_per_domain": train_dbs_per_domain,
                "dev_dbs_per_domain": dev_dbs_per_domain, "heldout_per_domain": heldout_per_domain,
                "heldout": sorted(f"{t}@{d}" for t, d in heldout)}
    files: dict[str, bytes] = {}
    for db in dbs["train"] + dbs["dev"]:
        files[db.name + ".sqlite"] = db.conn.serialize()
        db.conn.close()
    for split, rows in (("train", train), ("dev", dev)):
        files[f"{split}.jsonl"] = "".join(json.dumps(ex.to_dict(), sort_keys=True) + "\n"
                                          for ex, _ in rows).encode()
    for name in files:
        if (out / name).exists() and not own_dir and (out / name).read_bytes() != files[name]:
            raise JaxsqlError(f"{out / name} exists and was not written by the synthetic generator; "
                              f"choose an empty output directory")
    _write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    for name, data in files.items():
        _write_bytes(out / name, data)

    def absolute(rows: list[tuple[Example, str]]) -> list[Example]:
        return [dataclasses.replace(ex, db_path=str((out / ex.db_path).resolve())) for ex, _ in rows]

    db_paths = {db.name: str((out / (db.name + ".sqlite")).resolve()) for db in dbs["train"] + dbs["dev"]}
    return SyntheticBenchmark(train=absolute(train), dev=absolute(dev), db_paths=db_paths,
                              out_dir=str(out.resolve()))


def load_benchmark(out_dir: str | Path) -> SyntheticBenchmark:
    """Read back a benchmark written by `generate_benchmark` (db paths made absolute)."""
    from data.readers.jsonl import read_jsonl

    out = Path(out_dir)
    if not (out / MANIFEST).exists():
        raise JaxsqlError(f"{out}: no {MANIFEST}; not a synthetic benchmark directory")
    train = read_jsonl(out / "train.jsonl")
    dev = read_jsonl(out / "dev.jsonl")
    db_paths = {p.stem: str(p.resolve()) for p in sorted(out.glob("*.sqlite"))}
    return SyntheticBenchmark(train=train, dev=dev, db_paths=db_paths, out_dir=str(out.resolve()))


def write_cocte_splits(bench: SyntheticBenchmark) -> dict[str, dict]:
    """Write ``train.cocte.jsonl`` and ``dev.cocte.jsonl`` beside the benchmark: every example
    with its gold SQL converted to a chain of CTEs (`data.cocte`, checked by execution;
    queries with nothing to lift stay one step). Returns each split's conversion report."""
    from data.cocte import cocte_examples, convert_examples, write_jsonl
    from jaxsql.sql import SqlPool

    out = Path(bench.out_dir)
    reports = {}
    with SqlPool() as pool:
        for split, examples in (("train", bench.train), ("dev", bench.dev)):
            report = convert_examples(examples, pool)
            written = write_jsonl(cocte_examples(report), out / f"{split}.cocte.jsonl", relative_to=out)
            reports[split] = {"written": written, **report.to_json()}
    return reports
