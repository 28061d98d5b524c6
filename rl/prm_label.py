"""Step labels for PRM training: execution, then Monte-Carlo continuations (Math-Shepherd style).

For every sampled CoCTE trajectory (Reward-SQL, Zhang et al. 2025, sec. 3;
Math-Shepherd, Wang et al. 2024, sec. 3.3):

- a step whose prefix query does not execute is labelled 0 (hard and soft);
- the final step (the whole query) is labelled by its own correctness: the
  completion is finished, so its continuations are itself;
- any other step is labelled by `k` continuations sampled from the policy
  after the text up to the end of the step: **hard** = 1 when at least one
  continuation reaches a correct result, **soft** = the fraction that do.

Correct means `jaxsql.rewards.is_correct`: by default the same multiset of
rows as the gold SQL, each row's values order-free (``ex_bag_rowfree``),
when the example has gold SQL, else the gold answers' denotation.
Continuations of every step of a batch of examples run in one sampler call
per chunk (`models.sampler.generate`, unchanged) and are scored in one pool
call. The sampler is injected (`SampleFn`) so that
labels can be checked on continuations known in advance.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from data.records import Example
from jaxsql.config import changed_settings, read_saved_settings, require
from jaxsql.errors import JaxsqlError
from jaxsql.paths import AnyPath, LineAppender, as_path, is_remote, whole_lines
from rl.prm import LabelRecord, StepLabel, record_from_json

#: ``sample(prompt_ids, prefixes, n, seed) -> texts``: n continuations of each prompt + prefix text.
SampleFn = Callable[[Sequence[Sequence[int]], Sequence[str], int, int], list[list[str]]]


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """How trajectories are sampled and labelled (saved beside the label file).

    Attributes:
      k: continuations per step.
      trajectories: sampled trajectories per example.
      temperature, top_p: sampling of trajectories and continuations.
      max_new_tokens: length cap of trajectories and continuations.
      batch_size: examples per batch (the unit of resuming).
      seed: batch b samples with seed ``(seed, b)``.
      max_prompt_len: prompt tokens kept (the last ones).
      match: comparison against gold SQL (one of `jaxsql.rewards.MATCHES`).
      max_result_chars: characters of each rendered step result stored for the PRM.
    """

    k: int = 8
    trajectories: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    max_prompt_len: int = 512
    match: str = "ex_bag_rowfree"
    max_result_chars: int = 500

    def __post_init__(self) -> None:
        for f in ("k", "trajectories", "max_new_tokens", "batch_size", "max_prompt_len"):
            require(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, "LabelSettings", f,
                    f"must be an integer >= 1, got {getattr(self, f)!r}")
        require(self.temperature > 0, "LabelSettings", "temperature", f"must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "LabelSettings", "top_p", f"must be in (0, 1], got {self.top_p}")
        from jaxsql.rewards import MATCHES

        require(self.match in MATCHES, "LabelSettings", "match", f"must be one of {list(MATCHES)}, got {self.match!r}")
        require(self.max_result_chars >= 16, "LabelSettings", "max_result_chars", "must be >= 16")


def _correct(pool: Any, examples: Sequence[Example], texts: Sequence[str], match: str,
             gold: dict[str, Any]) -> list[bool]:
    """Whether each completion text answers its example correctly (one pool call)."""
    from jaxsql.extract import extract_sql
    from jaxsql.rewards import RewardContext, is_correct

    sqls = [extract_sql(t) for t in texts]
    results = pool.execute_batch([(e.db_path, s) for e, s in zip(examples, sqls)]) if texts else []
    return [is_correct(RewardContext(t, s, r, gold.get(e.id), e.gold_sql, e.gold_answers), match)
            for e, t, s, r in zip(examples, texts, sqls, results)]


def label_completions(examples: Sequence[Example], completions: Sequence[str], samples: Sequence[int], *,
                      pool: Any, prompt_ids: Callable[[Example], Sequence[int]], sample: SampleFn,
                      settings: LabelSettings, seed: int = 0) -> list[LabelRecord]:
    """Label the steps of each ``(example, completion)`` (see the module docstring).

    `samples[i]` numbers completion i among its example's trajectories.
    Every step query runs in one pool call, every continuation prompt goes to
    one `sample` call (with `seed`), every continuation is scored in one
    more pool call.
    """
    from jaxsql.cocte import execute_completions, render_result

    trajs = execute_completions(pool, [(e.db_path, c) for e, c in zip(examples, completions)])
    with_sql = [e for e in examples if e.gold_sql]
    gold_results = pool.gold_batch([(e.id, e.db_path, e.gold_sql) for e in with_sql])
    gold = {e.id: r for e, r in zip(with_sql, gold_results)}
    outcomes = _correct(pool, examples, completions, settings.match, gold)

    requests: list[tuple[int, int]] = []  # (trajectory, step) pairs that need continuations
    for i, t in enumerate(trajs):
        for j, (step, result) in enumerate(zip(t.steps, t.results)):
            if result.ok and step.kind == "cte":
                requests.append((i, j))
    prefixes = [trajs[i].completion[:trajs[i].step_spans()[j][1]] for i, j in requests]
    conts = sample([prompt_ids(examples[i]) for i, _ in requests], prefixes, settings.k, seed) if requests else []
    if len(conts) != len(requests) or any(len(c) != settings.k for c in conts):
        raise JaxsqlError(f"the sampler returned {len(conts)} continuation groups for {len(requests)} prefixes "
                          f"(each must hold k={settings.k})")
    flat_ex = [examples[i] for (i, _), group in zip(requests, conts) for _ in group]
    flat_text = [p + c for p, group in zip(prefixes, conts) for c in group]
    hits_flat = _correct(pool, flat_ex, flat_text, settings.match, gold)
    hits = {req: hits_flat[n * settings.k:(n + 1) * settings.k] for n, req in enumerate(requests)}

    records = []
    for i, t in enumerate(trajs):
        steps = []
        for j, (step, result) in enumerate(zip(t.steps, t.results)):
            rendered = render_result(result, settings.max_result_chars)
            if not result.ok:
                steps.append(StepLabel(step.text, step.kind, False, rendered, 0.0, 0.0))
            elif step.kind == "final":
                v = 1.0 if outcomes[i] else 0.0
                steps.append(StepLabel(step.text, step.kind, True, rendered, v, v))
            else:
                h = hits[(i, j)]
                steps.append(StepLabel(step.text, step.kind, True, rendered, 1.0 if any(h) else 0.0,
                                       sum(h) / len(h), sum(h), len(h)))
        records.append(LabelRecord(examples[i], int(samples[i]), completions[i], bool(outcomes[i]), tuple(steps),
                                   t.chain.problems))
    return records


def policy_sampler(params: Any, cfg: Any, tokenizer: Any, *, settings: LabelSettings, stop_ids: Sequence[int],
                   pad_id: int, chunk: int = 64) -> SampleFn:
    """A `SampleFn` drawing from the policy with `models.sampler.generate`.

    Prompts are the prompt ids followed by the prefix text's tokens; they go
    to the sampler in chunks of `chunk` rows (the last chunk padded with
    copies of its last prompt, so every call has the same shape).
    """
    import jax
    import numpy as np

    from models.sampler import generate
    from rl.rollout import decode_completions

    def sample(prompt_ids, prefixes, n, seed):
        rows = [list(p) + (tokenizer(x, add_special_tokens=False)["input_ids"] if x else [])
                for p, x in zip(prompt_ids, prefixes)]
        out: list[list[str]] = []
        size = min(chunk, 1 << (len(rows) - 1).bit_length())  # few distinct shapes to compile
        for c, start in enumerate(range(0, len(rows), size)):
            part = rows[start:start + size]
            padded = part + [part[-1]] * (size - len(part))
            res = generate(params, cfg, padded, key=jax.random.fold_in(jax.random.key(seed), c),
                           max_new_tokens=settings.max_new_tokens, num_samples=n, temperature=settings.temperature,
                           top_p=settings.top_p, stop_ids=tuple(stop_ids), pad_id=pad_id)
            tokens, lengths = jax.device_get((res.tokens, res.lengths))
            texts = decode_completions(tokenizer, np.asarray(tokens), np.asarray(lengths), stop_ids)
            out += [texts[r * n:(r + 1) * n] for r in range(len(part))]
        return out

    return sample


# --- the labelling run (resumable) ---------------------------------------------------------------


def _meta_path(out: AnyPath) -> AnyPath:
    return out.parent / (out.name + ".meta.json")


def _labelled(out: AnyPath) -> list[tuple[tuple[str, int], bytes]]:
    """The ``((example id, sample), line)`` of every record in the label file; a last line cut
    off mid-write is dropped."""
    data = whole_lines(out)
    found = []
    for lineno, line in enumerate(data.splitlines(keepends=True), 1):
        if line.strip():
            try:
                r = record_from_json(json.loads(line), f"{out}:{lineno}")
            except json.JSONDecodeError as e:
                raise JaxsqlError(f"{out}:{lineno}: invalid JSON ({e.msg}); not a label file to resume") from None
            except UnicodeDecodeError:
                raise JaxsqlError(f"{out}:{lineno}: not UTF-8; not a label file to resume") from None
            found.append(((r.example.id, r.sample), line))
    return found


def _drop_unfinished(out: AnyPath, found: list[tuple[tuple[str, int], bytes]],
                     batches: Sequence[Sequence[Example]], trajectories: int) -> set[tuple[str, int]]:
    """The (id, sample) pairs of the batches whose records are all in the file. Records of a
    batch that is only partly there (a kill inside a batch's append on local disk) are cut
    from the file, so that batch is labelled again, whole, with its own seed."""
    have = {key for key, _ in found}
    partial = set()
    for batch in batches:
        keys = {(e.id, j) for e in batch for j in range(trajectories)}
        if keys & have and not keys <= have:
            partial |= keys
    if partial:
        kept = b"".join(line for key, line in found if key not in partial)
        if is_remote(out):
            out.write_bytes(kept)
        else:
            tmp = Path(str(out) + ".tmp")
            tmp.write_bytes(kept)
            os.replace(tmp, out)
    return have - partial


def open_label_run(out: str | Path, meta: dict[str, Any]) -> list[tuple[tuple[str, int], bytes]]:
    """Check (or write) ``OUT.meta.json`` and return the records already labelled, as
    ``((example id, sample), line)``.

    A label file written with other settings, or a file that is not a label
    file, is refused with one clear error (nothing is overwritten).
    """
    out = as_path(out)  # local, or gs://... (jaxsql.paths)
    meta_path = _meta_path(out)
    if meta_path.exists():
        old = read_saved_settings(meta_path, "label settings")
        diff = changed_settings(old, meta)
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in diff)
            raise JaxsqlError(f"{out} was labelled with other settings ({changes}); choose another --out "
                              f"to start over")
        return _labelled(out)
    if out.exists() and out.read_bytes():
        raise JaxsqlError(f"{out} exists and has no {meta_path.name}; it is not a label run to resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    out.write_text("")
    return []


def run_labeling(examples: Sequence[Example], out: str | Path, *, pool: Any,
                 prompt_ids: Callable[[Example], Sequence[int]], sample: SampleFn, settings: LabelSettings,
                 meta: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Sample `settings.trajectories` trajectories per example, label their steps, append the
    records to `out` one batch at a time; a rerun with the same settings resumes after the
    last finished batch and gives the same file as an uninterrupted run."""
    from tqdm import tqdm

    out = as_path(out)
    found = open_label_run(out, {**meta, **{f"settings.{k}": v for k, v in dataclasses.asdict(settings).items()}})
    bs = settings.batch_size
    batches = [list(examples[s:s + bs]) for s in range(0, len(examples), bs)]
    done = _drop_unfinished(out, found, batches, settings.trajectories)
    appender = LineAppender(out)  # durable per batch; in a bucket the object is rewritten whole
    todo = [(b, batch) for b, batch in enumerate(batches)
            if not all((e.id, j) in done for e in batch for j in range(settings.trajectories))]
    stats = {"examples": len(examples), "resumed_batches": len(batches) - len(todo), "records": 0, "steps": 0,
             "positive_steps": 0}
    bar = tqdm(total=len(examples), initial=sum(len(b) for b in batches) - sum(len(b) for _, b in todo),
               disable=not progress, unit="ex", desc="prm label")
    for b, batch in todo:
        seed = settings.seed * 1_000_003 + b
        texts = sample([prompt_ids(e) for e in batch], [""] * len(batch), settings.trajectories, seed)
        exs = [e for e in batch for _ in range(settings.trajectories)]
        comps = [t for group in texts for t in group]
        idx = [j for _ in batch for j in range(settings.trajectories)]
        records = label_completions(exs, comps, idx, pool=pool, prompt_ids=prompt_ids, sample=sample,
                                    settings=settings, seed=seed + 500_009)
        lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
        appender.append(lines)
        stats["records"] += len(records)
        stats["steps"] += sum(len(r.steps) for r in records)
        stats["positive_steps"] += sum(s.hard > 0 for r in records for s in r.steps)
        bar.update(len(batch))
    bar.close()
    return stats
