"""Export a training checkpoint (GRPO, SFT or PRM) to Hugging Face format, on demand.

A PRM run's checkpoint (``kind: prm``) becomes a PRM directory in its head's
format (`models.prm.save_prm`: ``*ForCausalLM`` or ``*ForTokenClassification``,
the tokenizer and ``jaxsql_prm.json``)."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxsql.checkpoint import Checkpointer, CheckpointError
from rl import setup


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
                      tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Restore the parameters of `step` (default latest) from a run and write an HF checkpoint.

    The model config and the tokenizer location come from the checkpoint's
    metadata; `tokenizer` overrides the latter.
    """
    import optax

    from models.hf_io import save_hf_checkpoint
    from models.model import init_params
    from rl.config import OptimSection
    from rl.train_step import init_state, make_optimizer

    from jaxsql.paths import as_path

    run_dir = as_path(run_dir)
    ck_dir = run_dir if run_dir.name == "checkpoints" else run_dir / "checkpoints"
    if not ck_dir.is_dir():
        raise CheckpointError(f"{ck_dir} does not exist (expected a run directory with checkpoints/)")
    ck = Checkpointer(ck_dir, async_save=False)
    steps = ck.all_steps()
    if step is not None and step not in steps:
        ck.close()
        have = ", ".join(map(str, steps)) if steps else "none"
        raise CheckpointError(f"--step {step}: no such checkpoint in {ck_dir} (steps saved: {have})")
    meta = ck.read_meta(step)
    extra = meta.get("extra") or {}
    if "model_config" not in extra:
        raise CheckpointError(f"checkpoint {ck_dir}/{meta['step']} has no model_config in its metadata")
    cfg = setup.model_config_from_dict(extra["model_config"])
    run_cfg = meta.get("config") or {}
    optim = OptimSection(**run_cfg.get("optim", {}))
    optimizer: optax.GradientTransformation = make_optimizer(optim, int(run_cfg.get("steps", 1)) *
                                                             int(run_cfg.get("algo", {}).get("num_iterations", 1)))
    prm_cfg = _prm_config(run_cfg) if extra.get("kind") == "prm" else None
    if prm_cfg is not None and prm_cfg.head != "lm":
        from models.model import ParamSpec
        from models.prm import prm_param_specs

        params = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, cfg.param_dtype), prm_param_specs(cfg, prm_cfg.head),
                              is_leaf=lambda x: isinstance(x, ParamSpec))
    else:
        params = init_params(cfg, jax.random.PRNGKey(0))
    target = {"train": init_state(params, optimizer), "rng": jax.random.PRNGKey(0)}
    state, _ = ck.restore(target, meta["step"])
    tok = tokenizer
    if tok is None:
        # the run config's own keys, not ModelSection(**model): a checkpoint written before a
        # model key was renamed (model.dtype) must still export
        model = run_cfg.get("model", {})
        tok = None
        if model:
            tok = model.get("tokenizer") or model.get("path")
            if not tok:
                raise CheckpointError("ModelSection.tokenizer: a preset model needs model.tokenizer "
                                      "(a tokenizer directory); pass --tokenizer")
    ck.close()
    if prm_cfg is not None:  # a PRM run: a PRM directory in its head's format (models.prm.save_prm)
        from models.prm import save_prm

        return save_prm(out_dir, prm_cfg, cfg, state["train"]["params"], tokenizer_dir=tok, overwrite=overwrite)
    return save_hf_checkpoint(out_dir, cfg, state["train"]["params"], tokenizer_dir=tok, overwrite=overwrite)


def _prm_config(run_cfg: dict):
    """The `models.prm.PrmConfig` a PRM run trained: the sidecar of its ``model.path`` (the
    released defaults without one), with the run's ``prm.head``."""
    import dataclasses

    from models.prm import PrmConfig, read_sidecar

    path = (run_cfg.get("model") or {}).get("path") or ""
    side = read_sidecar(path) if path and Path(path).is_dir() else None
    head = (run_cfg.get("prm") or {}).get("head", "lm")
    return dataclasses.replace(side[0] if side is not None else PrmConfig(), head=head)
