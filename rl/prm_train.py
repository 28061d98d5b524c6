"""Training the process reward model through the shared loop (`jaxsql prm train`).

`PrmTrainer` is a `rl.base_trainer.BaseTrainer` like `rl.sft.SftTrainer`:
the same run directory lock, mesh, jitted and sharded step, checkpoints,
resume, SIGTERM / SIGINT and metrics. What is its own:

- the model: ``model.path`` is a PRM directory (``jaxsql prm init``; its
  head must be ``prm.head``, its recorded candidate ids must be what its
  tokenizer gives) or a policy, which is an ``lm`` PRM as it is and becomes a
  ``value`` PRM by `models.prm.value_head_from_lm`;
- the data: label files (``jaxsql prm label``), a grain stream of indices
  into the training records (checkpointed with the run), each batch tokenised
  piece by piece (`rl.prm.label_rows`) and assembled into a `rl.prm.PrmBatch`;
- the objective: the registered ``prm_bce`` loss (`rl.losses`) on
  `rl.prm.flat_batch` of that batch;
- held-out evaluation (`HeldOutEval`): BCE and step AUC on held-out
  trajectories (a label file of their own, or a share of the questions of the
  training file, every trajectory of a question on the same side) before the
  first step, every ``eval_every`` steps and after the last;
- the export: ``<run_dir>/hf`` is a PRM directory in its head's format
  (`models.prm.save_prm`: ``*ForCausalLM`` or ``*ForTokenClassification``, the
  tokenizer and ``jaxsql_prm.json``), which ``jaxsql prm score`` reads.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsql.errors import JaxsqlError
from rl.base_trainer import BaseTrainer
from rl.config import PrmTrainConfig
from rl.loop import Hook, RunResult, StepInfo, TrainLoop
from rl.prm import (LabelRecord, PrmBatch, PrmLossConfig, assemble, binary_auc, flat_batch, label_rows,
                    read_label_file)
from models.prm import candidate_ids
from rl.train_step import StepConfig


def split_heldout(records: Sequence[LabelRecord], fraction: float, seed: int
                  ) -> tuple[list[LabelRecord], list[LabelRecord]]:
    """(train, held-out): a seeded draw of ``ceil(fraction x questions)`` questions (example
    ids) is held out with all their trajectories; at least one question stays on each side
    when `fraction` > 0."""
    ids = sorted({r.example.id for r in records})
    if fraction <= 0 or not ids:
        return list(records), []
    if len(ids) < 2:
        raise JaxsqlError(f"PrmDataSection.heldout_fraction: the label file has {len(ids)} question; a held-out "
                          f"split needs two (or set data.eval_labels, or heldout_fraction=0)")
    n = min(len(ids) - 1, max(1, math.ceil(fraction * len(ids))))
    held = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:n]}
    return [r for r in records if r.example.id not in held], [r for r in records if r.example.id in held]


def resolve_prm_config(config: PrmTrainConfig, model_dir: str | Path | None = None) -> tuple[Any, str]:
    """(the `models.prm.PrmConfig` being trained, the head found in ``model.path``; `model_dir`:
    its local copy when it lives in a bucket).

    A directory's ``jaxsql_prm.json`` gives the step tag and candidates (a
    plain causal LM: the released defaults). A value-head directory cannot be
    trained as ``lm``; a causal LM trained as ``value`` is converted
    (`models.prm.value_head_from_lm`). JaxsqlError naming the mismatch.
    """
    import dataclasses

    from models.prm import PrmConfig, checkpoint_head, read_sidecar

    path = config.model.path
    if model_dir is None:
        if not Path(path).is_dir():
            raise JaxsqlError(f"ModelSection.path: {path} is not a directory")
        model_dir = path
    found = checkpoint_head(model_dir)
    side = read_sidecar(model_dir)
    want = config.prm.head
    if found == "value" and want == "lm":
        raise JaxsqlError(f"ModelSection.path: {path} holds a 'value'-head PRM but prm.head is 'lm'; set "
                          f"prm.head=value, or start from the policy")
    prm_cfg = side[0] if side is not None else PrmConfig(head=found)
    if prm_cfg.head != found:
        raise JaxsqlError(f"ModelSection.path: {path}/jaxsql_prm.json says head {prm_cfg.head!r} but config.json "
                          f"holds a {found!r} head")
    return dataclasses.replace(prm_cfg, head=want), found


def check_label_policy(records_path: str | Path, prm_tokenizer: Any) -> None:
    """A PRM scores the policy's trajectories: when the label file's metadata names a policy
    directory that still exists, its tokenizer must be the PRM's (JaxsqlError otherwise)."""
    import json

    from models.prm import same_tokenizer

    from jaxsql.paths import as_path

    meta_path = as_path(str(records_path) + ".meta.json")  # local or beside a label file in a bucket
    if not meta_path.is_file():
        return
    try:
        policy = json.loads(meta_path.read_text()).get("policy")
    except (json.JSONDecodeError, AttributeError):
        return
    if not policy or not as_path(policy).is_dir():
        return
    from transformers import AutoTokenizer

    from jaxsql.paths import local_dir
    from models.hf_io import TOKENIZER_FILES

    try:
        tok = AutoTokenizer.from_pretrained(local_dir(policy, "policy", only=(*TOKENIZER_FILES, "config.json")),
                                            local_files_only=True)
    except Exception:  # the policy's tokenizer is unreadable: nothing to compare
        return
    if not same_tokenizer(tok, prm_tokenizer):
        raise JaxsqlError(f"{records_path} was sampled from the policy {policy}, whose tokenizer differs from the "
                          f"PRM's; a PRM scores the policy's tokens, so build it from the policy (jaxsql prm init)")


class PrmTrainer(BaseTrainer):
    """PRM training run on the shared loop (module docstring)."""

    kind = "prm"
    progress_keys = ("train/loss", "train/agree")

    def __init__(self, config: PrmTrainConfig, *, resume: bool = False):
        from rl import setup

        self.eval_history: list[dict[str, float]] = []
        from jaxsql.paths import is_remote, local_dir

        # A model directory in a bucket is copied to local disk once (jaxsql.paths.local_dir);
        # the config keeps its gs:// path.
        remote = is_remote(config.model.path)
        self._model_dir = local_dir(config.model.path, "ModelSection.path") if remote else None
        # The loss settings hold the candidate ids: resolved (read-only) before the run starts.
        self.prm_cfg, self._found_head = resolve_prm_config(config, self._model_dir)
        self.candidates = candidate_ids(self.prm_cfg, setup.load_tokenizer(config.model))
        step_config = StepConfig(loss="prm_bce", loss_config=PrmLossConfig(self.prm_cfg.head, self.candidates),
                                 micro_batches=config.optim.micro_batches)
        super().__init__(config, resume=resume, step_config=step_config, total_updates=config.steps)

    # -- BaseTrainer hooks ----------------------------------------------------------------------

    def _load_model(self):
        from models.prm import check_matches_policy, load_prm, value_head_from_lm

        c = self.config
        # the config's sharding rules, like the policy trainers' state (rl.base_trainer)
        prm = load_prm(self._model_dir or c.model.path, head=self._found_head, mesh=self.mesh, rules=self.rules, param_dtype=c.model.param_dtype,
                       compute_dtype=c.model.compute_dtype)
        check_matches_policy(prm, self.tokenizer, c.model.tokenizer or c.model.path)
        if prm.candidates != self.candidates:
            raise JaxsqlError(f"ModelSection.tokenizer gives candidate ids {list(self.candidates)}, the PRM's own "
                              f"tokenizer {list(prm.candidates)}")
        if self.prm_cfg.head == "value" and self._found_head == "lm":  # a policy becomes a value PRM, same scores
            return value_head_from_lm(prm.params, prm.model_config, prm.candidates)
        return prm.model_config, prm.params

    def _param_specs(self):
        from models.prm import prm_param_specs

        return prm_param_specs(self.model_cfg, self.prm_cfg.head) if self.prm_cfg.head != "lm" else None

    def _load_data(self):
        from data.pipeline import make_iterator, process_rows

        c = self.config.data
        records = read_label_file(c.labels)
        if not records:
            raise JaxsqlError(f"PrmDataSection.labels: {c.labels} holds no labelled trajectories")
        check_label_policy(c.labels, self.tokenizer)
        if c.eval_labels:
            train, held = records, read_label_file(c.eval_labels)
        else:
            train, held = split_heldout(records, c.heldout_fraction, c.shuffle_seed)
        if len(train) < c.batch_size:
            raise JaxsqlError(f"PrmDataSection.batch_size: {c.batch_size} is more than the {len(train)} training "
                              f"trajectories")
        try:
            process_rows(c.batch_size)
        except JaxsqlError as e:
            raise JaxsqlError(f"PrmDataSection.batch_size: {e}") from None
        self.train_records, self.heldout_records = train, held
        self._heldout_batches: list[PrmBatch] | None = None
        iterator = make_iterator(list(range(len(train))), batch_size=c.batch_size, seed=c.shuffle_seed,
                                 num_epochs=None, drop_remainder=True, as_examples=False)
        return train, iterator

    # -- batches ----------------------------------------------------------------------------------

    def prm_batch(self, records: Sequence[LabelRecord]) -> PrmBatch:
        """A `PrmBatch` (host arrays) of labelled trajectories, labels of ``prm.label_kind``."""
        rows, labels = label_rows(records, self.encoder, self.tokenizer, tag=self.prm_cfg.step_tag,
                                  max_len=self.config.prm.max_len, kind=self.config.prm.label_kind)
        return assemble(rows, labels, pad_id=self.pad_id)

    def step(self, step: int) -> dict[str, float]:
        """One update on the next batch of trajectories; BCE per step, steps/s."""
        import jax

        t0 = time.perf_counter()
        batch = self.prm_batch([self.train_records[int(i)] for i in next(self.iterator)])
        out = jax.device_get(self.update(flat_batch(batch)))
        m = {f"train/{k}": float(v) for k, v in out.items()}
        m["time/step_s"] = time.perf_counter() - t0
        m["steps_per_s"] = m["train/tokens"] / m["time/step_s"]
        return m

    # -- held-out evaluation ------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out BCE (per step, labels of ``prm.label_kind``), step AUC (label > 0.5 positive,
        `rl.prm.binary_auc`; NaN with one class), accuracy (score and label on the same side of
        0.5) and mean score; {} without held-out trajectories."""
        if not self.heldout_records:
            return {}
        import jax
        import jax.numpy as jnp

        from models.prm import step_logits
        from rl.train_step import batch_sharding

        if self._heldout_batches is None:
            n = self.config.data.eval_batch_size
            self._heldout_batches = [self.prm_batch(self.heldout_records[i:i + n])
                                     for i in range(0, len(self.heldout_records), n)]
        if not hasattr(self, "_eval_fn"):
            self._eval_fn = jax.jit(step_logits, static_argnums=(1, 2, 3))
        rules = self.update_step.rules
        zs, ys, ws = [], [], []
        for b in self._heldout_batches:
            put = [jax.device_put(x, batch_sharding(self.mesh, rules, x.shape)) for x in (b.tokens, b.mask, b.positions)]
            z = self._eval_fn(self.state["params"], self.model_cfg, self.prm_cfg.head, self.candidates, *put)
            keep = np.asarray(b.positions) >= 0
            zs.append(np.asarray(jax.device_get(z), np.float64)[keep])
            ys.append(np.asarray(b.labels, np.float64)[keep])
            ws.append(np.asarray(b.weights, np.float64)[keep])
        z, y, w = (np.concatenate(a) for a in (zs, ys, ws))
        if w.sum() == 0:
            return {"eval/steps": 0.0}
        bce = np.asarray(jax.nn.softplus(jnp.asarray(z))) - y * z
        score = 1.0 / (1.0 + np.exp(-z))
        return {"eval/bce": float((bce * w).sum() / w.sum()), "eval/auc": binary_auc(score[w > 0], y[w > 0]),
                "eval/accuracy": float((((score > 0.5) == (y > 0.5)) * w).sum() / w.sum()),
                "eval/score": float((score * w).sum() / w.sum()), "eval/label": float((y * w).sum() / w.sum()),
                "eval/steps": float(w.sum())}

    # -- running ----------------------------------------------------------------------------------------

    def run(self, until: int | None = None, **loop_options: Any) -> dict[str, Any]:
        """Train (with held-out evaluation) to ``config.steps`` or `until`; the summary of
        `BaseTrainer.run` plus ``eval``: the held-out metrics by step."""
        from jaxsql.distributed import is_lead_process
        from jaxsql.metrics import MetricsWriter

        c = self.config
        writer = loop_options.pop("writer", None)
        own = writer is None and is_lead_process()
        if own:
            writer = MetricsWriter(self.run_dir, tensorboard=c.tensorboard)
        try:
            hooks = [*loop_options.pop("hooks", ()), HeldOutEval(self, c.eval_every, writer)]
            out = super().run(until, hooks=hooks, writer=writer, **loop_options)
        finally:
            if own:
                writer.close()
        out["eval"] = list(self.eval_history)
        return out

    def export(self, out_dir: str | Path) -> Path:
        """Write the PRM directory of the current weights (`models.prm.save_prm`: its head's HF
        format, the tokenizer, ``jaxsql_prm.json``) on the lead process."""
        from jaxsql.distributed import is_lead_process
        from models.prm import save_prm
        from rl.setup import tokenizer_dir

        from jaxsql.paths import is_remote, local_dir, upload_dir
        from models.hf_io import TOKENIZER_FILES

        if not is_lead_process():
            return out_dir
        tok = local_dir(tokenizer_dir(self.config.model), "ModelSection.tokenizer",
                        only=(*TOKENIZER_FILES, "config.json"))
        if is_remote(out_dir):  # a bucket: written locally, then copied through etils.epath
            import tempfile

            with tempfile.TemporaryDirectory(prefix="jaxsql-prm-export-") as tmp:
                save_prm(Path(tmp), self.prm_cfg, self.model_cfg, self.state["params"], tokenizer_dir=tok)
                upload_dir(Path(tmp), out_dir)
            return out_dir
        out_dir = Path(out_dir)
        save_prm(out_dir, self.prm_cfg, self.model_cfg, self.state["params"], tokenizer_dir=tok)
        return out_dir


class HeldOutEval(Hook):
    """Held-out evaluation of a `PrmTrainer`: before the first step of a fresh run, every
    `every` steps, and when the session ends (not after SIGTERM / SIGINT, which leave at once);
    rows go to `writer` with phase ``eval`` and to ``trainer.eval_history`` (each with its
    ``step``)."""

    def __init__(self, trainer: PrmTrainer, every: int, writer: Any = None):
        from jaxsql.distributed import is_lead_process

        self.trainer, self.every = trainer, every
        self.writer = writer if is_lead_process() else None
        self._done: set[int] = set()

    def _run(self, step: int) -> None:
        if step in self._done:
            return
        self._done.add(step)
        m = self.trainer.evaluate()
        if not m:
            return
        self.trainer.eval_history.append({"step": step, **m})
        if self.writer is not None:
            self.writer.write(step, m, phase="eval")

    def on_start(self, loop: TrainLoop) -> None:
        if loop.trainer.start_step == 0:
            self._run(0)

    def after_step(self, loop: TrainLoop, info: StepInfo) -> None:
        if self.every and info.step % self.every == 0:
            self._run(info.step)

    def on_end(self, loop: TrainLoop, result: RunResult) -> None:
        if result.stop_reason != "signal":  # a preempted run saves and leaves at once
            self._run(result.step)


def prm_train(config: PrmTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run PRM training (the `jaxsql prm train` command)."""
    with PrmTrainer(config, resume=resume) as trainer:
        return trainer.run()


def summary(out: Mapping[str, Any]) -> dict[str, Any]:
    """The run's one-line JSON summary: steps, stop, last train BCE, first and last held-out metrics."""
    def finite(v):
        return v if not isinstance(v, float) or math.isfinite(v) else None

    last = out["history"][-1] if out["history"] else {}
    ev = out.get("eval") or []
    return {"step": out["step"], "stopped_by_signal": out["stopped"],
            **({"train/loss": finite(last["train/loss"])} if "train/loss" in last else {}),
            "eval_first": {k: finite(v) for k, v in ev[0].items()} if ev else None,
            "eval_last": {k: finite(v) for k, v in ev[-1].items()} if ev else None}
