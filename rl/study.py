"""`jaxsql study`: the three methods side by side on the synthetic benchmark, over seeds.

For every seed the study runs, in one directory (``OUT/seed<S>``, a demo
directory, so its first phases are the demo's own):

1. ``base``: the demo's ``data``, ``sft`` and ``eval_sft`` phases (`rl.demo`):
   the synthetic benchmark, its tokenizer, a random decoder, the plain-SQL
   SFT cold start, and GRPO's answers-only questions.
2. The Reward-SQL start: ``cocte_data`` (the SFT examples' gold SQL
   rewritten as chains of CTEs, kept when they execute to the gold result,
   `data.cocte`), ``cocte_sft`` (the same SFT recipe, ``prompt_format:
   cocte``, from the same random decoder), ``prm_label`` (Monte-Carlo step
   labels on GRPO's answers-only questions, `rl.prm_label`) and
   ``prm_train`` (the PRM, initialised from the CoCTE policy, `rl.prm_train`).
3. One GRPO run per arm (`ARMS`), each from its start's HF export with the
   demo's GRPO recipe and the arm's overrides, on the same answers-only
   questions and the same number of steps:

   - ``answers``: the binary execution reward from gold answers (Kulkarni &
     Srikumar 2025; the demo's arm);
   - ``dense_group`` / ``dense_batch`` / ``dense_none``: Think2SQL's gated
     dense reward (QATCH-style partial credit, `jaxsql.rewards.gated` with
     ``require_format: false``: the plain format has no think/answer tags)
     with per-group, batch or no advantage scaling (``grpo``, ``batch``,
     ``drgrpo``);
   - ``rewardsql``: the CoCTE policy with the execution reward plus the
     PRM's process reward (`StudyConfig.rewardsql_overrides`).
4. ``eval``: every start and every arm's policy evaluated on the dev split
   with each selector of `StudyConfig.selectors`, through ``jaxsql eval``
   itself (``OUT/seed<S>/eval/<policy>/<selector>``, its ``metrics.json``).

Every training phase of seed S writes its rows (``phase`` = the phase's name) to
``OUT/seed<S>/metrics.jsonl`` and ``OUT/seed<S>/tensorboard/``, beside the base
phases' ``sft`` and ``eval`` rows.

Then ``report`` writes ``OUT/study.md`` (one table: EX set, refined EX,
error rate, QATCH, training wall time; mean and range over the seeds) and
``OUT/study.png``. The marker ``OUT/jaxsql_study.json`` records the
settings and every finished phase: a rerun skips them and a phase killed
mid-run continues from its last checkpoint; another study's settings or a
folder that holds something else is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

from jaxsql.config import require
from jaxsql.errors import JaxsqlError
from jaxsql.metrics import clock
from rl import demo

MARKER = "jaxsql_study.json"

#: arm -> (start policy, prompt format, GRPO overrides on the demo's recipe, what it is)
ARMS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "answers": ("sft", "plain", (), "execution reward from gold answers (Kulkarni & Srikumar)"),
    "dense_group": ("sft", "plain", ("reward.weights={gated: 1.0}", "reward.params={gated: {require_format: false}}",
                                     "algo.advantage=grpo"),
                    "Think2SQL gated dense reward, per-group advantage scaling"),
    "dense_batch": ("sft", "plain", ("reward.weights={gated: 1.0}", "reward.params={gated: {require_format: false}}",
                                     "algo.advantage=batch"),
                    "Think2SQL gated dense reward, batch advantage scaling"),
    "dense_none": ("sft", "plain", ("reward.weights={gated: 1.0}", "reward.params={gated: {require_format: false}}",
                                    "algo.advantage=drgrpo"),
                   "Think2SQL gated dense reward, no advantage scaling (centred only)"),
    "rewardsql": ("cocte_sft", "cocte", (), "Reward-SQL: CoCTE policy, execution + PRM process reward"),
    "multiturn": ("tool_sft", "tool", ("rollout.mode=multi_turn", "reward.weights={execution: 1.0}"),
                  "multi-turn tool use: the policy runs SQL while it answers (execution reward)"),
}
#: the arms a study runs unless --arms says otherwise: the three methods (``multiturn``, whose
#: traces are about three times longer to train on, is added with ``--arms``)
DEFAULT_ARMS = ("answers", "dense_group", "dense_batch", "dense_none", "rewardsql")
SELECTORS = ("greedy", "vote", "prm-best-of-n")
STARTS = {"sft": "plain", "cocte_sft": "cocte", "tool_sft": "tool"}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The study's settings (each seed's base is a `rl.demo.DemoConfig` built from them).

    Attributes:
      seeds: one full repetition per seed (benchmark, initialisation, data order, sampling).
      arms: names of `ARMS` to run.
      selectors: ``jaxsql eval --select`` strategies every policy is evaluated with (the PRM ones,
        which score chains of CTEs, the CoCTE policies only; `applies`).
      num_samples: samples per dev question for the sampling selectors (``--n``).
      n_train, n_dev, sft_examples, rl_n_questions: benchmark sizes (as in the demo).
      model: ``(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size)``.
      sft_overrides: overrides of the demo's SFT recipe (both cold starts).
      rl_overrides: overrides of the demo's GRPO recipe (every arm; e.g. ``steps=...``).
      cocte_sft_overrides: extra SFT overrides of the CoCTE cold start (its longer targets).
      cocte_new_tokens: completion cap of the CoCTE policy (GRPO and evaluation).
      label_questions, label_k, label_trajectories: PRM labels: questions, continuations
        per step, trajectories per question.
      prm_overrides: overrides of the PRM recipe (``rl/recipes/study_prm.yaml``).
      rewardsql_overrides: GRPO overrides of the ``rewardsql`` arm; ``{prm}`` stands for the
        seed's PRM directory.
      tool_sft_overrides: extra SFT overrides of the multi-turn cold start (tool traces: longer
        prompts and targets); only part of the identity when the ``multiturn`` arm runs.
      tool_new_tokens: token budget of a multi-turn episode (model and observation tokens; GRPO and
        evaluation); only part of the identity when the ``multiturn`` arm runs.
      eval_batch: prompts per generate call in evaluation.
      minutes: wall-clock cap of each training phase (each seed's demo phases share one; not part
        of the identity); the steps are fixed, and a phase the cap cuts short says so.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = DEFAULT_ARMS
    selectors: tuple[str, ...] = SELECTORS
    num_samples: int = 8
    n_train: int = 2000
    n_dev: int = 200
    sft_examples: int = 2000
    rl_n_questions: int = 2000
    model: tuple[int, ...] = (192, 3, 4, 2, 576, 512)
    sft_overrides: tuple[str, ...] = ("steps=300",)
    rl_overrides: tuple[str, ...] = ("steps=80",)
    cocte_sft_overrides: tuple[str, ...] = ("data.max_target_len=96", "data.max_prompt_len=200")
    cocte_new_tokens: int = 96
    label_questions: int = 128
    label_k: int = 4
    label_trajectories: int = 4
    prm_overrides: tuple[str, ...] = ()
    rewardsql_overrides: tuple[str, ...] = (
        "reward.weights={execution: 1.0, process: 1.0}", "reward.process.prm={prm}",
        "reward.process.form=step", "reward.process.advantage=rewardsql", "reward.process.max_len=512")
    tool_sft_overrides: tuple[str, ...] = ("data.max_target_len=200", "data.max_prompt_len=384")
    tool_new_tokens: int = 200
    eval_batch: int = 100
    minutes: float = 600.0

    def __post_init__(self) -> None:
        name = "StudyConfig"
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), name, "seeds",
                "must name at least one seed, each once")
        unknown = [a for a in self.arms if a not in ARMS]
        require(not unknown and len(self.arms) >= 1, name, "arms", f"unknown {unknown}; arms are {list(ARMS)}")
        require(len(self.model) == 6 and all(v >= 1 for v in self.model), name, "model",
                "must be (hidden, layers, heads, kv_heads, intermediate, vocab), each >= 1")
        require(self.num_samples >= 2, name, "num_samples", "must be >= 2")
        from rl.evaluate import SELECTORS as KNOWN

        bad = [s for s in self.selectors if s not in KNOWN]
        require(not bad and len(self.selectors) >= 1, name, "selectors",
                f"unknown {bad}; selectors are {sorted(KNOWN)}")
        for f in ("label_questions", "label_k", "label_trajectories", "cocte_new_tokens", "tool_new_tokens",
                  "eval_batch"):
            require(getattr(self, f) >= 1, name, f, "must be >= 1")
        require(self.minutes > 0, name, "minutes", "must be > 0")
        self.demo_config(self.seeds[0])  # the demo's own checks (sizes, recipes)

    @property
    def needs_prm(self) -> bool:
        return "rewardsql" in self.arms or any(s.startswith("prm") for s in self.selectors)

    @property
    def needs_cocte(self) -> bool:
        return self.needs_prm or any(ARMS[a][0] == "cocte_sft" for a in self.arms)

    @property
    def needs_tool(self) -> bool:
        return any(ARMS[a][0] == "tool_sft" for a in self.arms)

    def demo_config(self, seed: int) -> demo.DemoConfig:
        """The demo settings of one seed's base (data, SFT, answers-only questions)."""
        hidden, layers, heads, kv, inter, vocab = self.model
        return demo.DemoConfig(seed=seed, minutes=self.minutes, n_train=self.n_train, n_dev=self.n_dev,
                               sft_examples=self.sft_examples, vocab_size=vocab, hidden_size=hidden,
                               num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=inter,
                               rl_n_questions=self.rl_n_questions, eval_every=0, eval_batch=self.eval_batch,
                               sft_overrides=self.sft_overrides, rl_overrides=self.rl_overrides)

    def identity(self) -> dict[str, Any]:
        """What a rerun on the same directory must agree with (every field but the cap, plus the
        recipes' contents through the demo's identity)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d.pop("minutes")
        if not self.needs_tool:  # studies without the multi-turn arm keep the identity they had before it
            d.pop("tool_sft_overrides")
            d.pop("tool_new_tokens")
        d["demo"] = self.demo_config(0).identity()
        d["demo"].pop("seed")
        return d


def smoke_config(seeds: tuple[int, ...] = (0,)) -> StudyConfig:
    """Every phase of every arm for a few steps with a very small model (CI, tests)."""
    small = ("data.max_target_len=12", "checkpoint.every_steps=2")
    return StudyConfig(
        seeds=seeds, num_samples=2, n_train=120, n_dev=16, sft_examples=120, rl_n_questions=60,
        model=(32, 1, 2, 1, 64, 384), eval_batch=16,
        sft_overrides=small + ("steps=3", "data.batch_size=8", "optim.warmup_steps=0"),
        rl_overrides=small + ("steps=2", "data.batch_size=2", "sampling.num_generations=2",
                              "sampling.max_new_tokens=12", "algo.dynamic_sampling=false"),
        cocte_sft_overrides=("data.max_target_len=24", "data.max_prompt_len=200"), cocte_new_tokens=24,
        label_questions=4, label_k=2, label_trajectories=2,
        prm_overrides=("steps=2", "eval_every=1", "data.batch_size=2", "prm.max_len=256"),
        arms=tuple(ARMS), tool_sft_overrides=("data.max_target_len=64", "data.max_prompt_len=448"),
        tool_new_tokens=48, minutes=30.0)


class StudyDir(demo.DemoDir):
    """The study's output directory: ``jaxsql_study.json`` with the settings and the finished
    phases (``seed<S>/<phase>`` and ``report``); one demo directory per seed inside.

    Several processes may run the same study on the same directory at once (the seeds are split
    between them): a seed is run by the process holding its lock file ``seed<S>.lock`` (an
    advisory ``flock``, released when the process ends, however it ends), and the marker is
    read, merged and rewritten under the lock ``.jaxsql_study.lock``, so no process loses
    another's records.
    """

    MARKER = MARKER
    KIND = "study"
    LOCK = ".jaxsql_study.lock"

    def seed_dir(self, seed: int) -> Path:
        return self.path(f"seed{seed}")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the marker's lock (blocking; not re-entrant within a process)."""
        with open(self.path(self.LOCK), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _reload_phases(self) -> None:
        """Take the phases as the marker on disk holds them now (call under `locked`)."""
        from jaxsql.config import read_saved_settings

        self.state["phases"] = read_saved_settings(self.marker, f"{self.KIND} marker").get("phases", {})

    def refresh(self) -> None:
        """Re-read the phases other processes have recorded since this one read the marker."""
        with self.locked():
            self._reload_phases()

    def record(self, phase: str, **info: Any) -> None:
        """Mark `phase` complete, merged into the marker as it is on disk now (other processes
        may have recorded their seeds' phases since this one read it). Its ``seconds`` add the
        time of earlier runs of it that were interrupted (`record_interrupted`)."""
        with self.locked():
            self._reload_phases()
            before = self.state["phases"].get(phase, {})
            if "seconds" in info and before.get("partial_seconds"):
                info = dict(info, seconds=round(info["seconds"] + before["partial_seconds"], 1),
                            partial_seconds=before["partial_seconds"], interrupted_runs=before["interrupted_runs"])
            self.state["phases"][phase] = dict(info, done=True)
            self._save()

    def record_interrupted(self, phase: str, seconds: float) -> None:
        """Keep the time an interrupted run of `phase` spent (the phase stays to do), so the
        table's wall times count every run of a resumed phase."""
        with self.locked():
            self._reload_phases()
            before = self.state["phases"].get(phase, {})
            if before.get("done"):
                return
            self.state["phases"][phase] = {"done": False,
                                           "partial_seconds": round(before.get("partial_seconds", 0.0) + seconds, 1),
                                           "interrupted_runs": before.get("interrupted_runs", 0) + 1}
            self._save()

    def take_seed(self, seed: int, *, wait: bool) -> IO[str] | None:
        """Lock seed `seed` for this process: the open lock file (close it to release), or None
        when another process holds it and `wait` is false."""
        f = open(self.path(f"seed{seed}.lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        except BaseException:
            f.close()
            raise
        return f


# --- the phases of one seed ---------------------------------------------------------------------


def _cocte_data(d: demo.DemoDir, pool) -> dict[str, Any]:
    """The SFT examples' gold SQL as chains of CTEs (``data/sft.cocte.jsonl``)."""
    from data.cocte import cocte_examples, convert_examples, write_jsonl
    from data.readers import read_examples

    sft = read_examples("jsonl", str(d.path("data", "sft.jsonl")))
    report = convert_examples(sft, pool)
    written = write_jsonl(cocte_examples(report), d.path("data", "sft.cocte.jsonl"), relative_to=d.path("data"))
    if written == 0:
        raise JaxsqlError(f"{d.path('data', 'sft.jsonl')}: no gold query could be written as a chain of CTEs")
    return {"written": written, **report.to_json()}


def _start_sft_config(d: demo.DemoDir, name: str, fmt: str, data_file: str, overrides: Sequence[str],
                      progress: bool):
    """A cold start `name` in the prompt format `fmt`: the demo's SFT recipe, from the same random
    decoder, on ``data/<data_file>``, with `overrides` after the demo's own."""
    from rl.config import SftConfig

    c = d.config
    return demo._recipe_config(d, SftConfig, c.sft_recipe,
                               list(c.sft_overrides) + list(overrides) + [f"progress={progress}"], {
        "run_dir": d.path("checkpoints", name), "model.path": d.path("checkpoints", "init"),
        "model.tokenizer": d.path("tokenizer"), "data.path": d.path("data", data_file),
        "data.prompt_format": fmt, "seed": c.seed, "data.shuffle_seed": c.seed})


def _start_sft(config, name: str, cfg: StudyConfig, writer, say) -> dict[str, Any]:
    """Train (or resume) the cold start `config` as the study phase `name`."""
    from rl.sft import SftTrainer

    with SftTrainer(config, resume=demo._has_checkpoint(Path(config.run_dir))) as trainer:
        return demo._train_phase(trainer, name, _deadline(cfg), cfg.minutes, writer, say)


def cocte_sft_config(d: demo.DemoDir, cfg: StudyConfig, progress: bool = False):
    """The CoCTE cold start: the demo's SFT recipe on ``sft.cocte.jsonl`` with ``prompt_format: cocte``."""
    return _start_sft_config(d, "cocte_sft", "cocte", "sft.cocte.jsonl", cfg.cocte_sft_overrides, progress)


def _tool_data(d: demo.DemoDir, pool) -> dict[str, Any]:
    """The SFT examples as multi-turn traces from their gold SQL (``data/sft.tool.jsonl``: the
    examples whose trace is kept, `data.multiturn`)."""
    from data.cocte import write_jsonl
    from data.multiturn import build_traces, trace_report
    from data.readers import read_examples

    sft = read_examples("jsonl", str(d.path("data", "sft.jsonl")))
    report = trace_report(sft, build_traces(sft, pool.execute_batch))
    kept = [e for e, t in report.items if t.kept]  # SFT re-derives each kept example's trace (`data.multiturn`)
    written = write_jsonl(kept, d.path("data", "sft.tool.jsonl"), relative_to=d.path("data"))
    if written == 0:
        raise JaxsqlError(f"{d.path('data', 'sft.jsonl')}: no example gave a tool trace that runs")
    return {"written": written, **report.to_json()}


def tool_sft_config(d: demo.DemoDir, cfg: StudyConfig, progress: bool = False):
    """The multi-turn cold start: the demo's SFT recipe on ``sft.tool.jsonl`` with ``prompt_format:
    tool`` (observation tokens masked out of the loss)."""
    return _start_sft_config(d, "tool_sft", "tool", "sft.tool.jsonl", cfg.tool_sft_overrides, progress)


def _deadline(cfg: StudyConfig) -> float:
    """When a training phase starting now must stop (`StudyConfig.minutes` after its start)."""
    return time.time() + 60.0 * cfg.minutes




def _prm_label(d: demo.DemoDir, cfg: StudyConfig, pool, progress: bool) -> dict[str, Any]:
    """Monte-Carlo step labels of the CoCTE policy's trajectories on GRPO's answers-only questions."""
    from data.readers import read_examples
    from models.hf_io import load_hf_checkpoint
    from rl.prm_label import LabelSettings, policy_sampler, run_labeling
    from rl.rollout import PromptEncoder
    from rl.setup import load_tokenizer, special_ids

    sft = cocte_sft_config(d, cfg)
    policy = d.path("checkpoints", "cocte_sft", "hf")
    mcfg, params = load_hf_checkpoint(policy)
    tok = load_tokenizer(sft.model)  # the demo's tokenizer (the run config names it)
    questions = read_examples("jsonl", str(d.path(*demo._RL_FILE)))[: cfg.label_questions]
    settings = LabelSettings(k=cfg.label_k, trajectories=cfg.label_trajectories, temperature=1.0,
                             max_new_tokens=cfg.cocte_new_tokens, batch_size=8, seed=d.config.seed,
                             max_prompt_len=sft.data.max_prompt_len)
    stop_ids, pad_id = special_ids(tok, mcfg)
    sample = policy_sampler(params, mcfg, tok, settings=settings, stop_ids=stop_ids, pad_id=pad_id)
    encoder = PromptEncoder(tok, "cocte", sft.data.max_prompt_len)
    stats = run_labeling(questions, d.path("prm_labels.jsonl"), pool=pool, prompt_ids=encoder, sample=sample,
                         settings=settings, meta={"policy": str(policy.resolve()), "data": "rl_answers",
                                                  "limit": cfg.label_questions},
                         progress=progress)
    return stats


def prm_train_config(d: demo.DemoDir, cfg: StudyConfig, progress: bool = False):
    """The PRM run: ``rl/recipes/reward_sql_prm.yaml`` from the CoCTE policy on the seed's labels."""
    from rl.config import PrmTrainConfig

    c = d.config
    return demo._recipe_config(d, PrmTrainConfig, "study_prm.yaml",
                               list(cfg.prm_overrides) + [f"progress={progress}"], {
                                   "run_dir": d.path("checkpoints", "prm"),
                                   "model.path": d.path("checkpoints", "cocte_sft", "hf"),
                                   "model.tokenizer": d.path("tokenizer"),
                                   "data.labels": d.path("prm_labels.jsonl"), "seed": c.seed,
                                   "data.shuffle_seed": c.seed})


def _prm_train(d: demo.DemoDir, cfg: StudyConfig, writer, say, progress: bool) -> dict[str, Any]:
    from rl.prm_train import PrmTrainer, summary

    config = prm_train_config(d, cfg, progress)
    with PrmTrainer(config, resume=demo._has_checkpoint(Path(config.run_dir))) as trainer:
        t0 = time.time()
        out = trainer.run()
    if out["stopped"]:
        raise demo._Interrupted(f"prm_train stopped by a signal after step {out['step']} (checkpoint saved); "
                                f"rerun the same command to continue")
    return {**summary(out), "train_seconds": round(time.time() - t0, 1)}


def arm_config(d: demo.DemoDir, cfg: StudyConfig, arm: str, progress: bool = False):
    """GRPO of `arm`: the demo's recipe and the study's ``rl_overrides``, then the arm's own."""
    from rl.config import TrainConfig

    start, fmt, overrides, _ = ARMS[arm]
    c = d.config
    extra = list(overrides)
    if fmt == "cocte":
        cocte = cocte_sft_config(d, cfg)
        extra += [f"sampling.max_new_tokens={cfg.cocte_new_tokens}", "data.prompt_format=cocte",
                  f"data.max_prompt_len={cocte.data.max_prompt_len}"]
    if fmt == "tool":
        tool = tool_sft_config(d, cfg)
        extra += [f"sampling.max_new_tokens={cfg.tool_new_tokens}", "data.prompt_format=tool",
                  f"data.max_prompt_len={tool.data.max_prompt_len}"]
    if arm == "rewardsql":
        prm = d.path("checkpoints", "prm", "hf")
        extra += [o.replace("{prm}", str(prm)) for o in cfg.rewardsql_overrides]
    return demo._recipe_config(d, TrainConfig, c.rl_recipe,
                               list(c.rl_overrides) + extra + [f"progress={progress}"], {
                                   "run_dir": d.path("checkpoints", f"arm_{arm}"),
                                   "model.path": d.path("checkpoints", start, "hf"),
                                   "model.tokenizer": d.path("tokenizer"), "data.path": d.path(*demo._RL_FILE),
                                   "seed": c.seed, "data.shuffle_seed": c.seed + 1})


def _arm(d: demo.DemoDir, cfg: StudyConfig, arm: str, pool, writer, say, progress: bool) -> dict[str, Any]:
    from rl.trainer import GrpoTrainer

    config = arm_config(d, cfg, arm, progress)
    with GrpoTrainer(config, resume=demo._has_checkpoint(Path(config.run_dir)), pool=pool) as trainer:
        return demo._train_phase(trainer, f"arm_{arm}", _deadline(cfg), cfg.minutes, writer, say)


def policies(cfg: StudyConfig) -> list[tuple[str, str, str]]:
    """(name, HF checkpoint folder under ``checkpoints/``, prompt format) of every evaluated policy."""
    out = [("sft", "sft", "plain")]
    if cfg.needs_cocte:
        out.append(("cocte_sft", "cocte_sft", "cocte"))
    if cfg.needs_tool:
        out.append(("tool_sft", "tool_sft", "tool"))
    out += [(arm, f"arm_{arm}", ARMS[arm][1]) for arm in cfg.arms]
    return out


def eval_args(d: demo.DemoDir, cfg: StudyConfig, folder: str, fmt: str, select: str, out: Path) -> list[str]:
    """The ``jaxsql eval`` command line of one policy and selector."""
    rl = demo.rl_run_config(d)
    new_tokens = {"cocte": cfg.cocte_new_tokens, "tool": cfg.tool_new_tokens}.get(fmt, rl.sampling.max_new_tokens)
    prompt_len = (cocte_sft_config(d, cfg).data.max_prompt_len if fmt == "cocte" else
                  tool_sft_config(d, cfg).data.max_prompt_len if fmt == "tool" else rl.data.max_prompt_len)
    args = ["eval", "--model", str(d.path("checkpoints", folder, "hf")),
            "--data", f"synthetic:{d.path('data')}:dev", "--select", select, "--prompt-format", fmt,
            "--max-new-tokens", str(new_tokens), "--max-prompt-len", str(prompt_len),
            "--batch-size", str(cfg.eval_batch), "--seed", str(d.config.seed), "--out", str(out),
            "--no-progress", "--workers", "2"]
    if select not in ("greedy", "prm-beam"):
        args += ["--n", str(cfg.num_samples)]
    if select.startswith("prm"):
        args += ["--prm", str(d.path("checkpoints", "prm", "hf"))]
    if fmt == "tool":
        args += ["--multi-turn"]
    return args


def applies(select: str, fmt: str) -> bool:
    """Whether selector `select` applies to a policy answering in prompt format `fmt`: the PRM
    selectors score chains of CTEs, so they apply to the CoCTE policies only."""
    return not select.startswith("prm") or fmt == "cocte"


def _evaluate(d: demo.DemoDir, cfg: StudyConfig, say) -> dict[str, Any]:
    """Every policy x selector through ``jaxsql eval`` (in this process); the summaries."""
    import contextlib
    import io

    from jaxsql.cli import main

    results: dict[str, dict[str, Any]] = {}
    for name, folder, fmt in policies(cfg):
        for select in (s for s in cfg.selectors if applies(s, fmt)):
            out = d.path("eval", name, select)
            t0 = time.time()
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(eval_args(d, cfg, folder, fmt, select, out))
            if code != 0:
                raise JaxsqlError(f"jaxsql eval of {name} with --select {select} failed (exit {code}); "
                                  f"see the error above")
            s = json.loads((out / "metrics.json").read_text())["summary"]
            results.setdefault(name, {})[select] = {k: s.get(k) for k in ("ex_set", "ex_bag", "error_rate",
                                                                            "qatch")}
            say(f"  {name:12s} {select:14s} EX(set) {100 * (s.get('ex_set') or 0):5.1f}%  "
                f"({time.time() - t0:.0f} s)")
    return {"results": results}


# --- the report ---------------------------------------------------------------------------------

COLUMNS = (("EX set", "ex_set"), ("refined EX (bag)", "ex_bag"), ("error rate", "error_rate"), ("QATCH", "qatch"))


def _fmt(values: Sequence[float]) -> str:
    """``mean [min, max]`` in percent (just the value for one seed)."""
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    return f"{mean:.1f}" if len(vals) == 1 else f"{mean:.1f} [{min(vals):.1f}, {max(vals):.1f}]"


def report_rows(state: dict[str, Any], cfg: StudyConfig) -> list[dict[str, Any]]:
    """One row per (policy, selector): each metric's per-seed values and the training seconds."""
    phases = state["phases"]
    rows = []
    for name, _, fmt in policies(cfg):
        phase = {"sft": "base", "cocte_sft": "cocte_sft", "tool_sft": "tool_sft"}.get(name, f"arm_{name}")
        for select in (s for s in cfg.selectors if applies(s, fmt)):
            per_seed = [phases.get(f"seed{s}/eval", {}).get("results", {}).get(name, {}).get(select, {})
                        for s in cfg.seeds]
            secs = [phases.get(f"seed{s}/{phase}", {}).get("seconds") for s in cfg.seeds]
            rows.append({"policy": name, "select": select,
                         **{key: [r.get(key) for r in per_seed] for _, key in COLUMNS},
                         "seconds": [v for v in secs if v is not None]})
    return rows


def write_report(root: Path, state: dict[str, Any], cfg: StudyConfig, total_seconds: float) -> Path:
    """``study.md``: settings, the table (mean [min, max] over seeds, percent) and the plot."""
    rows = report_rows(state, cfg)
    what = {"sft": "plain SQL SFT cold start", "cocte_sft": "CoCTE SFT cold start (Reward-SQL)",
            "tool_sft": "multi-turn SFT cold start (tool traces from gold SQL)"}
    what.update({a: ARMS[a][3] for a in ARMS})
    lines = [
        "# jaxsql study: three methods on the synthetic benchmark",
        "",
        f"Seeds {', '.join(map(str, cfg.seeds))}; dev split of {cfg.n_dev} questions per seed; "
        f"sampling selectors take {cfg.num_samples} samples. Cells are percent, mean [min, max] over the "
        f"seeds. Training seconds are the wall time of the policy's own phase, every run of it when it "
        f"was interrupted and resumed (the SFT rows: the whole base incl. data); processes sharing the "
        f"cores make them longer.",
        "",
        "| policy | what | select | " + " | ".join(c for c, _ in COLUMNS) + " | training s |",
        "|---|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for r in rows:
        secs = r["seconds"]
        s = f"{sum(secs) / len(secs):.0f}" if secs else "-"
        lines.append(f"| {r['policy']} | {what.get(r['policy'], '')} | {r['select']} | "
                     + " | ".join(_fmt(r[key]) for _, key in COLUMNS) + f" | {s} |")
    lines += ["", f"Sum of the phases' wall times: {clock(total_seconds)} (seeds run by parallel processes "
              f"overlap in time).", "", "![EX by arm and selector](study.png)", ""]
    out = root / "study.md"
    out.write_text("\n".join(lines))
    _plot(root / "study.png", rows, cfg)
    return out


def _plot(path: Path, rows: list[dict[str, Any]], cfg: StudyConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 3.8))
    width = 0.8 / len(cfg.selectors)
    for j, select in enumerate(cfg.selectors):
        mean, lo, hi = [], [], []
        for n in names:
            vals = [100 * v for r in rows if r["policy"] == n and r["select"] == select
                    for v in r["ex_set"] if v is not None]
            m = float(np.mean(vals)) if vals else float("nan")  # nan: no bar (selector does not apply)
            mean.append(m)
            lo.append(m - min(vals) if vals else 0.0)
            hi.append(max(vals) - m if vals else 0.0)
        x = np.arange(len(names)) + (j - (len(cfg.selectors) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=[lo, hi], capsize=3, label=select)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, fontsize=8)
    ax.set(ylabel="dev EX (set), %", title=f"seeds {', '.join(map(str, cfg.seeds))}: mean, bars = range")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the driver ---------------------------------------------------------------------------------


def _seed_phases(cfg: StudyConfig) -> list[str]:
    phases = ["base"]
    if cfg.needs_cocte:
        phases += ["cocte_data", "cocte_sft"]
    if cfg.needs_prm:
        phases += ["prm_label", "prm_train"]
    if cfg.needs_tool:
        phases += ["tool_data", "tool_sft"]
    return phases + [f"arm_{a}" for a in cfg.arms] + ["eval"]


def run_study(out_dir: str | Path, config: StudyConfig | None = None, *, say: Callable[[str], None] | None = None,
              progress: bool = True, stop_after: str | None = None) -> dict[str, Any]:
    """Run (or resume) the study in `out_dir`; returns the marker state (with ``"interrupted"``
    naming the phase a SIGTERM / SIGINT stopped after its checkpoint, if one did).

    `stop_after`: stop after this phase (``seed<S>/<phase>``; tests of resuming).

    The same call may run in several processes on the same `out_dir` at once: each takes the
    seeds no other process holds (`StudyDir.take_seed`), then waits for the seeds others hold
    (and finishes them if their process ended first), so every process ends with the whole table.
    """
    cfg = config or StudyConfig()
    say = say or demo._say_default
    study = StudyDir(out_dir, cfg)
    phases = _seed_phases(cfg)

    def todo(seed: int) -> list[str]:
        return [p for p in phases if not study.done(f"seed{seed}/{p}")]

    pending = [s for s in cfg.seeds if todo(s)]
    if not pending and study.info("report").get("seeds") == list(cfg.seeds):
        say(f"study in {study.root} is already complete; see {study.path('study.md')}")
        return study.state
    start = time.time()
    shared = _Shared(study)
    key = ""
    skipped: list[int] = []  # seeds another process held at the first look: waited for after the rest
    try:
        for wait, seeds in ((False, pending), (True, skipped)):
            for seed in seeds:
                lock = study.take_seed(seed, wait=False)
                if lock is None and not wait:
                    say(f"seed {seed}: another process is running it; the other seeds first")
                    skipped.append(seed)
                    continue
                if lock is None:
                    say(f"seed {seed}: waiting for the other process running it")
                    lock = study.take_seed(seed, wait=True)
                try:
                    study.refresh()
                    for phase in todo(seed):
                        key = f"seed{seed}/{phase}"
                        _run_phase(study, cfg, seed, phase, shared, start, say, progress)
                        if key == stop_after:
                            return study.state
                finally:
                    lock.close()
    except demo._Interrupted as e:
        say(str(e))
        return dict(study.state, interrupted=key)
    finally:
        shared.close()
    study.refresh()
    total = sum(v.get("seconds", 0.0) for k, v in study.state["phases"].items() if k != "report")
    with study.locked():  # two processes finishing together write the same table, one after the other
        path = write_report(study.root, study.state, cfg, total)
    study.record("report", seconds=0.0, seeds=list(cfg.seeds))
    say(f"report: {path}; plot: {study.path('study.png')}")
    return study.state


class _Shared:
    """The SQL pool the phases of one `run_study` share and each seed's metrics writer (its
    demo directory's ``metrics.jsonl`` and ``tensorboard/``, beside the base phases' rows),
    made on first use."""

    def __init__(self, study: StudyDir) -> None:
        self.study = study
        self._pool = None
        self._writers: dict[int, Any] = {}

    @property
    def pool(self):
        from jaxsql.sql import SqlPool

        if self._pool is None:
            self._pool = SqlPool(2)
        return self._pool

    def writer(self, d: demo.DemoDir, seed: int):
        """Seed `seed`'s writer (None on processes that write no files)."""
        if seed not in self._writers:
            self._writers[seed] = d.metrics_writer()
        return self._writers[seed]

    def close(self) -> None:
        for resource in (self._pool, *self._writers.values()):
            if resource is not None:
                resource.close()


def _run_phase(study: StudyDir, cfg: StudyConfig, seed: int, phase: str, shared: _Shared, start: float,
               say: Callable[[str], None], progress: bool) -> None:
    """Run one phase of one seed and record it (raises `demo._Interrupted` on a signal)."""
    key = f"seed{seed}/{phase}"
    t = time.time()
    say(f"== {key} ({clock(t - start)} elapsed)")
    try:
        info = _phase_info(study, cfg, seed, phase, shared, say, progress)
    except BaseException:
        study.record_interrupted(key, time.time() - t)
        raise
    study.record(key, seconds=round(time.time() - t, 1), **info)


def _phase_info(study: StudyDir, cfg: StudyConfig, seed: int, phase: str, shared: _Shared, say: Callable,
                progress: bool) -> dict[str, Any]:
    """Run one phase of one seed; its record (without the seconds)."""
    key = f"seed{seed}/{phase}"
    if phase == "base":
        state = demo.run_demo(study.seed_dir(seed), cfg.demo_config(seed), say=say, progress=progress,
                              stop_after="eval_sft")
        if state.get("interrupted"):
            raise demo._Interrupted(f"{key} stopped during the demo phase '{state['interrupted']}'")
        info = {"eval_sft": state["phases"]["eval_sft"]["summary"]}
    else:
        d = demo.DemoDir(study.seed_dir(seed), cfg.demo_config(seed))
        pool, writer = shared.pool, shared.writer(d, seed)
        if phase == "cocte_data":
            info = _cocte_data(d, pool)
        elif phase == "cocte_sft":
            info = _start_sft(cocte_sft_config(d, cfg, progress), "cocte_sft", cfg, writer, say)
        elif phase == "tool_data":
            info = _tool_data(d, pool)
        elif phase == "tool_sft":
            info = _start_sft(tool_sft_config(d, cfg, progress), "tool_sft", cfg, writer, say)
        elif phase == "prm_label":
            info = _prm_label(d, cfg, pool, progress)
        elif phase == "prm_train":
            info = _prm_train(d, cfg, writer, say, progress)
        elif phase.startswith("arm_"):
            info = _arm(d, cfg, phase[4:], pool, writer, say, progress)
        else:
            info = _evaluate(d, cfg, say)
    return info


def main_summary(state: dict[str, Any], cfg: StudyConfig) -> str:
    """One line per policy: greedy EX set mean over the seeds (the CLI's stdout)."""
    lines = []
    for r in report_rows(state, cfg):
        if r["select"] == cfg.selectors[0]:
            lines.append(f"{r['policy']}: dev EX (set, {r['select']}) {_fmt(r['ex_set'])}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `jaxsql study`")
