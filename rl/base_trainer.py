"""What every trainer shares: the claimed run directory, model, tokenizer, data stream,
optimizer, the jitted step, checkpoints, export, and the loop that drives them.

A trainer subclasses `BaseTrainer` and supplies three things:

- ``kind`` (saved in checkpoint metadata) and the `StepConfig` naming its
  registered loss (`rl.losses`);
- ``step(step) -> metrics``: build one `rl.batch.Batch` and apply it with
  `update` (GRPO samples and scores first; SFT tokenises gold completions);
- anything extra it saves or releases (`close`).

Checkpointing every N steps, save-and-stop on SIGTERM / SIGINT, metrics,
progress, the wall-clock budget and evaluation hooks come from `rl.loop`;
the run-directory lock, foreign-file and tokenizer checks from `rl.run_dir`;
resume (with ``checkpoint.fallback_to_previous``) from `rl.setup`.

**A process reward model trainer** is one more subclass, touching neither the
loop nor the step: ``kind = "prm"``, ``StepConfig(loss="prm_bce",
loss_config=...)`` with the BCE registered in `rl.losses` (it reads
``batch.targets`` at ``batch.loss_mask``), and a ``step`` that turns a batch
of labelled CoCTE trajectories into a `Batch` whose ``loss_mask`` marks the
step-end positions and whose ``targets`` hold the step labels, then calls
``self.update(batch)``. Its checkpoints, resume, export and signals are
these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxsql.distributed import any_process, from_host, is_lead_process
from jaxsql.errors import JaxsqlError
from jaxsql.metrics import MetricsWriter
from jaxsql.paths import as_path
from rl import setup
from rl.batch import TrainBatch
from rl.loop import Hook, LogMetrics, RunResult, SaveEvery, ShowProgress, StopOnSignal, TrainLoop
from rl.rollout import PromptEncoder
from rl.run_dir import RunDir, RunDirError, check_tokenizer
from rl.train_step import StepConfig, TrainStep, init_state, make_optimizer


class _ExportWhenDone(Hook):
    """The HF export to ``<run_dir>/hf`` once the run reached its last step."""

    def __init__(self, trainer: "BaseTrainer"):
        self.trainer = trainer

    def on_end(self, loop: TrainLoop, result: RunResult) -> None:
        c = self.trainer.config
        if c.checkpoint.export_hf and result.stop_reason is None and result.step == c.steps:
            self.trainer.export(self.trainer.run_dir / "hf")


class BaseTrainer:
    """One run: owns its run directory lock, checkpointer and whatever a subclass acquires.

    Use as a context manager (or call `close`): everything acquired is released,
    also when the constructor fails half way.
    """

    kind = ""
    progress_keys: tuple[str, ...] = ("train/loss",)

    def __init__(self, config, *, resume: bool, step_config: StepConfig, total_updates: int):
        self.config = c = config
        self.run_dir = as_path(c.run_dir)  # a local Path, or an etils.epath.Path for gs:// (jaxsql.paths)
        self._releases: list[Callable[[], None]] = []
        # Checked and locked before anything is written; only the lead process locks (the
        # other processes of a multi-host run share its directory). A refusal on any process
        # stops every process (none is left waiting in a collective).
        try:
            run = RunDir.claim(self.run_dir, lock=is_lead_process(), expect_hf_export=c.checkpoint.export_hf)
        except JaxsqlError:
            any_process(True)
            raise
        if any_process(False):
            run.release()
            raise RunDirError(f"run_dir {self.run_dir}: refused on another process (see the lead's error)")
        self._releases.append(run.release)
        try:
            self._setup(resume, step_config, total_updates)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool, step_config: StepConfig, total_updates: int) -> None:
        c = self.config
        self.tokenizer = setup.load_tokenizer(c.model)
        self.mesh = setup.build_mesh(c.mesh)
        self.rules = c.mesh.sharding_rules()  # mesh.rules / mesh.rule_overrides: state, batches, sampler
        self.model_cfg, params = self._load_model()
        check_tokenizer(self.tokenizer, self.model_cfg.vocab_size, setup.tokenizer_dir(c.model))
        self.stop_ids, self.pad_id = setup.special_ids(self.tokenizer, self.model_cfg)
        self.encoder = PromptEncoder(self.tokenizer, c.data.prompt_format, c.data.max_prompt_len)
        self.examples, self.iterator = self._load_data()
        self.optimizer = make_optimizer(c.optim, total_updates)
        # Only the update differentiates: it alone runs under model.remat (the sampler and the
        # reference model use model_cfg, remat none).
        self.update_step = TrainStep(self.model_cfg.replace(remat=c.model.remat), step_config, self.optimizer,
                                     self.mesh, rules=self.rules,
                                     cache_key=(c.optim, total_updates), specs=self._param_specs())
        self._init_extra(params)
        self.state = init_state(params, self.optimizer, self.update_step.state_shardings)
        del params
        # one key, replicated over the mesh (every process holds the same; the checkpoint
        # restores it onto the same placement)
        self.rng = from_host(np.asarray(jax.random.PRNGKey(c.seed)),
                             NamedSharding(self.mesh, PartitionSpec()))
        self.checkpointer = setup.open_checkpointer(self.run_dir, c.checkpoint, resume=resume)
        self._releases.append(self.checkpointer.close)
        self.state, self.rng, self.start_step = setup.restore_run(
            self.checkpointer, self.state, self.rng, self.iterator,
            fallback_to_previous=c.checkpoint.fallback_to_previous)

    def _init_extra(self, params) -> None:
        """Subclasses: state built from the initial parameters (e.g. the reference policy)."""

    def _load_model(self) -> tuple[Any, Any]:
        """(model config, parameters on the mesh): the policy of ``config.model`` by default
        (the PRM trainer loads a PRM directory or converts a policy)."""
        return setup.load_policy(self.config.model, self.mesh, self.rules)

    def _param_specs(self) -> Any:
        """The parameters' `ParamSpec` tree when they are not the decoder's own (None: they are)."""
        return None

    def _load_data(self) -> tuple[Any, Any]:
        """(records, the checkpointed grain iterator of their batches): the examples of
        ``config.data`` by default (the PRM trainer reads label files)."""
        c = self.config
        examples = setup.load_examples(c.data, self.run_dir)
        return examples, setup.data_stream(examples, c.data, c.data.batch_size)

    # -- what the loop calls ---------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """Run step `step` (0-based); its metrics."""
        raise NotImplementedError

    def update(self, batch: TrainBatch, times: int = 1) -> dict[str, Any]:
        """Place `batch` on the mesh and apply `times` optimizer steps to it; the last step's
        metrics (device values)."""
        placed = self.update_step.place_batch(batch)
        out: dict[str, Any] = {}
        for _ in range(times):
            self.state, out = self.update_step(self.state, placed)
        return out

    def save(self, step: int) -> bool:
        """Checkpoint the run as `step` (number of completed steps)."""
        return setup.save_run(self.checkpointer, step, self.state, self.rng, self.iterator,
                              self.config.to_dict(), self.model_cfg, self.kind)

    def wait_for_saves(self) -> None:
        self.checkpointer.wait()

    # -- running -------------------------------------------------------------------------------

    def loop(self, until: int | None = None, *, hooks: Sequence[Hook] = (), writer: MetricsWriter | None = None,
             phase: str | None = None, log_keys: Sequence[str] | None = None,
             time_left: Callable[[], float] | None = None) -> TrainLoop:
        """The run's `TrainLoop` with the standard hooks (signals, checkpoints every
        ``checkpoint.every_steps``, metrics, progress, HF export when done) plus `hooks`.

        Metrics go to `writer` (rows tagged `phase`, names limited to `log_keys`) or, by
        default, to ``<run_dir>/metrics.jsonl`` and ``<run_dir>/tb``.
        """
        c = self.config
        own = writer is None and is_lead_process()
        if own:
            writer = MetricsWriter(self.run_dir, tensorboard=c.tensorboard)
        log = LogMetrics(writer, c.log_every, phase=phase, keys=log_keys, close_writer=own)
        std: list[Hook] = [StopOnSignal(), log, SaveEvery(c.checkpoint.every_steps),
                           ShowProgress(phase or self.kind, self.progress_keys, c.progress, time_left)]
        return TrainLoop(self, c.steps, [*std, *hooks, _ExportWhenDone(self)], until=until)

    def run(self, until: int | None = None, **loop_options: Any) -> dict[str, Any]:
        """Train from `start_step` to ``config.steps`` (or to step `until`, if smaller: a partial
        session that ends with a checkpoint); returns a summary with the per-step metrics."""
        result = self.loop(until, **loop_options).run()
        return {"step": result.step, "stopped": result.stopped_by_signal, "stop_reason": result.stop_reason,
                "history": result.history}

    def export(self, out_dir: str | Path) -> Path:
        """Write the current weights as an HF checkpoint with the run's tokenizer. Every process
        calls it (each tensor is gathered in turn); only the lead process writes."""
        out_dir = as_path(out_dir)
        setup.export_policy(out_dir, self.config.model, self.model_cfg, self.state["params"])
        return out_dir

    def close(self) -> None:
        """Release everything the trainer acquired (last acquired first); safe to call twice."""
        while self._releases:
            self._releases.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
