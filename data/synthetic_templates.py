"""Domains and question templates of the synthetic benchmark (see `data.synthetic`).

Every domain has the same shape, so one template serves all domains:

    entity(id, <name>, <cat>, <num1>, <num2>)
    related(id, <fk> -> entity.id, <text>, <num>)

A template is SQL and several English phrasings with placeholders. Schema
placeholders: ``{T}`` entity table, ``{N}`` name column, ``{C}`` category
column, ``{X}`` a numeric column (one of two), ``{R}`` related table, ``{FK}``,
``{RC}`` related text column, ``{RX}`` related numeric column. Words: ``{e}``
/ ``{es}`` entity singular/plural, ``{nw}``, ``{cw}``, ``{xw}``, ``{rs}``,
``{rcw}``, ``{rxw}``, and plurals ``{nws}``, ``{cws}``, ``{rcws}``. Values: ``{v}`` a category value, ``{n}`` a number,
``{lo}``/``{hi}``, ``{name}`` an entity name, ``{r}`` a related text value,
``{k}`` a LIMIT, ``{m}`` a HAVING count.

Levels (the difficulty knob): 1 = selection, filters, aggregates on one table;
2 = adds GROUP BY / HAVING / ORDER BY / LIMIT / DISTINCT; 3 = adds joins and
nested queries.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NumColumn:
    name: str
    word: str
    lo: int
    hi: int


@dataclasses.dataclass(frozen=True)
class Domain:
    """One database shape; value pools are split into train and dev halves."""

    name: str
    table: str
    e: str
    es: str
    name_col: str
    name_word: str
    cat_col: str
    cat_word: str
    cat_pool: tuple[str, ...]
    nums: tuple[NumColumn, NumColumn]
    related: str
    rs: str
    fk: str
    rel_text: str
    rel_text_word: str
    rel_text_pool: tuple[str, ...]
    rel_num: NumColumn
    name_style: str  # "word" (capitalised invented word) or "code" (e.g. "KX42")


DOMAINS: tuple[Domain, ...] = (
    Domain(
        name="shop", table="product", e="product", es="products",
        name_col="name", name_word="name", cat_col="category", cat_word="category",
        cat_pool=("toys", "books", "games", "tools", "shoes", "lamps", "pens", "bags", "cups", "hats",
                  "rugs", "maps"),
        nums=(NumColumn("price", "price", 5, 99), NumColumn("stock", "stock", 0, 60)),
        related="sale", rs="sales", fk="product_id", rel_text="store", rel_text_word="store",
        rel_text_pool=("north", "south", "east", "west", "harbor", "airport", "central", "market",
                       "river", "plaza"),
        rel_num=NumColumn("qty", "quantity", 1, 20), name_style="word",
    ),
    Domain(
        name="school", table="student", e="student", es="students",
        name_col="name", name_word="name", cat_col="city", cat_word="city",
        cat_pool=("paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar",
                  "hanoi", "sofia", "perth"),
        nums=(NumColumn("age", "age", 10, 19), NumColumn("score", "score", 30, 99)),
        related="exam", rs="exams", fk="student_id", rel_text="subject", rel_text_word="subject",
        rel_text_pool=("math", "art", "music", "history", "biology", "physics", "latin", "drama",
                       "chess", "poetry"),
        rel_num=NumColumn("mark", "mark", 1, 10), name_style="word",
    ),
    Domain(
        name="flights", table="flight", e="flight", es="flights",
        name_col="code", name_word="code", cat_col="origin", cat_word="origin",
        cat_pool=("boston", "denver", "dallas", "miami", "austin", "seattle", "chicago", "phoenix",
                  "atlanta", "detroit", "memphis", "orlando"),
        nums=(NumColumn("fare", "fare", 50, 499), NumColumn("seats", "seats", 20, 199)),
        related="ticket", rs="tickets", fk="flight_id", rel_text="class", rel_text_word="class",
        rel_text_pool=("economy", "business", "first", "premium", "basic", "saver", "flex", "plus",
                       "comfort", "elite"),
        rel_num=NumColumn("bags", "bags", 0, 4), name_style="code",
    ),
    Domain(
        name="library", table="book", e="book", es="books",
        name_col="title", name_word="title", cat_col="genre", cat_word="genre",
        cat_pool=("poetry", "crime", "fantasy", "horror", "romance", "history", "science", "travel",
                  "comics", "cooking", "drama", "sports"),
        nums=(NumColumn("pages", "pages", 80, 899), NumColumn("year", "year", 1950, 2020)),
        related="loan", rs="loans", fk="book_id", rel_text="member", rel_text_word="member",
        rel_text_pool=("anna", "ben", "carl", "dora", "emil", "fay", "gus", "hana", "ivan", "jade",
                       "kofi", "lena"),
        rel_num=NumColumn("days", "days", 1, 30), name_style="word",
    ),
)


@dataclasses.dataclass(frozen=True)
class Template:
    """A question shape: gold SQL pattern and English phrasings."""

    id: str
    level: int
    sql: str
    phrasings: tuple[str, ...]


def _t(id: str, level: int, sql: str, *phrasings: str) -> Template:
    return Template(id, level, sql, tuple(phrasings))


TEMPLATES: tuple[Template, ...] = (
    # level 1: selection, filters, aggregates
    _t("list_names", 1, "SELECT {N} FROM {T}",
       "List the {nw} of every {e}.", "What are the {nws} of all {es}?", "Show all {e} {nws}."),
    _t("names_cat", 1, "SELECT {N} FROM {T} WHERE {C} = '{v}'",
       "Which {es} have {cw} {v}?", "List the {nws} of {es} whose {cw} is {v}.",
       "Show {es} with {cw} {v}."),
    _t("names_gt", 1, "SELECT {N} FROM {T} WHERE {X} > {n}",
       "Which {es} have {xw} above {n}?", "List {es} whose {xw} is more than {n}.",
       "Show the {nws} of {es} with {xw} greater than {n}."),
    _t("names_lt", 1, "SELECT {N} FROM {T} WHERE {X} < {n}",
       "Which {es} have {xw} below {n}?", "List {es} whose {xw} is less than {n}.",
       "Show the {nws} of {es} with {xw} under {n}."),
    _t("count_all", 1, "SELECT COUNT(*) FROM {T}",
       "How many {es} are there?", "Count the {es}.", "What is the number of {es}?"),
    _t("count_cat", 1, "SELECT COUNT(*) FROM {T} WHERE {C} = '{v}'",
       "How many {es} have {cw} {v}?", "Count the {es} whose {cw} is {v}.",
       "What is the number of {es} with {cw} {v}?"),
    _t("count_gt", 1, "SELECT COUNT(*) FROM {T} WHERE {X} > {n}",
       "How many {es} have {xw} above {n}?", "Count {es} with {xw} more than {n}.",
       "What is the number of {es} whose {xw} exceeds {n}?"),
    _t("num_of_name", 1, "SELECT {X} FROM {T} WHERE {N} = '{name}'",
       "What is the {xw} of {name}?", "Give the {xw} of the {e} {name}.", "Show {name}'s {xw}."),
    _t("cat_of_name", 1, "SELECT {C} FROM {T} WHERE {N} = '{name}'",
       "What is the {cw} of {name}?", "Give the {cw} of the {e} {name}.", "Show {name}'s {cw}."),
    _t("max_num", 1, "SELECT MAX({X}) FROM {T}",
       "What is the highest {xw} of any {e}?", "Find the maximum {xw} among {es}.",
       "Show the largest {e} {xw}."),
    _t("min_num", 1, "SELECT MIN({X}) FROM {T}",
       "What is the lowest {xw} of any {e}?", "Find the minimum {xw} among {es}.",
       "Show the smallest {e} {xw}."),
    _t("avg_num", 1, "SELECT AVG({X}) FROM {T}",
       "What is the average {xw} of {es}?", "Find the mean {xw} over all {es}.",
       "Compute the average {e} {xw}."),
    _t("sum_num", 1, "SELECT SUM({X}) FROM {T}",
       "What is the total {xw} of all {es}?", "Find the sum of {xw} over {es}.",
       "Add up the {xw} of every {e}."),
    _t("avg_num_cat", 1, "SELECT AVG({X}) FROM {T} WHERE {C} = '{v}'",
       "What is the average {xw} of {es} with {cw} {v}?",
       "Find the mean {xw} of {es} whose {cw} is {v}.", "Average {xw} for {cw} {v}?"),
    _t("max_num_cat", 1, "SELECT MAX({X}) FROM {T} WHERE {C} = '{v}'",
       "What is the highest {xw} of {es} with {cw} {v}?",
       "Find the maximum {xw} among {es} whose {cw} is {v}.", "Largest {xw} for {cw} {v}?"),
    _t("names_cat_gt", 1, "SELECT {N} FROM {T} WHERE {C} = '{v}' AND {X} > {n}",
       "Which {es} with {cw} {v} have {xw} above {n}?",
       "List {es} whose {cw} is {v} and whose {xw} is more than {n}.",
       "Show {cw} {v} {es} with {xw} over {n}."),
    _t("names_between", 1, "SELECT {N} FROM {T} WHERE {X} BETWEEN {lo} AND {hi}",
       "Which {es} have {xw} between {lo} and {hi}?",
       "List {es} whose {xw} is from {lo} to {hi}.", "Show {es} with {xw} in {lo} to {hi}."),
    _t("names_not_cat", 1, "SELECT {N} FROM {T} WHERE {C} != '{v}'",
       "Which {es} do not have {cw} {v}?", "List {es} whose {cw} is not {v}.",
       "Show {es} with a {cw} other than {v}."),
    # level 2: grouping, ordering, limits
    _t("top1", 2, "SELECT {N} FROM {T} ORDER BY {X} DESC LIMIT 1",
       "Which {e} has the highest {xw}?", "Name the {e} with the largest {xw}.",
       "What {e} has the most {xw}?"),
    _t("bottom1", 2, "SELECT {N} FROM {T} ORDER BY {X} ASC LIMIT 1",
       "Which {e} has the lowest {xw}?", "Name the {e} with the smallest {xw}.",
       "What {e} has the least {xw}?"),
    _t("topk", 2, "SELECT {N} FROM {T} ORDER BY {X} DESC LIMIT {k}",
       "List the {k} {es} with the highest {xw}.", "Which {k} {es} have the largest {xw}?",
       "Top {k} {es} by {xw}?"),
    _t("sorted", 2, "SELECT {N} FROM {T} ORDER BY {X}",
       "List {es} sorted by {xw}.", "Show all {e} {nws} in order of increasing {xw}.",
       "Order the {es} by {xw}."),
    _t("count_per_cat", 2, "SELECT {C}, COUNT(*) FROM {T} GROUP BY {C}",
       "How many {es} are there for each {cw}?", "Count {es} per {cw}.",
       "For every {cw}, give the number of {es}."),
    _t("avg_per_cat", 2, "SELECT {C}, AVG({X}) FROM {T} GROUP BY {C}",
       "What is the average {xw} for each {cw}?", "Give the mean {xw} per {cw}.",
       "For every {cw}, show the average {xw}."),
    _t("cats_having", 2, "SELECT {C} FROM {T} GROUP BY {C} HAVING COUNT(*) > {m}",
       "Which {cws} have more than {m} {es}?", "List {cws} with over {m} {es}.",
       "Show each {cw} that has more than {m} {es}."),
    _t("distinct_cats", 2, "SELECT DISTINCT {C} FROM {T}",
       "What are the different {cws} of {es}?", "List the distinct {cws}.",
       "Show every {cw} used by some {e}."),
    _t("top_cat_count", 2, "SELECT {C} FROM {T} GROUP BY {C} ORDER BY COUNT(*) DESC LIMIT 1",
       "Which {cw} has the most {es}?", "Name the {cw} with the largest number of {es}.",
       "What is the most common {cw}?"),
    # level 3: joins and nesting
    _t("names_above_avg", 3, "SELECT {N} FROM {T} WHERE {X} > (SELECT AVG({X}) FROM {T})",
       "Which {es} have {xw} above the average?", "List {es} whose {xw} is higher than average.",
       "Show {es} with more than the mean {xw}."),
    _t("join_names_rel", 3,
       "SELECT DISTINCT {T}.{N} FROM {T} JOIN {R} ON {T}.id = {R}.{FK} WHERE {R}.{RC} = '{r}'",
       "Which {es} have {rs} with {rcw} {r}?", "List {es} that appear in {rs} of {rcw} {r}.",
       "Show the {nws} of {es} with a {rcw} {r} record."),
    _t("join_sum_name", 3,
       "SELECT SUM({R}.{RX}) FROM {R} JOIN {T} ON {T}.id = {R}.{FK} WHERE {T}.{N} = '{name}'",
       "What is the total {rxw} of {rs} for {name}?", "Sum the {rxw} over {rs} of {name}.",
       "Total {rxw} in {rs} of the {e} {name}?"),
    _t("join_count_per_name", 3,
       "SELECT {T}.{N}, COUNT(*) FROM {T} JOIN {R} ON {T}.id = {R}.{FK} GROUP BY {T}.{N}",
       "How many {rs} does each {e} have?", "Count the {rs} per {e}.",
       "For every {e}, give the number of {rs}."),
    _t("names_without_rel", 3,
       "SELECT {N} FROM {T} WHERE id NOT IN (SELECT {FK} FROM {R})",
       "Which {es} have no {rs}?", "List {es} without any {rs}.",
       "Show {es} that never appear in {rs}."),
    _t("names_rel_gt", 3,
       "SELECT {N} FROM {T} WHERE id IN (SELECT {FK} FROM {R} WHERE {RX} > {n})",
       "Which {es} have {rs} with {rxw} above {n}?",
       "List {es} with some {rs} whose {rxw} is more than {n}.",
       "Show {es} that have a {rxw} over {n} in {rs}."),
    _t("count_distinct_rel", 3, "SELECT COUNT(DISTINCT {RC}) FROM {R}",
       "How many different {rcws} appear in {rs}?", "Count the distinct {rcws} of {rs}.",
       "What is the number of unique {rcws} in {rs}?"),
    _t("top_rel_count", 3,
       "SELECT {T}.{N} FROM {T} JOIN {R} ON {T}.id = {R}.{FK} GROUP BY {T}.id ORDER BY COUNT(*) DESC LIMIT 1",
       "Which {e} has the most {rs}?", "Name the {e} with the largest number of {rs}.",
       "What {e} appears in the most {rs}?"),
    _t("join_cat_rel", 3,
       "SELECT DISTINCT {T}.{C} FROM {T} JOIN {R} ON {T}.id = {R}.{FK} WHERE {R}.{RC} = '{r}'",
       "Which {cws} have {rs} with {rcw} {r}?", "List the {cw} of {es} in {rs} of {rcw} {r}.",
       "Show {cws} of {es} with a {rcw} {r} record."),
)
