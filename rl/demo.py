"""`jaxsql demo`: SFT -> GRPO -> evaluation -> HF export on the synthetic benchmark, on a laptop CPU.

Phases (each records its completion in the marker file ``DIR/jaxsql_demo.json``,
so a rerun skips finished phases and a killed one continues from the last
checkpoint of the phase it was in):

1. ``data``: generate the synthetic benchmark into ``DIR/data``; train a
   byte-level BPE tokenizer on train prompts + targets and dev prompts (no dev
   labels) and save it as a `transformers` tokenizer in ``DIR/tokenizer``.
2. ``sft``: supervised cold start of a small Qwen2-style decoder from random
   weights on the first ``sft_examples`` train examples (cross-entropy on the
   completion tokens; `rl.train_step` with ``kind="sft"``).
3. ``eval_sft``: greedy decoding on the held-out dev split (`rl.evaluate`).
4. ``rl``: GRPO (Shao et al. 2024) with the ``execution`` reward computed from
   gold *answers* only (weak supervision, Kulkarni & Srikumar 2025): every
   example handed to the reward has ``gold_sql=None``; the host `SqlPool` runs
   every sample. Group-normalised advantages, token-mean loss, clip-higher,
   beta = 0 (no reference model).
5. ``eval_rl``: greedy dev evaluation of the RL policy.
6. ``export``: HF checkpoint in ``DIR/hf_export`` (+ tokenizer) and, when
   transformers and torch are installed, a load-and-compare-logits check.
7. ``report``: ``DIR/plot.png`` and ``DIR/report.md``.

Metrics go to ``DIR/metrics.jsonl`` (one JSON object per line with a
``phase`` key) and TensorBoard events under ``DIR/tensorboard``; orbax
checkpoints to ``DIR/checkpoints/{sft,rl}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxsql.config import require
from jaxsql.errors import JaxsqlError

MARKER = "jaxsql_demo.json"
PHASES = ("data", "sft", "eval_sft", "rl", "eval_rl", "export", "report")
PROMPT_FORMAT = "plain"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run (the budget `minutes` is not part of its identity).

    Attributes:
      seed: benchmark, initialisation, data order and sampling all derive from it.
      minutes: wall-clock budget shared by the phases; a phase that would overrun
        its share stops early and the report says so.
      n_train, n_dev: synthetic benchmark size.
      sft_examples: train examples (first N) used for SFT; RL draws from all of train.
      vocab_size: tokenizer vocabulary.
      hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the decoder.
      prompt_len: prompts are left-padded (or left-truncated) to this many tokens.
      max_new_tokens: completion length cap (SFT targets are cut to it).
      sft_steps, sft_batch, sft_lr, sft_warmup: the cold start (AdamW, cosine to 10%).
      rl_steps, rl_prompts, rl_generations: GRPO steps, prompts per step, G.
      rl_temperature, rl_lr, rl_eps_high: sampling temperature, AdamW lr, clip-higher epsilon.
      reward_correct, reward_wrong, reward_failed: `execution` reward values.
      eval_every: dev evaluation every N RL steps (0 = only before and after).
      eval_batch: prompts per greedy `generate` call.
      ckpt_every: checkpoint every N steps in SFT and RL.
    """

    seed: int = 0
    minutes: float = 10.0
    n_train: int = 2000
    n_dev: int = 300
    sft_examples: int = 2000
    vocab_size: int = 1024
    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 576
    prompt_len: int = 128
    max_new_tokens: int = 40
    sft_steps: int = 150
    sft_batch: int = 32
    sft_lr: float = 2e-3
    sft_warmup: int = 20
    rl_steps: int = 40
    rl_prompts: int = 8
    rl_generations: int = 8
    rl_temperature: float = 0.8
    rl_lr: float = 3e-4
    rl_eps_high: float = 0.28
    reward_correct: float = 1.0
    reward_wrong: float = 0.0
    reward_failed: float = -1.0
    eval_every: int = 10
    eval_batch: int = 100
    ckpt_every: int = 25

    def __post_init__(self) -> None:
        name = "DemoConfig"
        require(self.minutes > 0, name, "minutes", "must be > 0")
        for f in ("n_train", "n_dev", "sft_examples", "sft_steps", "sft_batch", "rl_steps", "rl_prompts",
                  "eval_batch", "ckpt_every", "max_new_tokens"):
            require(getattr(self, f) >= 1, name, f, "must be >= 1")
        require(self.sft_examples <= self.n_train, name, "sft_examples", "must be <= n_train")
        require(self.rl_generations >= 2, name, "rl_generations", "GRPO needs at least 2 samples per prompt")
        require(self.hidden_size % self.num_heads == 0, name, "hidden_size", "must be a multiple of num_heads")
        require((self.hidden_size // self.num_heads) % 2 == 0, name, "hidden_size",
                "hidden_size / num_heads must be even (rotary embeddings)")
        require(self.prompt_len >= 16, name, "prompt_len", "must be >= 16")

    def identity(self) -> dict[str, Any]:
        """The fields a rerun on the same directory must agree with."""
        d = dataclasses.asdict(self)
        d.pop("minutes")
        return d


def smoke_config(seed: int = 0, minutes: float = 3.0) -> DemoConfig:
    """A few steps of every phase with a very small model (CI, tests)."""
    return DemoConfig(seed=seed, minutes=minutes, n_train=120, n_dev=24, sft_examples=120, vocab_size=384,
                      hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      prompt_len=128, max_new_tokens=12, sft_steps=3, sft_batch=8, sft_warmup=0,
                      rl_steps=2, rl_prompts=2, rl_generations=2, eval_every=1, eval_batch=24, ckpt_every=2)


# --- the output directory and its marker ------------------------------------------------------


class DemoDir:
    """The demo's output directory: paths, the marker with phase records, the metrics files."""

    def __init__(self, out_dir: str | Path, config: DemoConfig):
        self.root = Path(out_dir)
        self.config = config
        self.marker = self.root / MARKER
        self._check_and_claim()
        self._tb = None
        self.progress = True

    def _check_and_claim(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise JaxsqlError(f"{self.root}: exists and is not a directory")
        if self.marker.exists():
            try:
                state = json.loads(self.marker.read_text())
            except json.JSONDecodeError as e:
                raise JaxsqlError(f"{self.marker}: unreadable demo marker ({e}); choose another --out") from None
            old = state.get("config", {})
            diff = sorted(k for k, v in self.config.identity().items() if old.get(k) != v)
            if diff:
                raise JaxsqlError(
                    f"{self.root} holds a demo run with different settings ({', '.join(diff)}); "
                    f"rerun with the same options or choose another --out")
            self.state = state
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise JaxsqlError(
                f"{self.root} is not empty and holds no {MARKER}: it is not a jaxsql demo directory; "
                f"choose an empty or new --out directory (nothing was written)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = {"demo": "jaxsql", "config": self.config.identity(), "phases": {}}
        self._save()

    def _save(self) -> None:
        tmp = self.marker.with_name(MARKER + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.marker)

    def done(self, phase: str) -> bool:
        return bool(self.state["phases"].get(phase, {}).get("done"))

    def record(self, phase: str, **info: Any) -> None:
        """Mark `phase` complete with `info` (seconds, results)."""
        self.state["phases"][phase] = dict(info, done=True)
        self._save()

    def info(self, phase: str) -> dict[str, Any]:
        return dict(self.state["phases"].get(phase, {}))

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def log_metrics(self, phase: str, step: int, metrics: dict[str, Any]) -> None:
        """Append a line to metrics.jsonl and the same scalars to TensorBoard as ``phase/name``."""
        row: dict[str, Any] = {"phase": phase, "step": int(step), "time": time.time()}
        for k, v in metrics.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            row[k] = f if math.isfinite(f) else None
        with self.path("metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.path("tensorboard")))
        for k, v in row.items():
            if k not in ("phase", "step", "time") and v is not None:
                self._tb.add_scalar(f"{phase}/{k}", v, int(step))
        self._tb.flush()

    def read_metrics(self, phase: str | None = None) -> list[dict[str, Any]]:
        p = self.path("metrics.jsonl")
        if not p.exists():
            return []
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [r for r in rows if phase is None or r.get("phase") == phase]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def peak_memory_bytes() -> int:
    """Peak resident memory of this process and its waited-for children (ru_maxrss, KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(max(own, kids) * scale)


class Clock:
    """The shared wall-clock budget of one invocation."""

    def __init__(self, minutes: float):
        self.start = time.time()
        self.budget = minutes * 60.0

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    @staticmethod
    def fmt(seconds: float) -> str:
        s = max(0, int(seconds))
        return f"{s // 60}:{s % 60:02d}"


class Progress:
    """One status line per phase: step, live metric, elapsed and time left."""

    def __init__(self, phase: str, total: int, clock: Clock, initial: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self.clock = clock
        self.bar = tqdm(total=total, initial=initial, desc=f"[{phase}]", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, mininterval=0.5)

    def update(self, **shown: float) -> None:
        post = " ".join(f"{k}={v:.3f}" for k, v in shown.items())
        self.bar.set_postfix_str(f"{post} left={Clock.fmt(self.clock.left())}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# --- shared pieces of the phases ----------------------------------------------------------------


@dataclasses.dataclass
class _Context:
    """What later phases need: the benchmark, tokenizer, model config, mesh, encoded prompts."""

    cfg: DemoConfig
    bench: Any
    tok: Any
    mcfg: Any
    mesh: Any
    schema: Callable[[str], str]
    prompt_ids: dict[str, list[int]]


def model_config(cfg: DemoConfig, tok: Any):
    """The demo's decoder: Qwen2 architecture (loads in transformers), tied embeddings."""
    from models.config import ModelConfig

    return ModelConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, rope_theta=10000.0, tie_word_embeddings=True,
        max_position_embeddings=max(512, cfg.prompt_len + cfg.max_new_tokens),
        bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)


def _context(d: DemoDir) -> _Context:
    import jax
    from transformers import AutoTokenizer

    from data.synthetic import load_benchmark
    from jaxsql.sharding import make_mesh
    from rl.evaluate import encode_prompts, schema_cache

    cfg = d.config
    bench = load_benchmark(d.path("data"))
    tok = AutoTokenizer.from_pretrained(str(d.path("tokenizer")))
    schema = schema_cache()
    examples = list(bench.train) + list(bench.dev)
    ids = encode_prompts(examples, tok, schema, PROMPT_FORMAT, cfg.prompt_len)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return _Context(cfg, bench, tok, model_config(cfg, tok), mesh, schema,
                    {e.id: p for e, p in zip(examples, ids)})


def weak_supervision(examples: Sequence[Any]) -> list[Any]:
    """The examples as the reward sees them: gold answers only, ``gold_sql=None``."""
    out = [dataclasses.replace(e, gold_sql=None) for e in examples]
    for e in out:
        if e.gold_answers is None:
            raise JaxsqlError(f"example {e.id} has no gold answers; the weak-supervision reward needs them")
    return out


def sft_batch(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], prompt_len: int,
              completion_len: int) -> dict[str, np.ndarray]:
    """``[left-padded prompt | target + right padding]`` rows with a completion-only loss mask."""
    n, T = len(prompts), prompt_len + completion_len
    tokens = np.zeros((n, T), np.int32)
    mask = np.zeros((n, T), np.int32)
    cm = np.zeros((n, T), np.int32)
    for r, (p, t) in enumerate(zip(prompts, targets)):
        p, t = list(p)[-prompt_len:], list(t)[:completion_len]
        tokens[r, prompt_len - len(p):prompt_len] = p
        mask[r, prompt_len - len(p):prompt_len] = 1
        tokens[r, prompt_len:prompt_len + len(t)] = t
        mask[r, prompt_len:prompt_len + len(t)] = 1
        cm[r, prompt_len:prompt_len + len(t)] = 1
    return {"tokens": tokens, "mask": mask, "completion_mask": cm}


def rollout_batch(prompt_tokens: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray,
                  lengths: np.ndarray, advantages: np.ndarray) -> dict[str, np.ndarray]:
    """GRPO rows from sampler output: prompt | completion (stop token included) | padding."""
    M = tokens.shape[1]
    cmask = (np.arange(M)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return {"tokens": np.concatenate([prompt_tokens, tokens], 1).astype(np.int32),
            "mask": np.concatenate([prompt_mask, cmask], 1).astype(np.int32),
            "completion_mask": np.concatenate([np.zeros_like(prompt_mask), cmask], 1).astype(np.int32),
            "advantages": np.asarray(advantages, np.float32)}


def _sft_step(ctx: _Context):
    from rl.config import OptimSection
    from rl.train_step import StepConfig, TrainStep, make_optimizer

    cfg = ctx.cfg
    optim = OptimSection(learning_rate=cfg.sft_lr, warmup_steps=cfg.sft_warmup, schedule="cosine",
                         final_lr_ratio=0.1, max_grad_norm=1.0)
    return TrainStep(ctx.mcfg, StepConfig(kind="sft"), make_optimizer(optim, cfg.sft_steps), ctx.mesh)


def _rl_step(ctx: _Context):
    from rl import algo
    from rl.config import OptimSection
    from rl.train_step import StepConfig, TrainStep, make_optimizer

    cfg = ctx.cfg
    loss = algo.PolicyLossConfig(loss_agg="token_mean", eps_low=0.2, eps_high=cfg.rl_eps_high, beta=0.0,
                                 max_len=cfg.max_new_tokens)
    sc = StepConfig(kind="grpo", loss=loss, temperature=cfg.rl_temperature)
    optim = OptimSection(learning_rate=cfg.rl_lr, max_grad_norm=1.0)
    return TrainStep(ctx.mcfg, sc, make_optimizer(optim, cfg.rl_steps), ctx.mesh)


def _fresh_state(ctx: _Context, ts, params=None):
    import jax

    from models.model import init_params
    from rl.train_step import init_state

    if params is None:
        params = init_params(ctx.mcfg, jax.random.PRNGKey(ctx.cfg.seed))
    return {"train": init_state(params, ts.optimizer, ts.state_shardings),
            "key": jax.random.PRNGKey(ctx.cfg.seed + 1)}


def _checkpointer(d: DemoDir, phase: str):
    from jaxsql.checkpoint import Checkpointer

    return Checkpointer(d.path("checkpoints", phase), max_to_keep=2, async_save=False)


def _final_params(d: DemoDir, ctx: _Context, phase: str):
    """Parameters of the last checkpoint of `phase` ("sft" or "rl")."""
    ts = _sft_step(ctx) if phase == "sft" else _rl_step(ctx)
    ck = _checkpointer(d, phase)
    try:
        state, _ = ck.restore(_fresh_state(ctx, ts))
    finally:
        ck.close()
    return state["train"]["params"]


def _iterator(examples: Sequence[Any], batch_size: int, seed: int):
    from data.pipeline import make_iterator

    return make_iterator([e.to_dict() for e in examples], batch_size=batch_size, seed=seed, num_epochs=None,
                         shard_index=0, shard_count=1, drop_remainder=True)


# --- phases -----------------------------------------------------------------------------------


def _phase_data(d: DemoDir, say: Callable[[str], None]) -> dict[str, Any]:
    from data.prompts import render_prompt, render_target
    from data.synthetic import generate_benchmark
    from data.tokenizer import CHAT_TEMPLATE, train_tokenizer
    from rl.evaluate import schema_cache

    cfg = d.config
    bench = generate_benchmark(d.path("data"), seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev)
    schema = schema_cache()
    # Dev contributes its prompts (schema + question) but never its labels.
    texts = [render_prompt(e, schema(e.db_path), PROMPT_FORMAT) + render_target(e, PROMPT_FORMAT)
             for e in bench.train]
    texts += [render_prompt(e, schema(e.db_path), PROMPT_FORMAT) for e in bench.dev]
    texts += [CHAT_TEMPLATE, "system\nuser\nassistant\n"] * 4
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, out_dir=d.path("tokenizer"))
    say(f"benchmark: {len(bench.train)} train / {len(bench.dev)} dev examples; tokenizer: {len(tok)} tokens")
    return {"n_train": len(bench.train), "n_dev": len(bench.dev), "vocab": len(tok)}


def _phase_sft(d: DemoDir, ctx: _Context, clock: Clock, deadline: float, say) -> dict[str, Any]:
    import jax

    from data.pipeline import iterator_state, restore_iterator
    from data.prompts import render_target

    cfg = ctx.cfg
    examples = list(ctx.bench.train[: cfg.sft_examples])
    eos = ctx.tok.eos_token_id
    targets = {e.id: ctx.tok(render_target(e, PROMPT_FORMAT), add_special_tokens=False)["input_ids"] + [eos]
               for e in examples}
    ts = _sft_step(ctx)
    state = _fresh_state(ctx, ts)
    it = _iterator(examples, cfg.sft_batch, cfg.seed)
    ck = _checkpointer(d, "sft")
    start = 0
    if ck.latest_step() is not None:
        state, meta = ck.restore(state)
        it = restore_iterator(it, meta["data_state"])
        start = int(meta["step"])
        say(f"sft: resuming from checkpoint step {start}")
    bar = Progress("sft", cfg.sft_steps, clock, initial=start, enabled=d.progress)
    step, stopped = start, False
    t0 = time.time()
    try:
        while step < cfg.sft_steps:
            if time.time() > deadline:
                stopped = True
                break
            batch = next(it)
            host = sft_batch([ctx.prompt_ids[e.id] for e in batch], [targets[e.id] for e in batch],
                             cfg.prompt_len, cfg.max_new_tokens)
            train, m = ts(state["train"], ts.place_batch(host))
            state = {"train": train, "key": state["key"]}
            step += 1
            m = jax.device_get(m)
            d.log_metrics("sft", step, {"loss": m["loss"], "grad_norm": m["grad_norm"],
                                        "tokens": m["tokens"]})
            bar.update(loss=float(m["loss"]))
            if step % cfg.ckpt_every == 0 or step == cfg.sft_steps:
                ck.save(step, state, data_state=iterator_state(it), config=cfg.identity())
        if ck.latest_step() != step:
            ck.save(step, state, data_state=iterator_state(it), config=cfg.identity())
    finally:
        bar.close()
        ck.close()
    return {"steps": step, "stopped_early": stopped, "train_seconds": round(time.time() - t0, 1)}


def _evaluate(ctx: _Context, params, pool) -> Any:
    from rl.evaluate import evaluate

    return evaluate(params, ctx.mcfg, ctx.tok, ctx.bench.dev, pool, prompt_format=PROMPT_FORMAT,
                    schema=ctx.schema, max_new_tokens=ctx.cfg.max_new_tokens, batch_size=ctx.cfg.eval_batch,
                    max_prompt_len=ctx.cfg.prompt_len, buckets=(ctx.cfg.prompt_len,))


def _phase_eval(d: DemoDir, ctx: _Context, phase: str, pool, say) -> dict[str, Any]:
    source = "sft" if phase == "eval_sft" else "rl"
    params = _final_params(d, ctx, source)
    res = _evaluate(ctx, params, pool)
    step = 0 if phase == "eval_sft" else d.info("rl").get("steps", 0)
    d.log_metrics("eval", step, res.summary)
    d.path(f"{phase}.json").write_text(json.dumps({"summary": res.summary, "rows": list(res.rows)},
                                                  indent=1, default=str) + "\n")
    s = res.summary
    say(f"{phase}: EX(set) {100 * s['ex_set']:.1f}%  EX(bag) {100 * s['ex_bag']:.1f}%  "
        f"errors {100 * s['error_rate']:.1f}%  QATCH {100 * s['qatch']:.1f}%")
    return {"summary": s}


def _phase_rl(d: DemoDir, ctx: _Context, clock: Clock, deadline: float, pool, say) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from data.pipeline import iterator_state, restore_iterator
    from jaxsql.rewards import RewardConfig, score_batch
    from models.sampler import generate
    from rl import algo
    from rl.evaluate import decode_completions

    cfg = ctx.cfg
    G = cfg.rl_generations
    reward_cfg = RewardConfig(weights={"execution": 1.0}, params={"execution": {
        "correct": cfg.reward_correct, "wrong": cfg.reward_wrong, "failed": cfg.reward_failed}})
    ts = _rl_step(ctx)
    ck = _checkpointer(d, "rl")
    it = _iterator(ctx.bench.train, cfg.rl_prompts, cfg.seed + 1)
    start = 0
    if ck.latest_step() is not None:
        state, meta = ck.restore(_fresh_state(ctx, ts))
        it = restore_iterator(it, meta["data_state"])
        start = int(meta["step"])
        say(f"rl: resuming from checkpoint step {start}")
    else:
        state = _fresh_state(ctx, ts, params=_final_params(d, ctx, "sft"))
    stop_ids = tuple(ctx.mcfg.eos_token_ids)
    bar = Progress("rl", cfg.rl_steps, clock, initial=start, enabled=d.progress)
    step, stopped = start, False
    t0 = time.time()
    try:
        while step < cfg.rl_steps:
            if time.time() > deadline:
                stopped = True
                break
            t_step = time.time()
            batch = next(it)
            weak = weak_supervision(batch)
            key, sample_key = jax.random.split(state["key"])
            out = generate(state["train"]["params"], ctx.mcfg, [ctx.prompt_ids[e.id] for e in batch],
                           key=sample_key, max_new_tokens=cfg.max_new_tokens, num_samples=G,
                           temperature=cfg.rl_temperature, stop_ids=stop_ids, buckets=(cfg.prompt_len,))
            toks, lens, ptoks, pmask = jax.device_get((out.tokens, out.lengths, out.prompt_tokens,
                                                       out.prompt_mask))
            t_roll = time.time()
            completions = decode_completions(ctx.tok, toks, lens, stop_ids)
            scored = score_batch(pool, completions, [e for e in weak for _ in range(G)], reward_cfg)
            t_rew = time.time()
            adv = np.asarray(algo.compute_advantages("grpo", jnp.asarray(scored.rewards), G))
            host = rollout_batch(ptoks, pmask, toks, lens, adv)
            train, m = ts(state["train"], ts.place_batch(host))
            state = {"train": train, "key": key}
            m = jax.device_get(m)
            step += 1
            s = scored.summary
            informative = float(np.mean(algo.informative_groups(scored.rewards, G)))
            d.log_metrics("rl", step, {
                "reward": s["reward_mean"], "train_ex": s["ex"], "train_error_rate": s["error_rate"],
                "informative_groups": informative, "loss": m["loss"], "entropy": m.get("entropy", np.nan),
                "clip_fraction": m.get("clip_fraction", np.nan), "grad_norm": m["grad_norm"],
                "completion_len": float(np.mean(lens)), "time/rollout": t_roll - t_step,
                "time/reward": t_rew - t_roll, "time/update": time.time() - t_rew})
            bar.update(reward=s["reward_mean"], ex=s["ex"])
            if step % cfg.ckpt_every == 0 or step == cfg.rl_steps:
                ck.save(step, state, data_state=iterator_state(it), config=cfg.identity())
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.rl_steps:
                ev = _evaluate(ctx, state["train"]["params"], pool)
                d.log_metrics("eval", step, ev.summary)
                bar.bar.write(f"[rl] step {step}: dev EX(set) {100 * ev.summary['ex_set']:.1f}%")
        if ck.latest_step() != step:
            ck.save(step, state, data_state=iterator_state(it), config=cfg.identity())
    finally:
        bar.close()
        ck.close()
    return {"steps": step, "stopped_early": stopped, "train_seconds": round(time.time() - t0, 1)}


def _phase_export(d: DemoDir, ctx: _Context, say) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from models.hf_io import save_hf_checkpoint
    from models.model import forward, positions_from_mask

    params = _final_params(d, ctx, "rl")
    out = d.path("hf_export")
    save_hf_checkpoint(out, ctx.mcfg, params, tokenizer_dir=d.path("tokenizer"), overwrite=True)
    try:
        import torch
        import transformers
    except ImportError as e:
        msg = f"skipped the transformers load check ({e.name} is not installed)"
        say(f"export: {out}; {msg}")
        return {"hf_check": msg}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = ctx.prompt_ids[ctx.bench.dev[0].id]
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    tokens = jnp.asarray([ids], jnp.int32)
    ours, _ = forward(params, tokens, positions_from_mask(jnp.ones_like(tokens)), ctx.mcfg)
    diff = float(np.max(np.abs(np.asarray(jax.device_get(ours))[0] - hf_logits)))
    ok = diff < 1e-3 and len(tok) == len(ctx.tok)
    msg = (f"transformers {transformers.__version__} loads hf_export (AutoModelForCausalLM + AutoTokenizer); "
           f"max |logit difference| vs jaxsql = {diff:.2e}")
    say(f"export: {out}; {msg}")
    if not ok:
        raise JaxsqlError(f"{out}: the HF export does not reproduce the model in transformers "
                          f"(max |logit difference| {diff:.2e}, tokenizer size {len(tok)} vs {len(ctx.tok)})")
    del model
    return {"hf_check": msg, "max_logit_diff": diff}


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A resumed phase may log a step twice (killed between logging and checkpointing): keep the last.
    by_step = {r["step"]: r for r in rows}
    return [by_step[k] for k in sorted(by_step)]


def write_plot(d: DemoDir) -> Path:
    """``plot.png``: RL reward per step (and its running mean) and dev EX over RL steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = _dedupe(d.read_metrics("rl"))
    ev = _dedupe(d.read_metrics("eval"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if rl:
        x = [r["step"] for r in rl]
        y = [r.get("reward") or 0.0 for r in rl]
        k = max(1, len(y) // 8)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax1.plot(x, y, color="0.75", lw=1, label="batch mean")
        ax1.plot(x[k - 1:], smooth, color="C0", lw=2, label=f"running mean ({k})")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set(title="GRPO reward (execution, answers only)", xlabel="RL step", ylabel="reward")
    if ev:
        ax2.plot([r["step"] for r in ev], [100 * (r.get("ex_set") or 0) for r in ev], "o-", label="EX (set)")
        ax2.plot([r["step"] for r in ev], [100 * (r.get("ex_bag") or 0) for r in ev], "s--", label="EX (bag)")
        ax2.plot([r["step"] for r in ev], [100 * (r.get("error_rate") or 0) for r in ev], "x:",
                 label="error rate")
        ax2.legend(loc="best", fontsize=8)
    ax2.set(title="dev split, greedy (step 0 = SFT)", xlabel="RL step", ylabel="%")
    fig.tight_layout()
    path = d.path("plot.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(d: DemoDir, total_seconds: float, peak_bytes: int) -> Path:
    """``report.md``: the before/after table, phase times, peak memory, settings."""
    before = d.info("eval_sft").get("summary", {})
    after = d.info("eval_rl").get("summary", {})
    rows = [("EX (set semantics)", "ex_set", True), ("refined EX (bag semantics)", "ex_bag", True),
            ("execution error rate", "error_rate", False), ("QATCH cell precision", "cell_precision", True),
            ("QATCH cell recall", "cell_recall", True), ("QATCH tuple cardinality", "tuple_cardinality", True),
            ("QATCH mean", "qatch", True)]
    cfg = d.config
    lines = ["# jaxsql demo report", "",
             f"Synthetic benchmark (seed {cfg.seed}): {cfg.n_train} train / {cfg.n_dev} dev questions; "
             f"dev has unseen values and held-out template-domain pairs. Greedy decoding on the whole dev split.",
             "", "| metric (dev) | SFT (before RL) | after GRPO | change |", "|---|---:|---:|---:|"]
    for label, key, _ in rows:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        lines.append(f"| {label} | {100 * b:.1f}% | {100 * a:.1f}% | {100 * (a - b):+.1f} pts |")
    sft, rl = d.info("sft"), d.info("rl")
    lines += ["", "## Run", "",
              f"- SFT: {sft.get('steps')} steps x {cfg.sft_batch} examples (first {cfg.sft_examples} train examples), "
              f"lr {cfg.sft_lr}" + (" — stopped early by the time budget" if sft.get("stopped_early") else ""),
              f"- GRPO: {rl.get('steps')} steps x {cfg.rl_prompts} prompts x G={cfg.rl_generations}, "
              f"temperature {cfg.rl_temperature}, lr {cfg.rl_lr}, beta 0, token-mean loss, clip "
              f"[0.8, {1 + cfg.rl_eps_high}]; reward `execution` ({cfg.reward_correct} / {cfg.reward_wrong} / "
              f"{cfg.reward_failed}) against gold answers only (gold SQL never given to the reward)"
              + (" — stopped early by the time budget" if rl.get("stopped_early") else ""),
              f"- model: Qwen2-style decoder, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
              f"{cfg.num_heads} heads ({cfg.num_kv_heads} KV), vocab {d.info('data').get('vocab')}, "
              f"random init; prompts {cfg.prompt_len} tokens, completions <= {cfg.max_new_tokens}",
              f"- HF export: {d.info('export').get('hf_check', 'not run')}", "",
              "| phase | seconds |", "|---|---:|"]
    for p in PHASES[:-1]:
        if "seconds" in d.info(p):
            lines.append(f"| {p} | {d.info(p)['seconds']:.1f} |")
    lines += [f"| **total (all phases)** | {total_seconds:.1f} |", "",
              f"Peak resident memory of the demo process (ru_maxrss, the invocation that finished the run): **{peak_bytes / 2**30:.2f} GiB**.",
              "", "![reward and dev EX](plot.png)", ""]
    path = d.path("report.md")
    path.write_text("\n".join(lines))
    return path


def run_demo(out_dir: str | Path, config: DemoConfig | None = None, *, say: Callable[[str], None] | None = None,
             stop_after: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo in `out_dir`; returns the marker state.

    Args:
      out_dir: the output directory (created; refused if it holds anything but a demo).
      config: settings (default `DemoConfig()`).
      say: where progress lines go (default: stderr).
      stop_after: stop after this phase (tests of resuming).
      progress: show progress bars (stderr).
    """
    from jaxsql.sql import SqlPool

    config = config or DemoConfig()
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    if stop_after is not None and stop_after not in PHASES:
        raise JaxsqlError(f"stop_after: unknown phase {stop_after!r}; phases are {list(PHASES)}")
    d = DemoDir(out_dir, config)
    d.progress = progress
    clock = Clock(config.minutes)
    todo = [p for p in PHASES if not d.done(p)]
    if not todo:
        say(f"demo in {d.root} is already complete; see {d.path('report.md')}")
        return d.state
    if len(todo) < len(PHASES):
        say(f"resuming the demo in {d.root} at phase '{todo[0]}'")
    budget = clock.budget
    reserve = min(90.0, 0.15 * budget)  # eval after RL, export, report
    ctx = None
    pool = None
    try:
        for phase in todo:
            t = time.time()
            say(f"== {phase} ({Clock.fmt(clock.elapsed())} elapsed, {Clock.fmt(clock.left())} left)")
            if phase != "data" and ctx is None:
                ctx = _context(d)
            if phase in ("eval_sft", "rl", "eval_rl") and pool is None:
                pool = SqlPool(2)
            if phase == "data":
                info = _phase_data(d, say)
            elif phase == "sft":
                info = _phase_sft(d, ctx, clock, clock.start + 0.4 * budget, say)
            elif phase in ("eval_sft", "eval_rl"):
                info = _phase_eval(d, ctx, phase, pool, say)
            elif phase == "rl":
                info = _phase_rl(d, ctx, clock, clock.start + budget - reserve, pool, say)
            elif phase == "export":
                info = _phase_export(d, ctx, say)
            else:
                write_plot(d)
                total = sum(d.info(p).get("seconds", 0.0) for p in PHASES[:-1])
                write_report(d, total, peak_memory_bytes())
                info = {"peak_memory_bytes": peak_memory_bytes()}
                say(f"report: {d.path('report.md')}; plot: {d.path('plot.png')}")
            d.record(phase, seconds=round(time.time() - t, 1), **info)
            if phase == stop_after:
                break
    finally:
        if pool is not None:
            pool.close()
        d.close()
    return d.state
