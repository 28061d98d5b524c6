"""What GRPO and SFT runs share: mesh, policy weights, tokenizer, examples, data stream,
and checkpoint save/restore of the whole run state.

The run state saved by `save_run` is ``{"train": train_state, "rng": key}``
(arrays, orbax) plus JSON metadata: the grain iterator position, the run
config and the model config, so `--resume` continues exactly and
`jaxsql export` can rebuild the model from a checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from data.records import Example
from jaxsql.checkpoint import Checkpointer
from jaxsql.errors import JaxsqlError
from jaxsql.paths import as_path, is_remote, local_dir, require_local
from models.config import ModelConfig
from rl.config import CheckpointSection, DataSection, MeshSection, ModelSection


def build_mesh(mesh: MeshSection):
    """The (data, fsdp, tensor) mesh of `mesh`, checked against the devices and its rules.

    On one process an explicit shape smaller than the device count uses the
    first devices (e.g. ``mesh.data=1`` for one device); on several processes
    the mesh must cover every device. Fails at start, naming both numbers,
    when the shape does not match the devices; when a mesh axis is used by no
    sharding rule; or when the batch axes do not give each process one
    contiguous block of rows (what the data pipeline and the sampler read).
    """
    import math

    from jaxsql import distributed
    from jaxsql.sharding import check_rules_fit_mesh, logical_to_sharding, make_mesh

    devices = jax.devices()
    shape = mesh.shape(len(devices))
    if math.prod(shape) > len(devices) or (distributed.process_count() > 1 and math.prod(shape) != len(devices)):
        raise JaxsqlError(
            f"MeshSection: mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} "
            f"devices, but {len(devices)} devices are available"
            + (f" on {distributed.process_count()} processes (a multi-process mesh must use all of them)"
               if distributed.process_count() > 1 else ""))
    m = make_mesh(*shape, devices=devices[: math.prod(shape)])
    rules = mesh.sharding_rules()
    try:
        check_rules_fit_mesh(rules, m)
    except JaxsqlError as e:
        raise JaxsqlError(f"MeshSection.rules: {e}") from None
    if distributed.process_count() > 1:
        rows = logical_to_sharding(("batch",), m, rules)
        if distributed.row_share(rows) != (distributed.process_index(), distributed.process_count()):
            batch = rules.mesh_axes("batch")
            split = " x ".join(f"{n}={m.shape[n]}" for n in ((batch,) if isinstance(batch, str) else batch or ()))
            raise JaxsqlError(
                f"MeshSection: the batch axes ({split}) do not give each of the {distributed.process_count()} "
                f"processes its own block of rows; make their product a multiple of the process count")
    return m


def load_policy(model: ModelSection, mesh, rules=None) -> tuple[ModelConfig, Any]:
    """(config, params on their shardings) from an HF directory or a random preset.

    The parameters are stored in `model.param_dtype` (the master weights) and
    the model computes in `model.compute_dtype` (`ModelConfig.compute_dtype`).
    """
    if model.path:
        from models.hf_io import load_hf_checkpoint

        if not as_path(model.path).is_dir():
            raise JaxsqlError(f"ModelSection.path: {model.path} is not a directory")
        return load_hf_checkpoint(model.path, mesh=mesh, rules=rules, param_dtype=model.param_dtype,
                                  compute_dtype=model.compute_dtype)
    from models.config import preset
    from models.model import init_params

    cfg = preset(model.preset, param_dtype=model.param_dtype, compute_dtype=model.compute_dtype)
    return cfg, init_params(cfg, jax.random.PRNGKey(model.init_seed), mesh, rules)


def tokenizer_dir(model: ModelSection) -> str:
    """Where the tokenizer lives (model.tokenizer, else model.path)."""
    d = model.tokenizer or model.path
    if not d:
        raise JaxsqlError("ModelSection.tokenizer: a preset model needs model.tokenizer (a tokenizer directory)")
    return d


def export_policy(out_dir: str | Path, model: ModelSection, cfg: ModelConfig, params) -> Path:
    """Write `params` as an HF checkpoint in `out_dir`, with the run's tokenizer files."""
    from models.hf_io import save_hf_checkpoint

    return save_hf_checkpoint(out_dir, cfg, params, tokenizer_dir=tokenizer_dir(model))


def load_tokenizer(model: ModelSection):
    """The `transformers` tokenizer of the run (local files only)."""
    from transformers import AutoTokenizer

    d = tokenizer_dir(model)
    try:
        from models.hf_io import TOKENIZER_FILES

        # a bucket directory: its tokenizer files only (the weights are staged by the loader)
        tok_dir = local_dir(d, "ModelSection.tokenizer", only=(*TOKENIZER_FILES, "config.json"))
        return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError variants
        raise JaxsqlError(f"ModelSection.tokenizer: cannot load a tokenizer from {d}: {e}") from None


def special_ids(tokenizer, cfg: ModelConfig) -> tuple[tuple[int, ...], int]:
    """(stop ids, pad id): the tokenizer's EOS plus the model's EOS ids; its pad id."""
    stop = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    if not stop:
        raise JaxsqlError("neither the tokenizer nor config.json defines an end-of-sequence token")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return tuple(sorted(stop)), int(pad)


def load_examples(data: DataSection, run_dir: str | Path) -> list[Example]:
    """Examples of `data` (the synthetic benchmark is generated on first use)."""
    if data.source == "synthetic":
        from data.synthetic import MANIFEST, generate_benchmark, load_benchmark

        from jaxsql import distributed

        if not data.path and is_remote(run_dir):
            raise JaxsqlError(f"DataSection.path: the synthetic benchmark is SQLite databases, which stay on local "
                              f"disk; with a run_dir in a bucket ({run_dir}) set data.path to a local directory")
        out = require_local(data.path, "DataSection.path") if data.path else Path(run_dir) / "synthetic"
        # Generated by the lead process first; the others read it when it is complete (a
        # shared run_dir) or, on hosts that do not share it, generate the same bytes locally.
        failed: BaseException | None = None
        if distributed.is_lead_process() and not (out / MANIFEST).exists():
            try:
                generate_benchmark(out)
            except JaxsqlError as e:
                failed = e
        if distributed.any_process(failed is not None):
            raise failed or JaxsqlError(f"DataSection: the lead process could not generate {out}")
        bench = load_benchmark(out) if (out / MANIFEST).exists() else generate_benchmark(out)
        if data.split not in ("train", "dev"):
            raise JaxsqlError(f"DataSection.split: synthetic has train and dev, got {data.split!r}")
        examples = bench.train if data.split == "train" else bench.dev
    else:
        from data.readers import read_examples

        if not data.path:
            raise JaxsqlError(f"DataSection.path: source {data.source!r} needs a path")
        examples = read_examples(data.source, data.path, split=data.split or None)
    if not examples:
        raise JaxsqlError(f"DataSection: {data.source} {data.path} split {data.split!r} has no examples")
    return list(examples)


def data_stream(examples: list[Example], data: DataSection, batch_size: int, *,
                process_index: int | None = None, process_count: int | None = None):
    """An endless, seeded, checkpointable grain iterator of this process's slices of the
    global batches of `batch_size` examples (`data.pipeline`; process defaults from jax):
    N processes read together exactly the batches one process reads."""
    from data.pipeline import make_iterator, process_rows

    if len(examples) < batch_size:
        raise JaxsqlError(f"DataSection.batch_size: {batch_size} is more than the {len(examples)} examples")
    try:
        process_rows(batch_size, process_index, process_count)
    except JaxsqlError as e:
        raise JaxsqlError(f"DataSection.batch_size: {e}") from None
    return make_iterator(examples, batch_size=batch_size, seed=data.shuffle_seed, num_epochs=None,
                         drop_remainder=True, process_index=process_index, process_count=process_count)


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready model config (for checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of `model_config_dict`."""
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple((str(k), float(v)) for k, v in d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return ModelConfig(**d)


def open_checkpointer(run_dir: str | Path, checkpoint: CheckpointSection, *, resume: bool) -> Checkpointer:
    """The run's checkpointer; refuses to start over a run that has checkpoints unless resuming."""
    ck = Checkpointer(as_path(run_dir) / "checkpoints", max_to_keep=checkpoint.max_to_keep,
                      async_save=checkpoint.async_save)
    if not resume and ck.latest_step() is not None:
        raise JaxsqlError(f"{run_dir} already holds checkpoints (latest step {ck.latest_step()}); "
                          f"pass --resume to continue it or choose a new run_dir")
    return ck


def save_run(ck: Checkpointer, step: int, train_state, rng, iterator, config: Mapping[str, Any],
             model_cfg: ModelConfig, kind: str) -> bool:
    """Save the whole run state as checkpoint `step`."""
    from data.pipeline import iterator_state

    return ck.save(step, {"train": train_state, "rng": rng}, data_state=iterator_state(iterator),
                   config=config, extra={"model_config": model_config_dict(model_cfg), "kind": kind})


def restore_run(ck: Checkpointer, train_state, rng, iterator, *, fallback_to_previous: bool = False):
    """(train_state, rng, step) from the latest checkpoint, moving `iterator` to its position;
    the given fresh ones and step 0 when there is none (`open_checkpointer` already refused
    existing checkpoints without --resume).

    A latest checkpoint that cannot be restored (truncated, damaged) is a one-line
    `CheckpointError` naming it and the step before it; with `fallback_to_previous` the
    damaged step is moved aside (``<step>.damaged``) and the run resumes from the step before.
    """
    from data.pipeline import restore_iterator
    from jaxsql.checkpoint import CheckpointError

    steps = ck.all_steps()
    if not steps:
        return train_state, rng, 0
    target = {"train": train_state, "rng": rng}
    try:
        state, meta = ck.restore(target)
    except CheckpointError as e:
        previous = steps[-2] if len(steps) > 1 else None
        if not fallback_to_previous or previous is None:
            offer = (f"rerun with --resume-from-previous (checkpoint.fallback_to_previous=true) to move it "
                     f"aside and resume from step {previous}" if previous is not None
                     else "no earlier checkpoint is left to resume from")
            raise CheckpointError(f"{e}; {offer}") from None
        ck.move_aside(steps[-1])
        state, meta = ck.restore(target, previous)
    if meta.get("data_state") is not None:
        restore_iterator(iterator, meta["data_state"])
    return state["train"], state["rng"], int(meta["step"])


def copy_tree(tree):
    """Fresh buffers (so donating one copy never invalidates the other)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
