"""Multi-turn SQL tool use, the host side: parse a row's text, run its calls, render observations.

The protocol (see ``docs/multiturn.md``): while it reasons, the model may
run a query on the example's database by writing ``<sql>QUERY</sql>``. The
row pauses when it closes the call; the host runs the pending calls of the
whole batch together in the `jaxsql.sql.SqlPool` (one ``execute_batch``) and
appends each result to its row as an observation::

    <observation>
    city
    cairo
    oslo
    (2 rows)
    </observation>

(framed by a newline on each side), and the row continues. The model ends
with ``<solution>QUERY</solution>`` (the answer tag is configurable). An
episode is the model's segments and the host's observations, alternating.

Three pieces, each usable alone:

- `parse_segment`: what the model's text since the last observation holds:
  a closed call, a final answer, a malformed call, or nothing yet;
- `render_observation`: an `ExecResult` (or a refusal) as observation text,
  deterministic, bounded (`ToolConfig.max_rows`, ``max_cell_chars``,
  ``max_chars``);
- `ToolRunner`: for the rows that paused, parse, run every call in one pool
  batch under each episode's budgets (``max_turns`` calls, ``max_sql_s`` of
  SQL time), and return the observations; a hostile call becomes an
  observation with its error kind and never stops the batch.

`episode_metrics` summarises finished episodes (turns per completion, tool
errors, share of rows that used a tool).

Model text is hostile input: parsing is one linear scan over at most
``ToolConfig.max_segment_chars`` characters (longer text is malformed
without being scanned), a call longer than ``max_call_chars`` is refused
without running, and observation text is bounded whatever the result.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

from jaxsql.config import require
from jaxsql.sql.result import ExecResult

#: Parse outcomes of a model segment.
STATUSES = ("call", "answer", "malformed", "open", "none")
#: Why a segment is malformed.
MALFORMED = ("unclosed", "nested", "empty", "stray_close", "forged_observation", "too_long")
#: Why an episode ended (`Episode.end`).
ENDS = ("answer", "malformed", "no_answer", "max_turns", "sql_time")
#: Error kinds an observation can carry: the sandbox's, plus the runner's refusals.
REFUSALS = ("call_too_long", "max_turns", "sql_time")

OBSERVATION_OPEN = "<observation>"
OBSERVATION_CLOSE = "</observation>"


@dataclasses.dataclass(frozen=True)
class ToolConfig:
    """The tool protocol's tags and budgets (validated at construction).

    Attributes:
      call_tag: the tool call tag, ``<call_tag>SQL</call_tag>``.
      answer_tag: the final answer tag, ``<answer_tag>SQL</answer_tag>``.
      max_turns: tool calls an episode may make; a further call is refused
        with an observation saying so and ends the episode.
      max_sql_s: SQL seconds an episode may spend (the sum of its calls'
        ``elapsed_s``); a call made after the sum reached it is refused and
        ends the episode. One call runs at most the pool's ``timeout_s``
        (+ its kill grace), so an episode spends at most
        ``max_sql_s + timeout_s`` (+ grace).
      max_rows: result rows an observation shows.
      max_cell_chars: characters shown of one cell (or of an error message: 4x).
      max_chars: characters of an observation's body (between the tags).
      max_call_chars: longest call text that is run (longer: refused, ``call_too_long``).
      max_segment_chars: longest model segment that is parsed (longer: malformed, ``too_long``).
    """

    call_tag: str = "sql"
    answer_tag: str = "solution"
    max_turns: int = 3
    max_sql_s: float = 10.0
    max_rows: int = 10
    max_cell_chars: int = 40
    max_chars: int = 1000
    max_call_chars: int = 8192
    max_segment_chars: int = 4 << 20

    def __post_init__(self) -> None:
        n = "ToolConfig"
        for f in ("call_tag", "answer_tag"):
            v = getattr(self, f)
            require(isinstance(v, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", v) is not None, n, f,
                    f"must be a tag name (a letter, then letters, digits or _), got {v!r}")
        require(self.call_tag != self.answer_tag, n, "answer_tag", "must differ from call_tag")
        require("observation" not in (self.call_tag, self.answer_tag), n, "call_tag",
                "'observation' is the host's tag")
        require(isinstance(self.max_turns, int) and self.max_turns >= 0, n, "max_turns", "must be an int >= 0")
        require(isinstance(self.max_sql_s, (int, float)) and 0 < self.max_sql_s < float("inf"), n, "max_sql_s",
                f"must be a finite number of seconds > 0, got {self.max_sql_s}")
        for f, lo in (("max_rows", 0), ("max_cell_chars", 4), ("max_chars", 64), ("max_call_chars", 16),
                      ("max_segment_chars", 64)):
            v = getattr(self, f)
            require(isinstance(v, int) and v >= lo, n, f, f"must be an int >= {lo}, got {v!r}")

    @property
    def stop_strings(self) -> tuple[str, str]:
        """The closing tags at which a decoding row pauses for the host."""
        return f"</{self.call_tag}>", f"</{self.answer_tag}>"

    def call(self, sql: str) -> str:
        """The model text of a tool call."""
        return f"<{self.call_tag}>{sql}</{self.call_tag}>"

    def answer(self, sql: str) -> str:
        """The model text of a final answer."""
        return f"<{self.answer_tag}>{sql}</{self.answer_tag}>"


# ---------------------------------------------------------------------------
# Parsing a model segment
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Parsed:
    """What a model segment (its text since the last observation) holds.

    Attributes:
      status: ``call`` (a closed tool call: run ``sql``), ``answer`` (a closed
        final answer: ``sql``), ``malformed`` (``reason`` says why), ``open``
        (a tag is open, or nothing yet: keep decoding), ``none`` (the row
        stopped without a call or an answer).
      sql: the call's or the answer's text, stripped; "" otherwise.
      reason: one of `MALFORMED` when malformed, else "".
      end: characters of the segment up to the closing tag that decided the
        status (the rest was decoded past the pause and is to be dropped);
        the segment's length for the other statuses.
    """

    status: str
    sql: str = ""
    reason: str = ""
    end: int = 0


_TAG_CACHE: dict[tuple[str, str], re.Pattern[str]] = {}


def _tag_re(cfg: ToolConfig) -> re.Pattern[str]:
    key = (cfg.call_tag, cfg.answer_tag)
    if key not in _TAG_CACHE:
        names = "|".join(re.escape(t) for t in (cfg.call_tag, cfg.answer_tag, "observation"))
        _TAG_CACHE[key] = re.compile(f"<(/?)({names})>")  # literals only: no backtracking
    return _TAG_CACHE[key]


def parse_segment(text: str, cfg: ToolConfig = ToolConfig(), *, finished: bool = False) -> Parsed:
    """Parse the model's text since the last observation (hostile input: one linear scan).

    The first tag that closes decides: ``</sql>`` after ``<sql>`` is a call,
    ``</solution>`` after ``<solution>`` an answer (either with empty content:
    malformed ``empty``). Malformed as well: a tag opened inside an open tag
    (``nested``), a closing tag with nothing open (``stray_close``), any
    ``<observation>`` tag (only the host writes those: ``forged_observation``),
    text over ``cfg.max_segment_chars`` (``too_long``, not scanned) and, when
    `finished` (the row stopped: end of sequence or token budget), an open
    tag (``unclosed``). With nothing decided the status is ``open`` while the
    row decodes and ``none`` once it `finished`.
    """
    if len(text) > cfg.max_segment_chars:
        return Parsed("malformed", reason="too_long", end=len(text))
    open_name: str | None = None
    open_end = 0
    for m in _tag_re(cfg).finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if name == "observation":
            return Parsed("malformed", reason="forged_observation", end=m.end())
        if not closing:
            if open_name is not None:
                return Parsed("malformed", reason="nested", end=m.end())
            open_name, open_end = name, m.end()
            continue
        if open_name != name:
            return Parsed("malformed", reason="stray_close" if open_name is None else "nested", end=m.end())
        body = text[open_end:m.start()].strip()
        if not body:
            return Parsed("malformed", reason="empty", end=m.end())
        return Parsed("call" if name == cfg.call_tag else "answer", sql=body, end=m.end())
    if open_name is not None and finished:
        return Parsed("malformed", reason="unclosed", end=len(text))
    return Parsed("none" if finished else "open", end=len(text))


# ---------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------

_CELL_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _defuse(s: str) -> str:
    # a cell or message never contains the observation's own tags: its frame stays unambiguous
    return s.replace(OBSERVATION_OPEN, "&lt;observation>").replace(OBSERVATION_CLOSE, "&lt;/observation>")


def _cell(v: Any, limit: int) -> str:
    if v is None:
        s = "NULL"
    elif isinstance(v, float):
        s = repr(v)
    else:
        s = str(v)
    s = _defuse(s[: 2 * limit]).translate(_CELL_ESCAPES)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _cut(s: str, limit: int) -> str:
    s = " ".join(_defuse(s[: limit + 1]).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def observation_body(result: ExecResult | None, cfg: ToolConfig = ToolConfig(), *,
                     refusal: str = "", detail: str = "") -> str:
    """The text between the observation tags (no surrounding newlines).

    A result: the column names joined by `` | ``, then at most ``max_rows``
    rows, one per line (cells joined by `` | ``; NULL for None; each cell cut
    to ``max_cell_chars`` with ``...``; newlines and tabs escaped), then
    ``(N rows)`` or ``(first K of N rows)``; rows stop early when the body
    would pass ``max_chars``. The observation tags inside a cell or message
    are written ``&lt;observation>`` / ``&lt;/observation>``. An error: ``error: <kind>`` (``<kind> (<limit>)``
    when a budget ended it), then the engine's message cut to
    ``4 * max_cell_chars``. A refusal (`REFUSALS`, no result): ``error:
    <refusal>`` then `detail`.
    """
    if result is None:
        return f"error: {refusal}\n{_cut(detail, 4 * cfg.max_cell_chars)}".rstrip()
    if not result.ok:
        head = f"error: {result.error}" + (f" ({result.limit})" if result.limit else "")
        msg = _cut(result.message, 4 * cfg.max_cell_chars)
        return f"{head}\n{msg}" if msg else head
    n = len(result.rows)
    lines = [" | ".join(_cell(c, cfg.max_cell_chars) for c in result.columns)]
    used = len(lines[0])
    tail_room = 40  # the footer
    if used > cfg.max_chars - tail_room:
        lines[0] = lines[0][: max(0, cfg.max_chars - tail_room - 3)] + "..."
        used = len(lines[0])
    shown = 0
    for row in result.rows[: cfg.max_rows]:
        line = " | ".join(_cell(c, cfg.max_cell_chars) for c in row)
        if used + 1 + len(line) > cfg.max_chars - tail_room:
            break
        lines.append(line)
        used += 1 + len(line)
        shown += 1
    lines.append(f"({n} row{'s' if n != 1 else ''})" if shown == n else f"(first {shown} of {n} rows)")
    return "\n".join(lines)


def render_observation(result: ExecResult | None, cfg: ToolConfig = ToolConfig(), *,
                       refusal: str = "", detail: str = "", last_call: bool = False) -> str:
    """The observation appended to a row: ``"\\n<observation>\\n" + body + "\\n</observation>\\n"``.

    `observation_body` gives the body; `last_call` adds a line
    ``(no calls left: answer now)`` when the episode has used its
    ``max_turns`` calls. Deterministic: equal inputs give equal text (no
    timings are shown).
    """
    body = observation_body(result, cfg, refusal=refusal, detail=detail)
    if last_call:
        body += "\n(no calls left: answer now)"
    return f"\n{OBSERVATION_OPEN}\n{body}\n{OBSERVATION_CLOSE}\n"


def observation_error(observation: str) -> str | None:
    """The error kind an observation rendered by `render_observation` reports, or None."""
    start = len(OBSERVATION_OPEN) + 2
    if observation.startswith("error: ", start):
        end = observation.find("\n", start)
        kind = observation[start + len("error: "): end if end >= 0 else None]
        return kind.split(" ", 1)[0]
    return None


# ---------------------------------------------------------------------------
# Episodes and the runner
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call of an episode: its SQL, the error kind (None when it gave rows) and the observation."""

    sql: str
    error: str | None
    observation: str
    elapsed_s: float = 0.0


@dataclasses.dataclass
class Episode:
    """One row's conversation with the database.

    Attributes:
      db_path: the database its calls run on.
      segments: ``(text, is_observation)`` in order: the model's segments
        (cut at the closing tag that paused them) and the host's observations.
      calls: the calls made (refused ones included), in order.
      sql_s: SQL seconds spent so far.
      end: None while running, else one of `ENDS`.
      answer: the final answer's SQL ("" without one).
      malformed: why the last segment was malformed ("" if it was not).
    """

    db_path: str
    segments: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
    calls: list[ToolCall] = dataclasses.field(default_factory=list)
    sql_s: float = 0.0
    end: str | None = None
    answer: str = ""
    malformed: str = ""

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def turns(self) -> int:
        """Tool calls made (refused ones included)."""
        return len(self.calls)

    @property
    def text(self) -> str:
        """The completion as the model saw it (its segments and the observations)."""
        return "".join(t for t, _ in self.segments)


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What the rollout loop does with one row after `ToolRunner.step`.

    Attributes:
      keep_chars: characters of the submitted segment to keep (the rest was
        decoded past the closing tag and is dropped).
      observation: text to append to the row (tokenised as context), or None.
      done: the row's episode ended (answer, malformed, no answer, a budget).
    """

    keep_chars: int
    observation: str | None
    done: bool


class ToolRunner:
    """Run the paused rows' tool calls of a batch together in a `jaxsql.sql.SqlPool`.

    The pool's per-query sandbox (read-only, one statement, deadline, row /
    byte / memory caps) applies to every call; this class adds the per-episode
    budgets of `ToolConfig` and the observation format.
    """

    def __init__(self, pool: Any, cfg: ToolConfig = ToolConfig()) -> None:
        self.pool = pool
        self.cfg = cfg

    def new_episode(self, db_path: str) -> Episode:
        return Episode(str(db_path))

    def step(self, episodes: Sequence[Episode], segments: Sequence[str | None], *,
             finished: Sequence[bool] | None = None) -> list[StepOutcome | None]:
        """Advance each episode by its model segment (None: the row is not paused; skipped).

        `segments[i]` is row i's model text since its last observation;
        `finished[i]` says the row stopped (end of sequence or token budget)
        rather than paused at a closing tag; a call it closed is then not run
        (the episode ends, ``no_answer``). All calls that may run go to the
        pool as one ``execute_batch``. Returns one `StepOutcome` per row (None
        for skipped rows and episodes already done).
        """
        cfg = self.cfg
        fin = list(finished) if finished is not None else [False] * len(episodes)
        if not (len(episodes) == len(segments) == len(fin)):
            raise ValueError("ToolRunner.step: episodes, segments and finished differ in length")
        out: list[StepOutcome | None] = [None] * len(episodes)
        pending: list[tuple[int, str, int]] = []  # (row, sql, keep)
        for i, (ep, seg) in enumerate(zip(episodes, segments)):
            if seg is None or ep.done:
                continue
            p = parse_segment(seg, cfg, finished=fin[i])
            if p.status == "open":
                continue  # nothing decided yet: keep decoding
            ep.segments.append((seg[: p.end], False))
            if p.status == "answer":
                ep.answer, ep.end = p.sql, "answer"
                out[i] = StepOutcome(p.end, None, True)
            elif p.status == "malformed":
                ep.malformed, ep.end = p.reason, "malformed"
                out[i] = StepOutcome(p.end, None, True)
            elif p.status == "none" or fin[i]:
                # no answer; a call closed as the row stopped (end of sequence, token budget) is not run
                ep.end = "no_answer"
                out[i] = StepOutcome(p.end, None, True)
            elif ep.turns >= cfg.max_turns:
                self._refuse(ep, p.sql, "max_turns",
                             f"this episode has used its {cfg.max_turns} tool calls; it ends here")
                out[i] = StepOutcome(p.end, ep.segments[-1][0], True)
            elif ep.sql_s >= cfg.max_sql_s:
                self._refuse(ep, p.sql, "sql_time",
                             f"this episode has used its {cfg.max_sql_s:g} s of SQL time; it ends here")
                out[i] = StepOutcome(p.end, ep.segments[-1][0], True)
            elif len(p.sql) > cfg.max_call_chars:
                obs = render_observation(None, cfg, refusal="call_too_long",
                                         detail=f"the query has {len(p.sql)} characters; at most "
                                                f"{cfg.max_call_chars} are run",
                                         last_call=ep.turns + 1 >= cfg.max_turns)
                ep.calls.append(ToolCall(p.sql, "call_too_long", obs))
                ep.segments.append((obs, True))
                out[i] = StepOutcome(p.end, obs, False)
            else:
                pending.append((i, p.sql, p.end))
        if pending:
            results = self.pool.execute_batch([(episodes[i].db_path, sql) for i, sql, _ in pending])
            for (i, sql, keep), r in zip(pending, results):
                ep = episodes[i]
                obs = render_observation(r, cfg, last_call=ep.turns + 1 >= cfg.max_turns)
                ep.calls.append(ToolCall(sql, None if r.ok else r.error, obs, r.elapsed_s))
                ep.sql_s += r.elapsed_s
                ep.segments.append((obs, True))
                out[i] = StepOutcome(keep, obs, False)
        return out

    def _refuse(self, ep: Episode, sql: str, kind: str, detail: str) -> None:
        obs = render_observation(None, self.cfg, refusal=kind, detail=detail)
        ep.calls.append(ToolCall(sql, kind, obs))
        ep.segments.append((obs, True))
        ep.end = kind


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def episode_metrics(episodes: Iterable[Episode]) -> dict[str, float]:
    """Summary of finished (or running) episodes, for logs (``tool/...`` keys).

    ``tool/turns_per_completion``: mean tool calls per episode;
    ``tool/used_share``: share of episodes with at least one call;
    ``tool/calls``: calls in all; ``tool/errors``: calls whose observation is
    an error (sandbox errors and refusals); ``tool/error_share``: errors /
    calls (0 without calls); ``tool/answered_share``: share that ended with
    an answer; ``tool/malformed_share``: share that ended malformed;
    ``tool/end/<reason>``: count per `ENDS` reason (and ``running``).
    """
    eps = list(episodes)
    n = len(eps)
    calls = sum(e.turns for e in eps)
    errors = sum(1 for e in eps for c in e.calls if c.error is not None)
    out = {
        "tool/episodes": float(n),
        "tool/turns_per_completion": calls / n if n else 0.0,
        "tool/used_share": sum(1 for e in eps if e.turns) / n if n else 0.0,
        "tool/calls": float(calls),
        "tool/errors": float(errors),
        "tool/error_share": errors / calls if calls else 0.0,
        "tool/answered_share": sum(1 for e in eps if e.end == "answer") / n if n else 0.0,
        "tool/malformed_share": sum(1 for e in eps if e.end == "malformed") / n if n else 0.0,
    }
    for reason in ENDS + ("running",):
        out[f"tool/end/{reason}"] = float(sum(1 for e in eps if (e.end or "running") == reason))
    return out
