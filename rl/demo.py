"""`jaxsql demo`: SFT -> GRPO -> evaluation -> HF export on the synthetic benchmark, on a laptop CPU.

Phases (each records its completion in the marker file ``DIR/jaxsql_demo.json``,
so a rerun skips finished phases and a killed one continues from the last
checkpoint of the phase it was in):

1. ``data``: generate the synthetic benchmark into ``DIR/data``; train a
   byte-level BPE tokenizer on train prompts + targets only (see `_phase_data`)
   and save it as a `transformers` tokenizer in ``DIR/tokenizer``; write the
   SFT examples and GRPO's answer-only questions (`DemoConfig.rl_questions`)
   as JSONL; save the random initial model (HF) in ``DIR/checkpoints/init``.
2. ``sft``: supervised cold start, `rl.sft.SftTrainer` with the recipe
   ``rl/recipes/demo_sft.yaml``.
3. ``eval_sft``: greedy decoding on the held-out dev split (`rl.evaluate`).
4. ``rl``: GRPO, `rl.trainer.GrpoTrainer` with the recipe
   ``rl/recipes/demo_grpo.yaml``: the ``execution`` reward computed from gold
   *answers* only (weak supervision, Kulkarni & Srikumar 2025): the examples
   handed to the reward have ``gold_sql=None``; the host `SqlPool` runs every
   sample. A dev evaluation every `DemoConfig.eval_every` steps (an
   `rl.loop.Evaluate` hook).
5. ``eval_rl``: greedy dev evaluation of the RL policy.
6. ``export``: HF checkpoint in ``DIR/hf_export`` (+ tokenizer) and, when
   transformers and torch are installed, a load-and-compare-logits check.
7. ``report``: ``DIR/plot.png`` and ``DIR/report.md`` (`rl.demo_report`).

Both trainers run through the one loop (`rl.loop`): the demo adds a budget
hook and an evaluation hook and hands it the demo's one metrics writer, so
``DIR/metrics.jsonl`` gets one JSON object per line with a ``phase`` key and
TensorBoard events go to ``DIR/tensorboard``; orbax checkpoints live in the
trainers' run directories ``DIR/checkpoints/{sft,rl}``. The phases run a
fixed number of steps; the wall-clock budget (``--minutes``) is a cap that the
report names when it bites.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxsql.config import changed_settings, read_saved_settings, require
from jaxsql.errors import JaxsqlError
from jaxsql.metrics import clock

MARKER = "jaxsql_demo.json"
PHASES = ("data", "sft", "eval_sft", "rl", "eval_rl", "export", "report")
PROMPT_FORMAT = "plain"


RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo itself decides; SFT and GRPO settings come from their recipes.

    Attributes:
      seed: benchmark, initialisation, data order and sampling all derive from it.
      minutes: wall-clock cap shared by the phases (not part of a run's identity): SFT stops
        at 60 % of it, GRPO leaves 15 % (at most 90 s) for evaluation and export; the
        report names a phase the cap cut short.
      n_train, n_dev: synthetic benchmark size.
      sft_examples: train examples (first N) used for SFT; RL draws its own questions.
      vocab_size: tokenizer vocabulary.
      hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the decoder
        (random init, saved as ``DIR/checkpoints/init``).
      rl_questions: where GRPO's answer-only questions come from: "new_databases" (the train
        split of a second synthetic draw, seed + 1000: new databases and entity names, train
        value pools; questions of the dev split's held-out template-domain pairs or naming a
        value of a dev database are dropped) or "train" (the SFT split's questions again).
      rl_n_questions: size of the "new_databases" draw (before filtering).
      eval_every: dev evaluation every N GRPO steps (0 = only before and after).
      eval_batch: prompts per greedy `generate` call.
      sft_recipe, rl_recipe: recipe files (names in ``rl/recipes/`` or paths).
      sft_overrides, rl_overrides: ``key=value`` overrides of the recipes (the smoke run, tests).
    """

    seed: int = 0
    minutes: float = 30.0
    n_train: int = 2000
    n_dev: int = 300
    sft_examples: int = 2000
    vocab_size: int = 512
    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 576
    rl_questions: str = "new_databases"
    rl_n_questions: int = 2000
    eval_every: int = 25
    eval_batch: int = 100
    sft_recipe: str = "demo_sft.yaml"
    rl_recipe: str = "demo_grpo.yaml"
    sft_overrides: tuple[str, ...] = ()
    rl_overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = "DemoConfig"
        require(self.minutes > 0, name, "minutes", "must be > 0")
        for f in ("n_train", "n_dev", "sft_examples", "eval_batch"):
            require(getattr(self, f) >= 1, name, f, "must be >= 1")
        require(self.eval_every >= 0, name, "eval_every", "must be >= 0")
        require(self.sft_examples <= self.n_train, name, "sft_examples", "must be <= n_train")
        require(self.hidden_size % self.num_heads == 0, name, "hidden_size", "must be a multiple of num_heads")
        require((self.hidden_size // self.num_heads) % 2 == 0, name, "hidden_size",
                "hidden_size / num_heads must be even (rotary embeddings)")
        require(self.rl_questions in ("new_databases", "train"), name, "rl_questions",
                f"must be new_databases or train, got {self.rl_questions!r}")
        for f in ("sft_recipe", "rl_recipe"):
            require(recipe_path(getattr(self, f)).is_file(), name, f,
                    f"no recipe {getattr(self, f)!r} (a name in {RECIPES} or a path)")

    def identity(self) -> dict[str, Any]:
        """The settings a rerun on the same directory must agree with: the fields but the cap,
        and the recipes' contents (not their file names)."""
        import yaml

        d = dataclasses.asdict(self)
        d.pop("minutes")
        for f in ("sft_recipe", "rl_recipe"):
            d[f] = yaml.safe_load(recipe_path(d[f]).read_text())
        d["sft_overrides"], d["rl_overrides"] = list(self.sft_overrides), list(self.rl_overrides)
        return d


def recipe_path(name: str) -> Path:
    """A recipe name in ``rl/recipes/`` or a path."""
    p = Path(name)
    return p if p.is_file() or p.is_absolute() or len(p.parts) > 1 else RECIPES / name


def smoke_config(seed: int = 0, minutes: float = 3.0) -> DemoConfig:
    """A few steps of every phase with a very small model (CI, tests)."""
    small = ("data.max_target_len=12", "checkpoint.every_steps=2")
    return DemoConfig(seed=seed, minutes=minutes, n_train=120, n_dev=24, sft_examples=120, vocab_size=384,
                      hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      rl_n_questions=60, eval_every=1, eval_batch=24,
                      sft_overrides=small + ("steps=3", "data.batch_size=8", "optim.warmup_steps=0"),
                      rl_overrides=small + ("steps=2", "data.batch_size=2", "sampling.num_generations=2",
                                            "sampling.max_new_tokens=12", "algo.dynamic_sampling=false"))


# --- the output directory and its marker ------------------------------------------------------


class DemoDir:
    """The demo's output directory: paths, the marker with phase records, the metrics file.

    A subclass names its own marker file and kind (`rl.study.StudyDir`); the checks are the same:
    another run's settings or a folder that holds anything else is refused, nothing is written.
    """

    MARKER = MARKER
    KIND = "demo"

    def __init__(self, out_dir: str | Path, config: DemoConfig):
        self.root = Path(out_dir)
        self.config = config
        self.marker = self.root / self.MARKER
        self._check_and_claim()

    def _check_and_claim(self) -> None:
        from rl.run_dir import prepare_output_dir

        if self.root.exists() and not self.root.is_dir():
            raise JaxsqlError(f"--out {self.root}: exists and is not a directory")
        if self.marker.exists():
            state = read_saved_settings(self.marker, f"{self.KIND} marker")
            identity = self.config.identity()
            diff = changed_settings(state.get("config", {}), identity, keys=list(identity))
            if diff:
                raise JaxsqlError(
                    f"{self.root} holds a {self.KIND} run with different settings ({', '.join(diff)}); "
                    f"rerun with the same options or choose another --out")
            self.state = state
            self._check_writable()  # a demo resumed in a folder it cannot write in fails now, not mid-phase
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise JaxsqlError(
                f"{self.root} is not empty and holds no {self.MARKER}: it is not a jaxsql {self.KIND} directory; "
                f"choose an empty or new --out directory (nothing was written)")
        prepare_output_dir(self.root, "--out")
        self.state = {self.KIND: "jaxsql", "config": self.config.identity(), "phases": {}}
        self._check_writable(self._save)

    def _check_writable(self, write: Callable[[], Any] | None = None) -> None:
        """Run `write` (default: create and remove a probe file, leaving every file as it was); an
        OSError is one line naming --out."""
        def probe() -> None:
            fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=self.root)
            os.close(fd)
            os.unlink(name)

        try:
            (write or probe)()
        except OSError as e:
            raise JaxsqlError(f"--out {self.root}: cannot write in it ({e.strerror or e})") from None

    def _save(self) -> None:
        tmp = self.marker.with_name(self.MARKER + ".tmp")
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

    def metrics_writer(self):
        """The demo's one metrics writer: ``metrics.jsonl`` (rows with a ``phase``) and
        ``tensorboard/``; None on the processes that write no files."""
        from jaxsql.distributed import is_lead_process
        from jaxsql.metrics import MetricsWriter

        if not is_lead_process():
            return None
        return MetricsWriter(self.root, tensorboard=True, tensorboard_dir=self.path("tensorboard"))

    def read_metrics(self, phase: str | None = None) -> list[dict[str, Any]]:
        from jaxsql.metrics import read_metrics

        return read_metrics(self.path("metrics.jsonl"), phase)


# --- shared pieces of the phases ----------------------------------------------------------------


@dataclasses.dataclass
class _Context:
    """What later phases need: the benchmark, tokenizer, model config, evaluation lengths."""

    cfg: DemoConfig
    bench: Any
    tok: Any
    mcfg: Any
    schema: Callable[[str], str]
    prompt_len: int
    max_new_tokens: int


def model_config(cfg: DemoConfig, tok: Any, max_len: int):
    """The demo's decoder: Qwen2 architecture (loads in transformers), tied embeddings; positions
    for `max_len` tokens (prompt + completion) at least."""
    from models.config import ModelConfig

    return ModelConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, rope_theta=10000.0, tie_word_embeddings=True,
        max_position_embeddings=max(512, max_len),
        bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)


def _context(d: DemoDir) -> _Context:
    from transformers import AutoTokenizer

    from data.synthetic import load_benchmark
    from rl.evaluate import schema_cache

    bench = load_benchmark(d.path("data"))
    tok = AutoTokenizer.from_pretrained(str(d.path("tokenizer")))
    rl = rl_run_config(d)
    P, C = rl.data.max_prompt_len, rl.sampling.max_new_tokens
    return _Context(d.config, bench, tok, model_config(d.config, tok, P + C), schema_cache(), P, C)


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


def _recipe_config(d: DemoDir, loader, recipe: str, overrides: Sequence[str], paths: dict[str, Path]):
    from jaxsql.config import load_config

    filled = [f"{k}={v}" for k, v in paths.items()] + list(overrides)
    return load_config(loader, recipe_path(recipe), filled)


def sft_run_config(d: DemoDir, progress: bool = False):
    """`rl.config.SftConfig` of the cold start: the recipe with the demo's paths (run directory
    ``DIR/checkpoints/sft``) and seed."""
    from rl.config import SftConfig

    c = d.config
    return _recipe_config(d, SftConfig, c.sft_recipe, list(c.sft_overrides) + [f"progress={progress}"], {
        "run_dir": d.path("checkpoints", "sft"), "model.path": d.path("checkpoints", "init"),
        "model.tokenizer": d.path("tokenizer"), "data.path": d.path("data", "sft.jsonl"),
        "seed": c.seed, "data.shuffle_seed": c.seed})


def rl_run_config(d: DemoDir, progress: bool = False):
    """`rl.config.TrainConfig` of GRPO: the recipe with the demo's paths (run directory
    ``DIR/checkpoints/rl``, answers-only data) and seed."""
    from rl.config import TrainConfig

    c = d.config
    return _recipe_config(d, TrainConfig, c.rl_recipe, list(c.rl_overrides) + [f"progress={progress}"], {
        "run_dir": d.path("checkpoints", "rl"), "model.path": d.path("checkpoints", "sft", "hf"),
        "model.tokenizer": d.path("tokenizer"), "data.path": d.path(*_RL_FILE),
        "seed": c.seed, "data.shuffle_seed": c.seed + 1})


def _has_checkpoint(run_dir: Path) -> bool:
    from jaxsql.checkpoint import Checkpointer

    if not (run_dir / "checkpoints").is_dir():
        return False
    ck = Checkpointer(run_dir / "checkpoints", max_to_keep=2, async_save=False)
    try:
        return ck.latest_step() is not None
    finally:
        ck.close()


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
    sft = sft_run_config(d)
    mcfg = model_config(cfg, tok, sft.data.max_prompt_len + sft.data.max_target_len)
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


class _Interrupted(Exception):
    """A phase stopped by SIGTERM / SIGINT after saving its checkpoint."""


def _train_phase(trainer, phase: str, deadline: float, minutes: float, writer, say, extra_hooks=()) -> dict[str, Any]:
    """Run `trainer` through the loop with the demo's writer, a budget hook and `extra_hooks`;
    the phase record. The HF export is the trainer's own once the run completes; a run cut by
    the budget is exported here so the next phases can use it."""
    from rl.loop import Budget

    if trainer.start_step:
        say(f"{phase}: resuming from checkpoint step {trainer.start_step}")
    budget = Budget(deadline)
    t0 = time.time()
    result = trainer.loop(hooks=[budget, *extra_hooks], writer=writer, phase=phase, time_left=budget.left).run()
    if result.stop_reason == "signal":
        raise _Interrupted(f"{phase} stopped by a signal after step {result.step} (checkpoint saved); "
                           f"rerun the same command to continue")
    if result.stop_reason == "budget":
        trainer.export(trainer.run_dir / "hf")
        say(f"{phase}: the time cap (--minutes {minutes:g}) stopped it at step {result.step} "
            f"of {trainer.config.steps}")
    return {"steps": result.step, "of_steps": trainer.config.steps,
            "stopped_early": result.stop_reason == "budget", "train_seconds": round(time.time() - t0, 1)}


def _phase_sft(d: DemoDir, deadline: float, writer, say, progress: bool) -> dict[str, Any]:
    from rl.sft import SftTrainer

    config = sft_run_config(d, progress)
    with SftTrainer(config, resume=_has_checkpoint(Path(config.run_dir))) as trainer:
        return _train_phase(trainer, "sft", deadline, d.config.minutes, writer, say)


def _load_params(path: Path):
    from models.hf_io import load_hf_checkpoint

    return load_hf_checkpoint(path)[1]


def _evaluate(ctx: _Context, params, pool) -> Any:
    from rl.evaluate import evaluate

    return evaluate(params, ctx.mcfg, ctx.tok, ctx.bench.dev, pool, prompt_format=PROMPT_FORMAT,
                    schema=ctx.schema, max_new_tokens=ctx.max_new_tokens, batch_size=ctx.cfg.eval_batch,
                    max_prompt_len=ctx.prompt_len)


def _phase_eval(d: DemoDir, ctx: _Context, phase: str, pool, writer, say) -> dict[str, Any]:
    source = "sft" if phase == "eval_sft" else "rl"
    res = _evaluate(ctx, _load_params(d.path("checkpoints", source, "hf")), pool)
    step = 0 if phase == "eval_sft" else d.info("rl").get("steps", 0)
    if writer is not None:
        writer.write(step, res.summary, phase="eval")
    d.path(f"{phase}.json").write_text(json.dumps({"summary": res.summary, "rows": list(res.rows)},
                                                  indent=1, default=str) + "\n")
    s = res.summary
    say(f"{phase}: EX(set) {100 * s['ex_set']:.1f}%  EX(bag) {100 * s['ex_bag']:.1f}%  "
        f"errors {100 * s['error_rate']:.1f}%  QATCH {100 * s['qatch']:.1f}%")
    return {"summary": s}


def _phase_rl(d: DemoDir, ctx: _Context, deadline: float, pool, writer, say, progress: bool) -> dict[str, Any]:
    """GRPO through the loop, with a dev evaluation every `eval_every` steps."""
    from rl.loop import Evaluate
    from rl.trainer import GrpoTrainer

    config = rl_run_config(d, progress)
    with GrpoTrainer(config, resume=_has_checkpoint(Path(config.run_dir)), pool=pool) as trainer:
        evaluate = Evaluate(d.config.eval_every, lambda step: _evaluate(ctx, trainer.state["params"], pool).summary,
                            writer=writer,
                            report=lambda step, s: say(f"[rl] step {step}: dev EX(set) {100 * s['ex_set']:.1f}%"))
        return _train_phase(trainer, "rl", deadline, d.config.minutes, writer, say, [evaluate])


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
    ids = encode_prompts(ctx.bench.dev[:1], tok, ctx.schema, PROMPT_FORMAT, ctx.prompt_len)[0]
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


def _phase_report(d: DemoDir, say) -> dict[str, Any]:
    from rl.demo_report import peak_memory_bytes, write_plot, write_report

    sft, rl = sft_run_config(d), rl_run_config(d)
    c = d.config
    execution = dict(rl.reward.get("params", {}).get("execution", {}))
    settings = {
        "seed": c.seed, "n_train": c.n_train, "n_dev": c.n_dev, "minutes": c.minutes,
        "sft_batch": sft.data.batch_size, "sft_examples": c.sft_examples, "sft_lr": sft.optim.learning_rate,
        "rl_questions": c.rl_questions, "rl_prompts": rl.data.batch_size,
        "rl_generations": rl.sampling.num_generations, "rl_temperature": rl.sampling.temperature,
        "rl_lr": rl.optim.learning_rate, "rl_eps_low": rl.algo.eps_low, "rl_eps_high": rl.algo.eps_high,
        "rl_beta": rl.algo.beta, "rl_loss_agg": rl.algo.loss_agg, "rl_advantage": rl.algo.advantage,
        "rl_dynamic_sampling": rl.algo.dynamic_sampling,
        "reward": tuple(execution.get(k, v) for k, v in (("correct", 1.0), ("wrong", 0.0), ("failed", -1.0))),
        "hidden_size": c.hidden_size, "num_layers": c.num_layers, "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads, "prompt_len": rl.data.max_prompt_len,
        "max_new_tokens": rl.sampling.max_new_tokens}
    phases = {p: d.info(p) for p in PHASES}
    write_plot(d.path("plot.png"), d.read_metrics("rl"), d.read_metrics("eval"))
    total = sum(phases[p].get("seconds", 0.0) for p in PHASES[:-1])
    write_report(d.path("report.md"), settings, phases, total, peak_memory_bytes(), PHASES)
    say(f"report: {d.path('report.md')}; plot: {d.path('plot.png')}")
    return {"peak_memory_bytes": peak_memory_bytes()}


def _say_default(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # above a progress bar, if one is shown
    sys.stderr.flush()


def run_demo(out_dir: str | Path, config: DemoConfig | None = None, *, say: Callable[[str], None] | None = None,
             stop_after: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo in `out_dir`; returns the marker state (with ``"interrupted"``:
    the phase a SIGTERM / SIGINT stopped, after its checkpoint, if one did).

    Args:
      out_dir: the output directory (created; refused if it holds anything but a demo).
      config: settings (default `DemoConfig()`).
      say: where progress lines go (default: stderr).
      stop_after: stop after this phase (tests of resuming).
      progress: show progress bars (stderr).
    """
    from jaxsql.sql import SqlPool

    config = config or DemoConfig()
    say = say or _say_default
    if stop_after is not None and stop_after not in PHASES:
        raise JaxsqlError(f"stop_after: unknown phase {stop_after!r}; phases are {list(PHASES)}")
    d = DemoDir(out_dir, config)
    start = time.time()
    budget = config.minutes * 60.0
    todo = [p for p in PHASES if not d.done(p)]
    if not todo:
        say(f"demo in {d.root} is already complete; see {d.path('report.md')}")
        return d.state
    if len(todo) < len(PHASES):
        say(f"resuming the demo in {d.root} at phase '{todo[0]}'")
    reserve = min(90.0, 0.15 * budget)  # eval after RL, export, report
    ctx = None
    pool = None
    writer = d.metrics_writer()
    try:
        for phase in todo:
            t = time.time()
            say(f"== {phase} ({clock(t - start)} elapsed, {clock(budget - (t - start))} of the cap left)")
            if phase != "data" and ctx is None:
                ctx = _context(d)
            if phase in ("eval_sft", "rl", "eval_rl") and pool is None:
                pool = SqlPool(2)
            if phase == "data":
                info = _phase_data(d, say)
            elif phase == "sft":
                info = _phase_sft(d, start + 0.6 * budget, writer, say, progress)
            elif phase in ("eval_sft", "eval_rl"):
                info = _phase_eval(d, ctx, phase, pool, writer, say)
            elif phase == "rl":
                info = _phase_rl(d, ctx, start + budget - reserve, pool, writer, say, progress)
            elif phase == "export":
                info = _phase_export(d, ctx, say)
            else:
                info = _phase_report(d, say)
            d.record(phase, seconds=round(time.time() - t, 1), **info)
            if phase == stop_after:
                break
    except _Interrupted as e:
        say(str(e))
        return dict(d.state, interrupted=phase)
    finally:
        if pool is not None:
            pool.close()
        if writer is not None:
            writer.close()
    return d.state
