"""`jaxsql demo`: SFT -> GRPO -> evaluation -> HF export on the synthetic benchmark, on a laptop CPU.

Phases (each records its completion in the marker file ``DIR/jaxsql_demo.json``,
so a rerun skips finished phases and a killed one continues from the last
checkpoint of the phase it was in):

1. ``data``: generate the synthetic benchmark into ``DIR/data``; train a
   byte-level BPE tokenizer on train prompts + targets only (see `_phase_data`)
   and save it as a `transformers` tokenizer in ``DIR/tokenizer``; write the
   SFT examples and GRPO's answer-only questions (`DemoConfig.rl_questions`)
   as JSONL; save the random initial model (HF) in ``DIR/checkpoints/init``.
2. ``sft``: supervised cold start (`rl.sft.SftTrainer`, driven step by step)
   on the first ``sft_examples`` train examples, deliberately moderate.
3. ``eval_sft``: greedy decoding on the held-out dev split (`rl.evaluate`).
4. ``rl``: GRPO (Shao et al. 2024; `rl.trainer.GrpoTrainer`, driven step by
   step) with the ``execution`` reward computed from gold *answers* only
   (weak supervision, Kulkarni & Srikumar 2025): the examples handed to the
   reward have ``gold_sql=None``; the host `SqlPool` runs every sample.
   Group-normalised advantages, DAPO dynamic sampling, token-mean loss,
   clip-higher, beta = 0 (no reference model).
5. ``eval_rl``: greedy dev evaluation of the RL policy.
6. ``export``: HF checkpoint in ``DIR/hf_export`` (+ tokenizer) and, when
   transformers and torch are installed, a load-and-compare-logits check.
7. ``report``: ``DIR/plot.png`` and ``DIR/report.md``.

Metrics go to ``DIR/metrics.jsonl`` (one JSON object per line with a
``phase`` key) and TensorBoard events under ``DIR/tensorboard``; orbax
checkpoints in the trainers' run directories ``DIR/checkpoints/{sft,rl}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxsql.config import require
from jaxsql.errors import JaxsqlError
from rl.demo_report import peak_memory_bytes, write_plot, write_report

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
      rl_questions: where GRPO's answer-only questions come from: "new_databases" (the train
        split of a second synthetic draw, seed + 1000: new databases and entity names, train
        value pools; questions of the dev split's held-out template-domain pairs or naming a
        value of a dev database are dropped) or "train" (the SFT split's questions again).
      rl_n_questions: size of the "new_databases" draw (before filtering).
      rl_steps, rl_prompts, rl_generations: GRPO steps, prompts per step, G.
      rl_temperature, rl_lr, rl_eps_high: sampling temperature, AdamW lr, clip-higher epsilon.
      rl_dynamic_sampling: DAPO dynamic sampling (drop groups whose G rewards are equal, refill
        from up to 2 more batches).
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
    vocab_size: int = 512
    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 576
    prompt_len: int = 128
    max_new_tokens: int = 40
    sft_steps: int = 110
    sft_batch: int = 32
    sft_lr: float = 2e-3
    sft_warmup: int = 20
    rl_questions: str = "new_databases"
    rl_n_questions: int = 2000
    rl_steps: int = 200
    rl_prompts: int = 16
    rl_generations: int = 8
    rl_temperature: float = 1.0
    rl_lr: float = 1e-4
    rl_eps_high: float = 0.28
    rl_dynamic_sampling: bool = True
    reward_correct: float = 1.0
    reward_wrong: float = 0.0
    reward_failed: float = 0.0
    eval_every: int = 25
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
        require(self.rl_questions in ("new_databases", "train"), name, "rl_questions",
                f"must be new_databases or train, got {self.rl_questions!r}")

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
                      rl_n_questions=60, rl_steps=2, rl_prompts=2, rl_generations=2, rl_dynamic_sampling=False,
                      eval_every=1, eval_batch=24,
                      ckpt_every=2)


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
    """What later phases need: the benchmark, tokenizer, model config, encoded dev prompts."""

    cfg: DemoConfig
    bench: Any
    tok: Any
    mcfg: Any
    schema: Callable[[str], str]


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
    from transformers import AutoTokenizer

    from data.synthetic import load_benchmark
    from rl.evaluate import schema_cache

    bench = load_benchmark(d.path("data"))
    tok = AutoTokenizer.from_pretrained(str(d.path("tokenizer")))
    return _Context(d.config, bench, tok, model_config(d.config, tok), schema_cache())


def weak_supervision(examples: Sequence[Any]) -> list[Any]:
    """The examples as the reward sees them: gold answers only, ``gold_sql=None``."""
    out = [dataclasses.replace(e, gold_sql=None) for e in examples]
    for e in out:
        if e.gold_answers is None:
            raise JaxsqlError(f"example {e.id} has no gold answers; the weak-supervision reward needs them")
    return out


def _write_jsonl(path: Path, examples: Sequence[Any]) -> None:
    # Database paths relative to the file's folder (the JSONL reader resolves them there).
    rows = []
    for e in examples:
        row = e.to_dict()
        row["db_path"] = Path(e.db_path).name
        if row.get("gold_sql") is None:
            row.pop("gold_sql", None)
        rows.append(json.dumps(row, sort_keys=True))
    path.write_text("\n".join(rows) + "\n")


_RL_FILE = ("data_rl", "rl_answers.jsonl")


def _dev_text_values(dev_examples: Sequence[Any]) -> set[str]:
    """Every text cell of the dev databases, lower-cased."""
    import sqlite3

    values: set[str] = set()
    for db in sorted({e.db_path for e in dev_examples}):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for t in tables:
                for row in conn.execute(f'SELECT * FROM "{t}"'):
                    values.update(v.lower() for v in row if isinstance(v, str))
        finally:
            conn.close()
    return values


def _rl_questions(d: DemoDir, bench) -> tuple[list[Any], dict[str, int]]:
    """GRPO's questions (with gold SQL still attached; `weak_supervision` strips it)."""
    import re
    import shutil

    from data.synthetic import generate_benchmark

    cfg = d.config
    d.path(_RL_FILE[0]).mkdir(parents=True, exist_ok=True)
    if cfg.rl_questions == "train":
        for e in bench.train:
            shutil.copy2(e.db_path, d.path(_RL_FILE[0], Path(e.db_path).name))
        return list(bench.train), {}
    heldout = set(json.loads(d.path("data", "synthetic.json").read_text())["heldout"])
    dev_values = _dev_text_values(bench.dev)
    fresh = generate_benchmark(d.path(_RL_FILE[0]), seed=cfg.seed + 1000, n_train=cfg.rl_n_questions,
                               n_dev=4)
    # Only the answer-only file is kept: no gold SQL of these questions stays on disk.
    for name in ("train.jsonl", "dev.jsonl"):
        d.path(_RL_FILE[0], name).unlink()
    kept, held, named = [], 0, 0
    for e in fresh.train:
        template = e.id.split("-", 3)[3]
        domain = Path(e.db_path).name.split("_")[0]
        words = set(re.findall(r"[\w']+", e.question.lower()))
        if f"{template}@{domain}" in heldout:
            held += 1
        elif words & dev_values:
            named += 1
        else:
            kept.append(e)
    return kept, {"dropped_heldout": held, "dropped_dev_values": named}


def sft_run_config(d: DemoDir):
    """`rl.config.SftConfig` of the cold start (run directory ``DIR/checkpoints/sft``)."""
    from rl.config import CheckpointSection, DataSection, MeshSection, ModelSection, OptimSection, SftConfig

    c = d.config
    return SftConfig(
        run_dir=str(d.path("checkpoints", "sft")),
        model=ModelSection(path=str(d.path("checkpoints", "init")), tokenizer=str(d.path("tokenizer"))),
        data=DataSection(source="jsonl", path=str(d.path("data", "sft.jsonl")), split="train",
                         prompt_format=PROMPT_FORMAT, batch_size=c.sft_batch, shuffle_seed=c.seed,
                         max_prompt_len=c.prompt_len, max_target_len=c.max_new_tokens),
        optim=OptimSection(learning_rate=c.sft_lr, warmup_steps=c.sft_warmup, schedule="cosine",
                           final_lr_ratio=0.1, max_grad_norm=1.0),
        checkpoint=CheckpointSection(every_steps=c.ckpt_every, max_to_keep=2, async_save=False, export_hf=True),
        mesh=MeshSection(data=1), steps=c.sft_steps, seed=c.seed, tensorboard=False, progress=False)


def rl_run_config(d: DemoDir):
    """`rl.config.TrainConfig` of GRPO (run directory ``DIR/checkpoints/rl``), answers-only data."""
    from rl.config import (AlgoSection, CheckpointSection, DataSection, MeshSection, ModelSection,
                           OptimSection, SamplingSection, TrainConfig)

    c = d.config
    return TrainConfig(
        run_dir=str(d.path("checkpoints", "rl")),
        model=ModelSection(path=str(d.path("checkpoints", "sft", "hf")), tokenizer=str(d.path("tokenizer"))),
        data=DataSection(source="jsonl", path=str(d.path(*_RL_FILE)), split="train",
                         prompt_format=PROMPT_FORMAT, batch_size=c.rl_prompts, shuffle_seed=c.seed + 1,
                         max_prompt_len=c.prompt_len, max_target_len=c.max_new_tokens),
        sampling=SamplingSection(num_generations=c.rl_generations, max_new_tokens=c.max_new_tokens,
                                 temperature=c.rl_temperature),
        algo=AlgoSection(advantage="grpo", loss_agg="token_mean", eps_low=0.2, eps_high=c.rl_eps_high, beta=0.0,
                         dynamic_sampling=c.rl_dynamic_sampling, max_refill_batches=2),
        optim=OptimSection(learning_rate=c.rl_lr, max_grad_norm=1.0),
        checkpoint=CheckpointSection(every_steps=c.ckpt_every, max_to_keep=2, async_save=False, export_hf=False),
        mesh=MeshSection(data=1),
        reward={"weights": {"execution": 1.0}, "params": {"execution": {
            "correct": c.reward_correct, "wrong": c.reward_wrong, "failed": c.reward_failed}}},
        steps=c.rl_steps, seed=c.seed, tensorboard=False, progress=False)


def _has_checkpoint(run_dir: Path) -> bool:
    from jaxsql.checkpoint import Checkpointer

    if not (run_dir / "checkpoints").is_dir():
        return False
    ck = Checkpointer(run_dir / "checkpoints", max_to_keep=2, async_save=False)
    try:
        return ck.latest_step() is not None
    finally:
        ck.close()


def _scalars(m: dict[str, Any], keys: Sequence[str]) -> dict[str, float]:
    return {k.split("/", 1)[-1] if k.startswith("train/") else k: float(m[k]) for k in keys if k in m}


# --- phases -----------------------------------------------------------------------------------


def _phase_data(d: DemoDir, say: Callable[[str], None]) -> dict[str, Any]:
    import jax

    from data.prompts import render_prompt, render_target
    from data.synthetic import generate_benchmark
    from data.tokenizer import CHAT_TEMPLATE, train_tokenizer
    from models.hf_io import save_hf_checkpoint
    from models.model import init_params
    from rl.evaluate import schema_cache

    cfg = d.config
    bench = generate_benchmark(d.path("data"), seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev)
    schema = schema_cache()
    # Train text only: a merge learnt from dev questions would be a token that training never
    # updates (a dev-only value as one untrained embedding), which the model can neither read nor
    # copy. Fitted on train, dev values split into pieces the model has learnt to copy.
    texts = [render_prompt(e, schema(e.db_path), PROMPT_FORMAT) + render_target(e, PROMPT_FORMAT)
             for e in bench.train]
    texts += [CHAT_TEMPLATE, "system\nuser\nassistant\n"] * 4
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, out_dir=d.path("tokenizer"))
    # SFT sees gold SQL of its examples; RL sees every train question with its answers only.
    _write_jsonl(d.path("data", "sft.jsonl"), bench.train[: cfg.sft_examples])
    rl_examples, rl_info = _rl_questions(d, bench)
    _write_jsonl(d.path(*_RL_FILE), weak_supervision(rl_examples))
    mcfg = model_config(cfg, tok)
    params = init_params(mcfg, jax.random.PRNGKey(cfg.seed))
    save_hf_checkpoint(d.path("checkpoints", "init"), mcfg, params, tokenizer_dir=d.path("tokenizer"),
                       overwrite=True)
    say(f"benchmark: {len(bench.train)} train / {len(bench.dev)} dev examples; tokenizer: {len(tok)} tokens; "
        f"model: {mcfg.num_params() / 1e6:.2f}M parameters (random init)")
    say(f"GRPO questions (answers only): {len(rl_examples)} from {cfg.rl_questions}"
        + (f" ({rl_info['dropped_heldout']} of held-out dev template-domain pairs and "
           f"{rl_info['dropped_dev_values']} naming a dev value dropped)" if rl_info else ""))
    return {"n_train": len(bench.train), "n_dev": len(bench.dev), "vocab": len(tok),
            "params": mcfg.num_params(), "rl_questions": len(rl_examples), **rl_info}


def _phase_sft(d: DemoDir, clock: Clock, deadline: float, say) -> dict[str, Any]:
    """Drive `rl.sft.SftTrainer` step by step (its `run()` has no budget or per-step hook)."""
    from rl.sft import SftTrainer

    config = sft_run_config(d)
    run_dir = Path(config.run_dir)
    resume = _has_checkpoint(run_dir)
    trainer = SftTrainer(config, resume=resume)
    step, stopped = trainer.start_step, False
    if resume:
        say(f"sft: resuming from checkpoint step {step}")
    bar = Progress("sft", config.steps, clock, initial=step, enabled=d.progress)
    t0 = time.time()
    try:
        while step < config.steps:
            if time.time() > deadline:
                stopped = True
                break
            m, _ = trainer.step()
            step += 1
            d.log_metrics("sft", step, _scalars(m, ("loss", "grad_norm", "tokens")))
            bar.update(loss=m["loss"])
            if step % config.checkpoint.every_steps == 0:
                trainer.save(step)
        trainer.save(step)
        trainer.checkpointer.wait()
        trainer.export(run_dir / "hf")
    finally:
        bar.close()
        trainer.close()
    return {"steps": step, "stopped_early": stopped, "train_seconds": round(time.time() - t0, 1)}


def _load_params(path: Path):
    from models.hf_io import load_hf_checkpoint

    return load_hf_checkpoint(path)[1]


def _evaluate(ctx: _Context, params, pool) -> Any:
    from rl.evaluate import evaluate

    return evaluate(params, ctx.mcfg, ctx.tok, ctx.bench.dev, pool, prompt_format=PROMPT_FORMAT,
                    schema=ctx.schema, max_new_tokens=ctx.cfg.max_new_tokens, batch_size=ctx.cfg.eval_batch,
                    max_prompt_len=ctx.cfg.prompt_len)


def _phase_eval(d: DemoDir, ctx: _Context, phase: str, pool, say) -> dict[str, Any]:
    source = "sft" if phase == "eval_sft" else "rl"
    res = _evaluate(ctx, _load_params(d.path("checkpoints", source, "hf")), pool)
    step = 0 if phase == "eval_sft" else d.info("rl").get("steps", 0)
    d.log_metrics("eval", step, res.summary)
    d.path(f"{phase}.json").write_text(json.dumps({"summary": res.summary, "rows": list(res.rows)},
                                                  indent=1, default=str) + "\n")
    s = res.summary
    say(f"{phase}: EX(set) {100 * s['ex_set']:.1f}%  EX(bag) {100 * s['ex_bag']:.1f}%  "
        f"errors {100 * s['error_rate']:.1f}%  QATCH {100 * s['qatch']:.1f}%")
    return {"summary": s}


_RL_KEYS = ("reward/mean", "reward/std", "sql/ex", "sql/error_rate", "train/loss", "train/entropy",
            "train/clip_fraction", "train/grad_norm", "completion/length_mean", "time/rollout_s",
            "time/rewards_s", "time/update_s", "time/step_s")


def _phase_rl(d: DemoDir, ctx: _Context, clock: Clock, deadline: float, pool, say) -> dict[str, Any]:
    """Drive `rl.trainer.GrpoTrainer.step` (progress, budget, periodic dev evaluation)."""
    from rl.trainer import GrpoTrainer

    config = rl_run_config(d)
    run_dir = Path(config.run_dir)
    resume = _has_checkpoint(run_dir)
    trainer = GrpoTrainer(config, resume=resume, pool=pool)
    step, stopped = trainer.start_step, False
    if resume:
        say(f"rl: resuming from checkpoint step {step}")
    bar = Progress("rl", config.steps, clock, initial=step, enabled=d.progress)
    every = d.config.eval_every
    t0 = time.time()
    try:
        while step < config.steps:
            if time.time() > deadline:
                stopped = True
                break
            m = trainer.step(step)
            step += 1
            d.log_metrics("rl", step, _scalars(m, _RL_KEYS))
            bar.update(reward=m["reward/mean"], ex=m.get("sql/ex", 0.0))
            if step % config.checkpoint.every_steps == 0:
                trainer.save(step)
            if every and step % every == 0 and step < config.steps:
                ev = _evaluate(ctx, trainer.state["params"], pool)
                d.log_metrics("eval", step, ev.summary)
                msg = f"[rl] step {step}: dev EX(set) {100 * ev.summary['ex_set']:.1f}%"
                if d.progress:
                    bar.bar.write(msg)
                else:
                    say(msg)
        trainer.save(step)
        trainer.checkpointer.wait()
        trainer.export(run_dir / "hf")
    finally:
        bar.close()
        executor = getattr(trainer, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
        trainer.close()
    return {"steps": step, "stopped_early": stopped, "train_seconds": round(time.time() - t0, 1)}


def _phase_export(d: DemoDir, ctx: _Context, say) -> dict[str, Any]:
    import shutil

    import jax
    import jax.numpy as jnp

    from models.model import forward, positions_from_mask
    from rl.evaluate import encode_prompts

    out = d.path("hf_export")
    shutil.copytree(d.path("checkpoints", "rl", "hf"), out, dirs_exist_ok=True)
    try:
        import torch
        import transformers
    except ImportError as e:
        msg = f"skipped the transformers load check ({e.name} is not installed)"
        say(f"export: {out}; {msg}")
        return {"hf_check": msg}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = encode_prompts(ctx.bench.dev[:1], tok, ctx.schema, PROMPT_FORMAT, ctx.cfg.prompt_len)[0]
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    params = _load_params(out)
    tokens = jnp.asarray([ids], jnp.int32)
    ours, _ = forward(params, tokens, positions_from_mask(jnp.ones_like(tokens)), ctx.mcfg)
    diff = float(np.max(np.abs(np.asarray(jax.device_get(ours))[0] - hf_logits)))
    msg = (f"transformers {transformers.__version__} loads hf_export (AutoModelForCausalLM + AutoTokenizer); "
           f"max |logit difference| vs jaxsql = {diff:.2e}")
    say(f"export: {out}; {msg}")
    if not (diff < 1e-3 and len(tok) == len(ctx.tok)):
        raise JaxsqlError(f"{out}: the HF export does not reproduce the model in transformers "
                          f"(max |logit difference| {diff:.2e}, tokenizer size {len(tok)} vs {len(ctx.tok)})")
    return {"hf_check": msg, "max_logit_diff": diff}


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
                info = _phase_sft(d, clock, clock.start + 0.6 * budget, say)
            elif phase in ("eval_sft", "eval_rl"):
                info = _phase_eval(d, ctx, phase, pool, say)
            elif phase == "rl":
                info = _phase_rl(d, ctx, clock, clock.start + budget - reserve, pool, say)
            elif phase == "export":
                info = _phase_export(d, ctx, say)
            else:
                write_plot(d)
                total = sum(d.info(p).get("seconds", 0.0) for p in PHASES[:-1])
                write_report(d, total, peak_memory_bytes(), PHASES)
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
