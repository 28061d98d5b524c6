"""WikiTableQuestions denotation accuracy: the official evaluator's semantics, in n log n time.

Source: the official ``evaluator.py`` version 1.0.2 of the WikiTableQuestions
release (Pasupat & Liang 2015; ppasupat/WikiTableQuestions; the copy read is
the one shipped with SQUALL-based code, identical in ``normalize``,
``NumberValue``, ``DateValue``, ``StringValue``, ``to_value``, ``to_value_list``
and ``check_denotation``). It is Python 2 code; where Python 3 would differ the
Python 2 behaviour is kept (``\\d`` is ASCII; ``int`` takes no ``_``).

- Every value is normalised (`normalize`): accents removed, quotes and dashes
  unified, trailing citations ``[1]``/``•♦†‡*#+`` and parentheses `` (...)``
  and outer quotes removed repeatedly, a final ``.`` dropped, whitespace
  collapsed, lower case.
- A PREDICTED string is a number when Python's ``int`` or ``float`` reads it
  (not nan/inf), a date when it reads as ``yyyy-mm-dd`` (``xx`` for unknown
  parts; a year alone becomes the number), else a string.
- A GOLD string is typed by its canonical form (``targetCanon`` of the
  CoreNLP-tagged release files), so ``17 years`` is the number 17 and
  ``January 4, 1994`` the date 1994-01-04. `canonical_form` reproduces how
  SEMPRE's ``TableValuePreprocessor`` computed it where that is
  deterministic: Java ``NumberFormat`` numbers (``4,000``, ``.15``, ``1E5``),
  ``yyyy[-mm[-dd]]`` dates, Joda ``MMM d, yyyy`` dates and "number unit"
  (``82.6 m``); its CoreNLP (SUTime) date step is approximated by the
  unambiguous forms ``D Month YYYY``, ``Month YYYY`` and ``Month D``
  (`sutime_date`). Pass the release's ``targetCanon`` instead when you have
  it (``jaxsql eval`` reads ``tagged/data/*.tagged`` under the WikiTQ root).
- ``check_denotation``: as many distinct predicted values as distinct gold
  values, and every gold value matches some predicted value: equal normalised
  strings, or two numbers within 1e-6, or two equal dates.

The released ``check_denotation`` compares every pair (quadratic) and its
normalisation regular expressions backtrack exponentially on some strings;
here matching uses hash sets and a sorted list, and normalisation runs in
linear time with the same results.
"""

from __future__ import annotations

import bisect
import calendar
import dataclasses
import functools
import math
import re
import unicodedata
from typing import Any, Iterable, Sequence

from jaxsql.deadline import NEVER, Deadline

NUMBER_TOLERANCE = 1e-6

_QUOTES = str.maketrans({c: "'" for c in "‘’´`"} | {c: '"' for c in "“”"} | {c: "-" for c in "‐‑‒–—−"})
_CITATION_SYMBOLS = frozenset("•♦†‡*#+")
_CUTTABLE_ENDS = _CITATION_SYMBOLS | {"]", ")"}  # a stripped string ending otherwise has nothing to cut
_WHITESPACE = re.compile(r"\s+")
_ASCII_DIGITS = re.compile(r"[0-9]+")
_INF = float("inf")


# ---------------------------------------------------------------------------
# normalisation
def normalize(x: str) -> str:
    """The official ``normalize`` (same output, linear time)."""
    if not x.isascii():  # NFKD leaves ASCII alone and it has no combining marks
        x = "".join(c for c in unicodedata.normalize("NFKD", x) if unicodedata.category(c) != "Mn")
        x = x.translate(_QUOTES)
    x = x.strip()
    if x and (x[-1] in _CUTTABLE_ENDS):
        x = _cut_suffixes(x)
    if len(x) >= 2 and x[0] == '"' and x[-1] == '"' and '"' not in x[1:-1]:
        x = _cut_suffixes(x[1:-1].strip())  # the outermost-quote rule fires at most once
    if x and x[-1] == ".":
        x = x[:-1]
    return _WHITESPACE.sub(" ", x).lower().strip()


def _next_after(s: str, char: str) -> list[int]:
    """``out[i]`` = index of the first `char` at or after i (len(s) when none)."""
    out = [len(s)] * (len(s) + 1)
    nxt = len(s)
    for i in range(len(s) - 1, -1, -1):
        if s[i] == char:
            nxt = i
        out[i] = nxt
    return out


def _min_sources(s: str, edges: dict[int, list[int]], single: frozenset[str], allow_zero: bool) -> list[float]:
    """``out[e]`` = least p with ``s[p:e]`` a concatenation of tokens (edges p -> q, or one char in `single`)."""
    out: list[float] = [0.0] * (len(s) + 1)
    for e in range(len(s) + 1):
        best: float = e if (e > 0 or allow_zero) else _INF
        if e > 0 and s[e - 1] in single:
            best = min(best, out[e - 1])
        for p in edges.get(e, ()):
            best = min(best, out[p])
        out[e] = best
    return out


def _cut_suffixes(s: str) -> str:
    """The loop of the official ``normalize`` on a stripped string without its quote rule.

    Each round: drop the longest suffix made of citations (``[...]`` not at the
    start, ``[digits]``, or one of ``•♦†‡*#+``), strip, drop the longest suffix
    made of `` (...)`` groups (not at the start), strip; until nothing changes.
    Token graphs are built once, so the fixpoint costs O(len(s)).
    """
    n = len(s)
    if n == 0:
        return s
    close_bracket = _next_after(s, "]")
    close_paren = _next_after(s, ")")
    citation_edges: dict[int, list[int]] = {}
    paren_edges: dict[int, list[int]] = {}
    for i, c in enumerate(s):
        if c == "[":
            k = close_bracket[i + 1]
            if k < n and (i != 0 or _ASCII_DIGITS.fullmatch(s, i + 1, k)):
                citation_edges.setdefault(k + 1, []).append(i)
        elif c == " " and i + 1 < n and s[i + 1] == "(":
            k = close_paren[i + 2] if i + 2 <= n else n
            if k < n:
                paren_edges.setdefault(k + 1, []).append(i)
    min_citation = _min_sources(s, citation_edges, _CITATION_SYMBOLS, allow_zero=True)
    min_paren = _min_sources(s, paren_edges, frozenset(), allow_zero=False)

    def rstrip(e: int) -> int:
        while e > 0 and s[e - 1].isspace():
            e -= 1
        return e

    e = n
    while True:
        before = e
        e = rstrip(int(min_citation[rstrip(e)]))
        p = min_paren[e]
        if p != _INF:
            e = int(p)
        e = rstrip(e)
        if e == before:
            return s[:e]


# ---------------------------------------------------------------------------
# values
@dataclasses.dataclass(frozen=True)
class Value:
    """A typed value: ``kind`` is ``"number"``, ``"date"`` or ``"string"``.

    ``key`` is the amount (int when within 1e-6 of an integer, else float),
    the ``(year, month, day)`` triple (-1 for unknown parts) or the normalised
    string; ``normalized`` is the normalised original text.
    """

    kind: str
    key: Any
    normalized: str

    def identity(self) -> tuple[str, Any]:
        """What the official ``__eq__``/``__hash__`` compare (deduplication in `to_value_list`)."""
        return self.kind, self.key

    def match(self, other: "Value") -> bool:
        """``target.match(pred)``."""
        if self.normalized == other.normalized:
            return True
        if self.kind == other.kind == "number":
            return _numbers_close(self.key, other.key)
        if self.kind == other.kind == "date":
            return self.key == other.key
        return False


def _numbers_close(a: int | float, b: int | float) -> bool:
    try:
        return abs(a - b) < NUMBER_TOLERANCE
    except OverflowError:  # an int beyond float range: only an equal amount is within 1e-6
        return a == b


def number_value(amount: int | float, original: str) -> Value:
    """``NumberValue(amount, original_string)``: near-integers become ints (``int()`` truncates)."""
    if abs(amount - round(amount)) < NUMBER_TOLERANCE:
        amount = int(amount)
    else:
        amount = float(amount)
    return Value("number", amount, normalize(original) if original else str(amount))


def parse_number(text: str) -> int | float | None:
    """``NumberValue.parse``: ``int(text)``, else ``float(text)`` unless nan/inf."""
    if "_" in text:  # Python 2's int/float read no digit separators
        return None
    try:
        return int(text)
    except (ValueError, TypeError):
        pass
    try:
        amount = float(text)
    except (ValueError, TypeError, OverflowError):
        return None
    return None if math.isnan(amount) or math.isinf(amount) else amount


def parse_date(text: str) -> tuple[int, int, int] | None:
    """``DateValue.parse``: ``yyyy-mm-dd`` with ``xx`` (``xxxx`` for the year) as unknown."""
    parts = text.lower().split("-")
    if len(parts) != 3 or "_" in text:
        return None
    try:
        year = -1 if parts[0] in ("xx", "xxxx") else int(parts[0])
        month = -1 if parts[1] == "xx" else int(parts[1])
        day = -1 if parts[2] == "xx" else int(parts[2])
    except ValueError:
        return None
    if year == month == day == -1:
        return None
    if not (month == -1 or 1 <= month <= 12) or not (day == -1 or 1 <= day <= 31):
        return None
    return year, month, day


def to_value(original: str, canonical: str | None = None) -> Value:
    """The official ``to_value(original_string, corenlp_value)``."""
    text = canonical if canonical else original
    amount = parse_number(text)
    if amount is not None:
        return number_value(amount, original)
    ymd = parse_date(text)
    if ymd is not None:
        if ymd[1] == ymd[2] == -1:
            return number_value(ymd[0], original)
        return Value("date", ymd, normalize(original) if original else _date_text(ymd))
    text = normalize(original)
    return Value("string", text, text)


def _date_text(ymd: tuple[int, int, int]) -> str:
    y, m, d = ymd
    return f"{y if y != -1 else 'xx'}-{m if m != -1 else 'xx'}-{d if d != -1 else 'xx'}"


def to_value_list(originals: Iterable[str], canonicals: Sequence[str | None] | None = None) -> list[Value]:
    """``list(set(to_value(x[, y]) ...))``: deduplicated; the first of equal values is kept."""
    items = list(originals)
    canon = list(canonicals) if canonicals is not None else [None] * len(items)
    if len(canon) != len(items):
        raise ValueError(f"{len(items)} values but {len(canon)} canonical forms")
    out: dict[tuple[str, Any], Value] = {}
    for x, y in zip(items, canon):
        v = to_value(x, y)
        out.setdefault(v.identity(), v)
    return list(out.values())


def check_denotation(targets: Sequence[Value], predicted: Sequence[Value], deadline: Deadline = NEVER) -> bool:
    """Same sizes, and every target matches some prediction (official ``check_denotation``)."""
    if len(targets) != len(predicted):
        return False
    normalized = {p.normalized for p in predicted}
    dates = {p.key for p in predicted if p.kind == "date"}
    amounts = sorted(p.key for p in predicted if p.kind == "number")
    for i, t in enumerate(targets):
        if i % 1024 == 0:
            deadline.check()
        if t.normalized in normalized:
            continue
        if t.kind == "date" and t.key in dates:
            continue
        if t.kind == "number" and amounts:
            k = bisect.bisect_left(amounts, t.key)
            if any(0 <= j < len(amounts) and _numbers_close(t.key, amounts[j]) for j in (k - 1, k)):
                continue
        return False
    return True


# ---------------------------------------------------------------------------
# gold canonicalisation (SEMPRE's TableValuePreprocessor.canonicalize)
_SUTIME_ISO = re.compile(r"([0-9X]{4})(?:-([0-9X]{2}))?(?:-([0-9X]{2}))?")
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
_MONTHS_SHORT = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_JODA_MONTHS = {v: i for names in (_MONTHS, _MONTHS_SHORT) for k, i in names.items()
                for v in (k, k.upper(), k.capitalize())}
_JODA_DATE = re.compile(r"([A-Za-z]{3,9}) ([0-9]{1,2}), ([+-]?[0-9]{1,9})")
_SUTIME_DMY = re.compile(r"([0-9]{1,2}) ([A-Za-z]+)\.? ([0-9]{4})")
_SUTIME_MY = re.compile(r"([A-Za-z]+)\.? ([0-9]{4})")
_SUTIME_MD = re.compile(r"([A-Za-z]+)\.? ([0-9]{1,2})")


def java_number_strict(s: str) -> float | None:
    """Java ``NumberFormat.getInstance(Locale.US).parse`` that must read the whole string.

    Pattern ``#,##0.###``: optional ``-``; digits with ``,`` anywhere before
    the decimal point (a ``,`` must be followed by a digit); one ``.``; an
    exponent ``E`` with optional ``-``; at least one digit.
    """
    i, n = 0, len(s)
    sign = ""
    if i < n and s[i] == "-":
        sign, i = "-", 1
    int_digits: list[str] = []
    frac_digits: list[str] = []
    saw_decimal = saw_digit = False
    pending_group = False
    while i < n:
        c = s[i]
        d = unicodedata.decimal(c, None)
        if d is not None:
            (frac_digits if saw_decimal else int_digits).append(str(d))
            saw_digit, pending_group = True, False
        elif c == "." and not saw_decimal:
            saw_decimal = True
        elif c == "," and not saw_decimal:
            pending_group = True
        elif c == "E":
            j, exp_sign = i + 1, ""
            if j < n and s[j] == "-":
                exp_sign, j = "-", j + 1
            k = j
            while k < n and unicodedata.decimal(s[k], None) is not None:
                k += 1
            if k == j:
                break
            exponent = exp_sign + "".join(str(unicodedata.decimal(c2)) for c2 in s[j:k])
            i = k
            if i != n or pending_group or not saw_digit:
                return None
            return _finite(float(f"{sign}{''.join(int_digits) or '0'}.{''.join(frac_digits) or '0'}e{exponent}"))
        else:
            break
        i += 1
    if pending_group or i != n or not saw_digit:
        return None
    return _finite(float(f"{sign}{''.join(int_digits) or '0'}.{''.join(frac_digits) or '0'}"))


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _valid_ymd(y: int, m: int, d: int) -> bool:
    try:
        return 1 <= d <= calendar.monthrange(y, m)[1] if 1 <= y <= 9999 else 1 <= m <= 12 and 1 <= d <= 31
    except (ValueError, calendar.IllegalMonthError):
        return False


def _iso(y: int, m: int, d: int) -> str:
    return f"{'xx' if y == -1 else y}-{'xx' if m == -1 else f'{m:02d}'}-{'xx' if d == -1 else f'{d:02d}'}"


def sutime_date(s: str) -> str | None:
    """The CoreNLP date forms recognised here: ``D Month YYYY``, ``Month YYYY``, ``Month D``.

    Month names in full or abbreviated (a trailing ``.`` allowed), any case.
    An approximation of SUTime, which recognises more; see the module docstring.
    """
    for pattern, order in ((_SUTIME_DMY, "dmy"), (_SUTIME_MY, "my"), (_SUTIME_MD, "md")):
        m = pattern.fullmatch(s)
        if m is None:
            continue
        parts = dict(zip(order, m.groups()))
        month = _MONTHS.get(parts["m"].lower()) or _MONTHS_SHORT.get(parts["m"].lower())
        if month is None:
            return None
        year = int(parts["y"]) if "y" in parts else -1
        day = int(parts["d"]) if "d" in parts else -1
        if day != -1 and not _valid_ymd(year if year != -1 else 2000, month, day):
            return None
        return _iso(year, month, day)
    return None


@functools.lru_cache(maxsize=65_536)
def canonical_form(original: str) -> str:
    """``targetCanon`` of one gold value as SEMPRE computed it (see the module docstring).

    Order: Java strict number; ``yyyy[-mm[-dd]]`` (``X`` for unknown digits);
    Joda ``MMM d, yyyy``; the CoreNLP date subset; "number unit" (exactly two
    space-separated tokens, the first a strict number); else the text itself
    (whitespace made single spaces and trimmed, as SEMPRE serialised it).
    """
    number = java_number_strict(original)
    if number is not None:
        return repr(number)
    m = _SUTIME_ISO.fullmatch(original.upper())
    if m is not None:
        y, mo, d = (int(g) if g and "X" not in g else -1 for g in m.groups())
        if not y == mo == d == -1:
            return _iso(y, mo, d)
    m = _JODA_DATE.fullmatch(original)
    if m is not None and m.group(1) in _JODA_MONTHS:
        y, mo, d = int(m.group(3)), _JODA_MONTHS[m.group(1)], int(m.group(2))
        if _valid_ymd(y, mo, d):
            return _iso(y, mo, d)
    date = sutime_date(original)
    if date is not None:
        return date
    tokens = original.split(" ")
    while tokens and tokens[-1] == "":  # Java's split drops trailing empty strings
        tokens.pop()
    if len(tokens) == 2:
        number = java_number_strict(tokens[0])
        if number is not None:
            return repr(number)
    return re.sub(r"[ \t\n\x0b\f\r]", " ", original).strip(" \t\n\x0b\f\r\x00")


def gold_values(answers: Sequence[str], canonicals: Sequence[str] | None = None) -> list[Value]:
    """The target values of one example: official ``to_value_list(answers, canonicals)``,
    with `canonical_form` standing in for missing canonical forms."""
    canon = list(canonicals) if canonicals is not None else [canonical_form(a) for a in answers]
    return to_value_list(answers, canon)


def result_strings(rows: Sequence[Sequence[Any]]) -> list[str]:
    """A query result as the predicted items: every non-NULL cell, row by row, as ``str``."""
    return [v if isinstance(v, str) else str(v) for r in rows for v in r if v is not None]


def denotation_accuracy(predicted_items: Sequence[str], answers: Sequence[str],
                        canonicals: Sequence[str] | None = None, deadline: Deadline = NEVER) -> bool:
    """WikiTQ's per-example accuracy: ``check_denotation(gold_values, to_value_list(predicted))``."""
    targets = gold_values(answers, canonicals)
    deadline.check()
    return check_denotation(targets, to_value_list(predicted_items), deadline)
