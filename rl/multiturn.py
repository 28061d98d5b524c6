"""Multi-turn rollouts: the model runs SQL while it decodes, reads the result, and goes on.

`multi_turn_rollout` drives the continuable sampler (`models.sampler`: `start`,
`decode`, `extend`, `resume`, `tokens`) and the host's `jaxsql.tools.ToolRunner`
in rounds (protocol: ``docs/multiturn.md``):

1. **decode** every live row with a stop rule on the tool call's and the
   answer's closing tags (`jaxsql.tools.ToolConfig.stop_strings`,
   `models.sampler.stop_rule`), on EOS and at the row's total token budget
   (``max_new_tokens``, model *and* observation tokens). The jitted loop runs
   until every live row has stopped;
2. **tools**: the text of each stopped row's new segment (decoded from its
   own tokens) goes to ONE `ToolRunner.step` (all calls of the batch in one
   `SqlPool.execute_batch`);
3. **extend**: each observation is tokenised once (``add_special_tokens=False``)
   and those ids are appended to the row (`extend`: one forward pass over a
   block holding every paused row's observation), and the rows resume.

A row ends at its final answer, at a malformed segment, at EOS without an
answer, when the runner ends its episode (``max_turns`` or the SQL-time
budget) or at the token budget. An observation that does not fit in the
row's remaining budget with room for one more model token is cut to the
budget and the row ends (``no_answer``).

**What waiting rows cost.** The batch has a fixed shape: a row that paused
(waiting for the other rows to stop, then for the pool) or finished is
*done* in the `DecodeState`: the decode loop skips its bookkeeping and feeds
a masked-out cache slot, but its slot is still part of every step's forward
pass, so it costs its share of the FLOPs (1/B of each step) until the round
ends; a round ends when every live row has stopped, so a row that paused
early waits through the rest of the round. Finished rows cost their share
for the rest of the rollout. `extend` runs over all B rows too (rows
without an observation have an empty, masked block). No extra forward pass
is spent on a waiting row. ``stats`` reports ``decode_steps`` (forward
passes of the batch) beside ``model_tokens`` so the idle share is visible.

**The seam is token-exact.** The model's tokens are never re-tokenised: its
text is decoded from its ids for the host only; the completion holds the
sampled ids, then the observation's ids exactly as tokenised here (what the
trainer sees), then the next sampled ids. Characters the closing tag's
token carries past the tag stay in the token stream (the episode's text is
cut at the tag, `StepOutcome.keep_chars`). The stop rule (`tool_stop_rule`)
catches a closing tag however many tokens it spans, and also fires on some
tokens where no tag closed (an opening ``<sql>``: ``l`` then ``>``); the
host parses the row's text, finds nothing decided and resumes it in the
next round (``stats["false_stops"]``), which costs that row the rest of
the round.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Any, Sequence

import numpy as np

import jaxsql.tools
from jaxsql.errors import JaxsqlError
from jaxsql.tools import ToolRunner


@dataclasses.dataclass(frozen=True)
class MultiTurnRollout:
    """The result of `multi_turn_rollout`; row ``n * G + g`` is sample g of prompt n.

    Attributes:
      completion_tokens: [B, C] int32, right-padded (pad id): the model's tokens and the
        observations' tokens, in order.
      sampled_mask: [B, C] 1 on tokens the model sampled, 0 on observations and padding.
      completion_mask: [B, C] 1 on every real token (model and observation).
      logprobs: [B, C] float32 sampler log-probs of the sampled tokens (at the sampling
        temperature; 1 for greedy), 0 elsewhere.
      episodes: per row, its `jaxsql.tools.Episode` (calls, observations, answer, end).
      final_sql: per row, the answer's SQL (None: the episode ended without an answer).
      stats: ``decode_s``, ``tool_s``, ``extend_s``, ``total_s``, ``rounds``, ``decode_steps``,
        ``turns`` (mean calls per row), ``model_tokens``, ``observation_tokens``,
        ``observations_cut`` (observations cut to the token budget), ``false_stops`` (rows
        the stop rule paused where no tag had closed, resumed).
    """

    completion_tokens: np.ndarray
    sampled_mask: np.ndarray
    completion_mask: np.ndarray
    logprobs: np.ndarray
    episodes: list[jaxsql.tools.Episode]
    final_sql: list[str | None]
    stats: dict[str, float]


#: tokenizer -> {(stop strings, vocab size, eos ids): StopRule}; entries go with their tokenizer
_RULES: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def tool_stop_rule(tokenizer: Any, cfg: jaxsql.tools.ToolConfig, vocab_size: int, eos_ids: Sequence[int] = ()):
    """A `models.sampler.StopRule` that stops a row at the token that completes one of `cfg`'s
    closing tags, however the tokenizer splits the tag (and at `eos_ids`).

    `models.sampler.stop_rule` finds a stop string inside one token or across two; byte-level
    BPE splits ``</sql>`` into three or more (``<``, ``/``, ``s``, ``q``, ``l``, ``>``), which it
    misses. This rule looks at the last two tokens only, as the sampler's rule does, and fires
    on a superset: a token containing a tag, or a token starting with the tag's tail
    ``s[k:]`` after a token whose text is a suffix of ``s[:k]`` or ends with ``s[:k]`` (every
    occurrence spanning several tokens ends so). It also fires where no tag closed, e.g. at
    ``<sql>`` (``sql`` or ``l``, then ``>``): the loop parses the row's text on the host and
    resumes such a row (``stats["false_stops"]``).
    Built once per tokenizer object (it decodes every vocabulary entry).
    """
    import jax.numpy as jnp

    from models.sampler import StopRule

    key = (tuple(cfg.stop_strings), int(vocab_size), tuple(sorted(int(i) for i in eos_ids)))
    try:
        rules = _RULES.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        rules = {}
    if key not in rules:
        n = min(vocab_size, len(tokenizer))
        texts = [tokenizer.decode([i]) for i in range(n)] + [""] * (vocab_size - n)
        ids_V = np.zeros(vocab_size, np.bool_)
        ids_V[list(key[2])] = True
        pairs: dict[tuple[str, str], None] = {}
        for s in cfg.stop_strings:
            ids_V |= np.fromiter((s in t for t in texts), np.bool_, vocab_size)
            for k in range(1, len(s)):
                pairs[(s[:k], s[k:])] = None
        # the token before the tag's last one ends at s[:k]: its text lies inside the tag (a suffix
        # of s[:k]) or holds all of s[:k] at its end
        after = np.stack([np.fromiter((bool(t) and (a.endswith(t) or t.endswith(a)) for t in texts), np.bool_,
                                      vocab_size) for a, _ in pairs])
        before = np.stack([np.fromiter((t.startswith(b) for t in texts), np.bool_, vocab_size) for _, b in pairs])
        rules[key] = StopRule(jnp.asarray(ids_V), jnp.asarray(after), jnp.asarray(before))
    return rules[key]


def eos_ids_of(cfg: Any, tokenizer: Any) -> tuple[int, ...]:
    """The stop token ids: the model config's EOS ids and the tokenizer's EOS id."""
    stop = {int(s) for s in cfg.eos_token_ids}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stop.add(int(tokenizer.eos_token_id))
    return tuple(sorted(stop))


def multi_turn_rollout(model: Any, prompts: Sequence[Sequence[int]], db_paths: Sequence[str],
                       runner: ToolRunner, tokenizer: Any, *, key: Any, num_samples: int = 1,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
                       max_new_tokens: int, max_turns: int | None = None,
                       stop_ids: Sequence[int] | None = None) -> MultiTurnRollout:
    """Sample `num_samples` multi-turn episodes per prompt, running their tool calls on the way.

    Args:
      model: a `models.sampler.SamplerModel` of the policy.
      prompts: token ids per prompt (in the ``tool`` prompt format).
      db_paths: the database of each prompt (its calls run there).
      runner: the `ToolRunner` (its pool and `ToolConfig`: tags, budgets, observation size).
      tokenizer: the policy's tokenizer (texts are decoded, observations encoded with it).
      key: the sampling key; row ``n * G + g`` draws from ``fold_in(fold_in(key, n), g)``
        as in `models.sampler.generate`, so its tokens do not depend on how the batch is
        split over devices.
      num_samples: G, samples per prompt.
      temperature, top_p, top_k, greedy: the sampling settings.
      max_new_tokens: the row's total budget of completion tokens (model and observation).
      max_turns: calls per episode (default the runner's ``max_turns``).
      stop_ids: end-of-sequence ids (default: the config's and the tokenizer's EOS).

    Returns:
      a `MultiTurnRollout` (group-major rows, B = len(prompts) * num_samples).
    """
    from models.sampler import bucket_length, decode, extend, resume, start, tokens

    if len(db_paths) != len(prompts):
        raise JaxsqlError(f"multi_turn_rollout: {len(db_paths)} databases for {len(prompts)} prompts")
    if max_new_tokens < 1 or num_samples < 1:
        raise JaxsqlError("multi_turn_rollout: max_new_tokens and num_samples must be >= 1")
    if max_turns is not None and max_turns != runner.cfg.max_turns:
        runner = ToolRunner(runner.pool, dataclasses.replace(runner.cfg, max_turns=max_turns))
    cfg = runner.cfg
    eos = tuple(int(i) for i in stop_ids) if stop_ids is not None else eos_ids_of(model.cfg, tokenizer)
    eos_set = set(eos)
    rule = tool_stop_rule(tokenizer, cfg, model.cfg.vocab_size)
    G = num_samples
    B = len(prompts) * G
    episodes = [runner.new_episode(db_paths[r // G]) for r in range(B)]
    seg_start = np.zeros(B, np.int64)  # where each row's current model segment begins
    live = np.ones(B, bool)
    tails: list[list[int]] = [[] for _ in range(B)]  # observation ids appended after a row ended
    stats = dict(decode_s=0.0, tool_s=0.0, extend_s=0.0, rounds=0.0, decode_steps=0.0,
                 observation_tokens=0.0, observations_cut=0.0, false_stops=0.0)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
    t_all = time.perf_counter()
    cap = bucket_length(max_new_tokens)
    state = start(model, prompts, key=key, num_samples=G, capacity=cap)

    while live.any():
        stats["rounds"] += 1
        t0 = time.perf_counter()
        _, _, n_before = tokens(state)
        steps = int(max_new_tokens - n_before[live].min())
        state = decode(model, state, steps, stop_ids=eos, stop=rule, max_length=max_new_tokens, **sampling)
        toks, _, n = tokens(state)
        stopped = live & np.asarray(state.done_B)  # every live row (`steps` reaches each one's budget)
        stats["decode_s"] += time.perf_counter() - t0
        stats["decode_steps"] += float(np.max(n[live] - n_before[live]))
        segments: list[str | None] = [None] * B
        finished = [False] * B
        for r in np.flatnonzero(stopped):
            ids = [int(t) for t in toks[r, seg_start[r]:n[r]]]
            finished[r] = bool(ids and ids[-1] in eos_set) or int(n[r]) >= max_new_tokens
            while ids and ids[-1] in eos_set:
                ids.pop()
            segments[r] = tokenizer.decode(ids, skip_special_tokens=False)  # a tag may be a special token
        t0 = time.perf_counter()
        outcomes = runner.step(episodes, segments, finished=finished)
        stats["tool_s"] += time.perf_counter() - t0
        appended: list[list[int]] = [[] for _ in range(B)]
        again: list[int] = []
        for r in np.flatnonzero(stopped):
            out = outcomes[r]
            if out is None:  # the stop rule fired but no tag closed (e.g. at an opening tag): decode on
                again.append(int(r))
                stats["false_stops"] += 1
                continue
            obs_ids: list[int] = []
            if out.observation is not None:
                obs_ids = list(tokenizer(out.observation, add_special_tokens=False)["input_ids"])
                stats["observation_tokens"] += len(obs_ids)
            room = max_new_tokens - int(n[r])
            if out.done or len(obs_ids) >= room:
                live[r] = False
                if not out.done:  # the observation leaves no room to answer: cut to the budget
                    stats["observations_cut"] += 1
                    episodes[r].end = "no_answer"
                tails[r] = obs_ids[:room]
                continue
            appended[r] = obs_ids
            seg_start[r] = int(n[r]) + len(obs_ids)
        t0 = time.perf_counter()
        if any(appended):
            state = extend(model, state, appended)  # appending clears the done flag of those rows
        if again:
            state = resume(state, again)
        stats["extend_s"] += time.perf_counter() - t0

    toks, sampled, n = tokens(state)
    logp = np.asarray(state.logprobs_BM)
    lengths = [int(n[r]) + len(tails[r]) for r in range(B)]
    C = max(max(lengths), 1)
    out_tok = np.full((B, C), model.pad_id, np.int32)
    out_sampled = np.zeros((B, C), np.int32)
    out_mask = np.zeros((B, C), np.int32)
    out_lp = np.zeros((B, C), np.float32)
    for r in range(B):
        k = int(n[r])
        out_tok[r, :k] = toks[r, :k]
        out_tok[r, k:lengths[r]] = tails[r]
        out_sampled[r, :k] = sampled[r, :k]
        out_mask[r, :lengths[r]] = 1
        out_lp[r, :k] = np.where(sampled[r, :k], logp[r, :k], 0.0)
    stats["total_s"] = time.perf_counter() - t_all
    stats["turns"] = float(np.mean([e.turns for e in episodes]))
    stats["model_tokens"] = float(out_sampled.sum())
    return MultiTurnRollout(out_tok, out_sampled, out_mask, out_lp, episodes,
                            [e.answer if e.end == "answer" else None for e in episodes], stats)
