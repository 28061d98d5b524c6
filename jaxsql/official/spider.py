"""Spider test-suite execution match (``eval_exec_match``), exactly, in bounded time.

Source: taoyds/test-suite-sql-eval, ``exec_eval.py`` (last changed in
14784c3546b8aac64dc6ce018ce923bc5efbc75d) and ``parse.py`` (``remove_distinct``),
at e97acc546ecbee8fa27fa8dbf025ef61493a876c. What it computes:

1. ``evaluation.py`` reads each prediction with ``p_str.replace("value", "1")``
   (`prediction_text`: every ``value`` substring, identifiers included). Both
   queries are then rewritten before they run: ``'> ='``, ``'< ='``, ``'! ='``
   lose their space (``postprocess``); unless ``keep_distinct`` (off by
   default in ``evaluation.py``), every token ``DISTINCT`` is dropped and only
   the *first statement* is kept (``remove_distinct`` joins the tokens of
   ``sqlparse.parse(s)[0]``); at execution ``YEAR(CURDATE())`` becomes ``2020``.
2. Row order counts when the text ``order by`` occurs anywhere in the
   lower-cased (rewritten) gold query -- also inside a subquery or a string.
3. ``result_eq(gold, pred, order_matters)``: two empty results are equal;
   otherwise the row counts and the column counts (of the first rows) must be
   equal, the rows with their values sorted by ``str(v) + str(type(v))`` must
   be equal (as lists when order matters, as sets otherwise), and there must
   be ONE column permutation under which the predicted rows equal the gold
   rows: as lists when order matters, as bags (multisets) otherwise. Values
   compare exactly (``1 == 1.0``, ``'1' != 1``).
4. The prediction must match on every ``*.sqlite`` database in the gold
   database's folder (the test suite); a failing prediction is wrong.

The released code enumerates column permutations (pruned by 20 random rows),
which is exponential in the number of columns. Here the ordered case is
decided exactly in linear time (the multisets of column vectors must be
equal), and the bag case by a depth-first search over columns that checks
the bag of partial rows at every level and never retries a column identical
to one already tried; the search is capped at `MAX_SEARCH_STEPS` row visits
(`SearchCapped`), far above what a real result needs. ``remove_distinct``
uses sqlparse, whose lexer is slow (about 25 microseconds per token), so SQL
longer than `SQLPARSE_MAX_CHARS` that needs it raises `SearchCapped` too.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Any, Hashable, Sequence

from jaxsql.deadline import NEVER, Deadline

Rows = Sequence[Sequence[Any]]

#: Row visits the bag-semantics permutation search may spend before giving up.
MAX_SEARCH_STEPS = 2_000_000
#: Longest SQL text handed to sqlparse (``remove_distinct``).
SQLPARSE_MAX_CHARS = 20_000

_CUR_YEAR = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", flags=re.IGNORECASE)


class SearchCapped(Exception):
    """The exact answer needs more work than the documented caps allow."""


def prediction_text(sql: str) -> str:
    """``evaluation.py``'s reading of a prediction: ``p_str.replace("value", "1")``."""
    return sql.replace("value", "1")


def postprocess(sql: str) -> str:
    """``exec_eval.postprocess``: ``'> ='`` -> ``'>='``, ``'< ='`` -> ``'<='``, ``'! ='`` -> ``'!='``."""
    return sql.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")


def remove_distinct(sql: str) -> str:
    """``parse.remove_distinct``: the first statement's tokens without those equal to ``distinct``.

    Raises ValueError for text with no statement (the released code raises
    IndexError there) and `SearchCapped` for text longer than
    `SQLPARSE_MAX_CHARS` that needs sqlparse.
    """
    if not sql.strip():
        raise ValueError("no SQL statement")
    if ";" not in sql and "GO" not in sql and "distinct" not in sql.lower():
        return sql  # one statement, no DISTINCT token: the token join is the text itself
    if len(sql) > SQLPARSE_MAX_CHARS:
        raise SearchCapped(f"remove_distinct: SQL longer than {SQLPARSE_MAX_CHARS} characters")
    from sqlparse import engine

    # sqlparse.parse without grouping: flatten() of a grouped statement yields the same leaves.
    first = next(iter(engine.FilterStack().run(sql)), None)
    if first is None:
        raise ValueError("no SQL statement")
    return "".join(t.value for t in first.flatten() if t.value.lower() != "distinct")


def replace_cur_year(sql: str) -> str:
    """``exec_eval.replace_cur_year``: ``YEAR(CURDATE())`` -> ``2020`` (applied when a query runs)."""
    return _CUR_YEAR.sub("2020", sql)


def prepare_sql(sql: str, keep_distinct: bool = False) -> str:
    """The text ``eval_exec_match`` compares (``order by`` is looked for in the gold's)."""
    sql = postprocess(sql)
    return sql if keep_distinct else remove_distinct(sql)


def executed_sql(sql: str, keep_distinct: bool = False) -> str:
    """The text the test suite actually executes: `prepare_sql` then `replace_cur_year`."""
    return replace_cur_year(prepare_sql(sql, keep_distinct))


def order_matters(prepared_gold_sql: str) -> bool:
    """``'order by' in g_str.lower()`` on the prepared gold query."""
    return "order by" in prepared_gold_sql.lower()


def test_suite_databases(db_path: str | os.PathLike) -> list[str]:
    """The database, then every other file with ``.sqlite`` in its name in its folder, sorted (the test suite)."""
    own = Path(db_path)
    try:
        names = sorted(n for n in os.listdir(own.parent) if ".sqlite" in n)
    except OSError:
        return [str(db_path)]
    others = [str(own.parent / n) for n in names if n != own.name]
    return [str(db_path)] + others


def _unorder_row(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(sorted(row, key=lambda x: str(x) + str(type(x))))


def _quick_rej(gold: Rows, pred: Rows, ordered: bool) -> bool:
    s1 = [_unorder_row(r) for r in gold]
    s2 = [_unorder_row(r) for r in pred]
    return s1 == s2 if ordered else set(s1) == set(s2)


def result_eq(gold: Rows, pred: Rows, ordered: bool, *, deadline: Deadline = NEVER,
              max_steps: int = MAX_SEARCH_STEPS) -> bool:
    """``exec_eval.result_eq(gold, pred, order_matters)``: is there a column permutation of
    `pred` equal to `gold` (as lists of rows when `ordered`, as bags otherwise)?

    Raises `SearchCapped` when the bag search needs more than `max_steps` row
    visits, and `jaxsql.deadline.ScoringTimeout` past `deadline`.
    """
    if len(gold) == 0 and len(pred) == 0:
        return True
    if len(gold) != len(pred):
        return False
    ncols = len(gold[0])
    if len(pred[0]) != ncols:
        return False
    if not _quick_rej(gold, pred, ordered):
        return False
    gold = [tuple(r) for r in gold]
    pred = [tuple(r) for r in pred]
    if ncols == 1:
        return gold == pred if ordered else collections.Counter(gold) == collections.Counter(pred)
    gold_cols = list(zip(*gold))
    pred_cols = list(zip(*pred))
    if ordered:
        # Permuted rows equal as lists <=> each gold column equals its pred column as a vector.
        return collections.Counter(gold_cols) == collections.Counter(pred_cols)
    return _bag_permutation_exists(gold, gold_cols, pred, pred_cols, deadline, max_steps)


def _column_signature(col: Sequence[Any]) -> Hashable:
    return frozenset(collections.Counter(col).items())


def _bag_permutation_exists(gold: list[tuple], gold_cols: list[tuple], pred: list[tuple],
                            pred_cols: list[tuple], deadline: Deadline, max_steps: int) -> bool:
    """Depth-first search for a column permutation making the bags of rows equal."""
    ncols, nrows = len(gold_cols), len(gold)
    gold_sig = [_column_signature(c) for c in gold_cols]
    pred_sig = [_column_signature(c) for c in pred_cols]
    if collections.Counter(gold_sig) != collections.Counter(pred_sig):
        return False  # no bijection maps each column to one with the same values
    candidates = [[j for j in range(ncols) if pred_sig[j] == gold_sig[i]] for i in range(ncols)]
    order = sorted(range(ncols), key=lambda i: len(candidates[i]))  # most constrained first
    # Identical predicted columns give identical subtrees: try one of each.
    first_index = {c: k for k, c in enumerate(dict.fromkeys(pred_cols))}
    col_id = [first_index[c] for c in pred_cols]
    # Bags of gold partial rows along `order`; a partial row is a nested pair (prefix, value).
    gold_bags = []
    keys: list[Any] = [()] * nrows
    for i in order:
        keys = [(k, v) for k, v in zip(keys, gold_cols[i])]
        gold_bags.append(collections.Counter(keys))
    steps = 0
    used = [False] * ncols
    # Iterative depth-first search (up to 2,000 columns: no recursion). A frame is
    # [depth, partial rows, next candidate, ids tried at this depth, column chosen].
    stack: list[list[Any]] = [[0, [()] * nrows, 0, set(), None]]
    while stack:
        frame = stack[-1]
        depth, pred_keys, idx, tried, chosen = frame
        if chosen is not None:  # back from a failed child: free its column
            used[chosen] = False
            frame[4] = None
        if depth == ncols:
            return True
        cands = candidates[order[depth]]
        child = None
        while idx < len(cands):
            j = cands[idx]
            idx += 1
            if used[j] or col_id[j] in tried:
                continue
            tried.add(col_id[j])
            steps += nrows
            if steps > max_steps:
                raise SearchCapped(f"column-permutation search passed {max_steps} row visits")
            deadline.check()
            keys = [(k, v) for k, v in zip(pred_keys, pred_cols[j])]
            if collections.Counter(keys) == gold_bags[depth]:
                child = (j, keys)
                break
        frame[2] = idx
        if child is None:
            stack.pop()
            continue
        used[child[0]] = True
        frame[4] = child[0]
        stack.append([depth + 1, child[1], 0, set(), None])
    return False
