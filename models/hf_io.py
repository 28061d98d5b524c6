"""Hugging Face checkpoint import and export with bounded host memory.

Import (`load_hf_checkpoint`) reads ``model.safetensors`` or the shards
listed in ``model.safetensors.index.json`` tensor by tensor, converts each
with `models.params_map`, and places it straight onto its sharding. Stacked
per-layer leaves are preallocated on their sharding and filled one layer at
a time by a jitted in-place update (donated buffer), so the host holds at
most one HF tensor beyond the parameters themselves.

Export (`save_hf_checkpoint`) plans shards of at most `max_shard_bytes`,
then streams each tensor from the device to its shard file, so the host
holds one tensor at a time (on several processes each tensor is gathered
with `jaxsql.distributed.to_host` and only the lead process writes), and
writes the index, ``config.json``, ``generation_config.json`` and the
tokenizer files.

Both take the output head (`models.params_map.HEADS`): ``"lm"`` reads and
writes ``*ForCausalLM`` checkpoints (the default); ``"value"`` reads and
writes the scalar head of a process reward model as ``*ForTokenClassification``
with one label (`models.prm`).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsql.errors import JaxsqlError
from models import params_map
from models.config import ModelConfig, load_hf_config
from models import prm
from models.model import ParamSpec, Params
from models.safetensors_io import SafetensorsReader, write_safetensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
EXPORT_MARKER = ".jaxsql-export"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


# --- import -----------------------------------------------------------------------


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise JaxsqlError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: model_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise JaxsqlError(f"{index}: lists shard {f.name}, which does not exist")
        return files
    single = model_dir / SINGLE_NAME
    if not single.is_file():
        raise JaxsqlError(f"{model_dir}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
    return {name: single for name in SafetensorsReader(single).keys()}


def _shapes(specs: Params, cfg: ModelConfig) -> Params:
    dt = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dt), specs, is_leaf=lambda x: isinstance(x, ParamSpec))


def _shardings(specs: Params, cfg: ModelConfig, mesh, rules) -> Params:
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: dev, _shapes(specs, cfg))
    from jaxsql.sharding import tree_shardings

    axes = jax.tree.map(lambda s: s.axes, specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    return tree_shardings(axes, mesh, rules, _shapes(specs, cfg))


def _drop_leading(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer_value: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer_value.astype(stacked.dtype), i, 0)


def load_hf_checkpoint(model_dir: str | Path, *, mesh=None, rules=None, param_dtype: str | None = None,
                       compute_dtype: str | None = None, head: str = "lm") -> tuple[ModelConfig, Params]:
    """Read an HF checkpoint directory into (config, params placed on their shardings).

    `param_dtype` defaults to the checkpoint's dtype (config.json); the
    compute dtype defaults to the parameter dtype. `head` is the output head
    the checkpoint must have (``"lm"``: a causal LM; ``"value"``: a PRM's
    token-classification head). Missing, unexpected or wrongly shaped
    tensors raise `JaxsqlError` naming them.
    """
    from jaxsql.paths import local_dir

    model_dir = local_dir(model_dir, "HF checkpoint")  # gs://: staged to local disk first
    overrides: dict[str, Any] = {}
    if param_dtype:
        overrides["param_dtype"] = param_dtype
    cfg = load_hf_config(model_dir, **overrides) if head == "lm" else prm.load_head_config(model_dir, head, **overrides)
    cfg = cfg.replace(compute_dtype=compute_dtype or cfg.param_dtype)
    files = _tensor_files(model_dir)
    wanted = params_map.hf_tensors(cfg, head)

    names = {n for n, _, _ in wanted}
    missing = [n for n, _, _ in wanted if n not in files]
    tied_extra = {params_map.TIED_EXTRA} if cfg.tie_word_embeddings and head == "lm" else set()
    unexpected = sorted(set(files) - names - tied_extra)
    if missing or unexpected:
        raise JaxsqlError(f"{model_dir}: checkpoint does not match config.json: "
                          f"missing tensors {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                          f"unexpected tensors {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")

    readers: dict[Path, SafetensorsReader] = {}

    def reader(name: str) -> SafetensorsReader:
        path = files[name]
        if path not in readers:
            readers[path] = SafetensorsReader(path)
        return readers[path]

    specs = prm.prm_param_specs(cfg, head)
    bad = []
    for name, rule, layer in wanted:
        shape = params_map.get_leaf(specs, rule.path).shape[1 if rule.per_layer else 0:]
        hf_shape = jax.eval_shape(lambda x: rule.to_hf(x, cfg), jax.ShapeDtypeStruct(shape, jnp.float32)).shape
        if reader(name).shape(name) != tuple(hf_shape):
            bad.append(f"{name} has shape {list(reader(name).shape(name))}, expected {list(hf_shape)}")
    if bad:
        raise JaxsqlError(f"{model_dir}: wrongly shaped tensors: " + "; ".join(bad[:10]))

    dt = np.dtype(jnp.dtype(cfg.param_dtype))
    shardings = _shardings(specs, cfg, mesh, rules)
    shapes = _shapes(specs, cfg)
    leaves: dict[tuple[str, ...], jax.Array] = {}
    for name, rule, layer in wanted:
        value = np.ascontiguousarray(rule.to_ours(reader(name).read(name), cfg)).astype(dt, copy=False)
        sharding = params_map.get_leaf(shardings, rule.path)
        # Every process reads the whole tensor from its own copy of the checkpoint, so this is a
        # value the processes share (not rows of a batch): device_put places each process's
        # shards of it, on one host or many (tested with 2 processes on an FSDP mesh).
        if layer is None:
            leaves[rule.path] = jax.device_put(value, sharding)
        else:
            if rule.path not in leaves:
                shape = params_map.get_leaf(shapes, rule.path)
                leaves[rule.path] = jax.jit(lambda: jnp.zeros(shape.shape, shape.dtype), out_shardings=sharding)()
            part = jax.device_put(value, _drop_leading(sharding))
            leaves[rule.path] = _set_layer(leaves[rule.path], part, jnp.int32(layer))
        del value

    params: Params = {}
    for path, arr in leaves.items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
    return cfg, params


# --- export -----------------------------------------------------------------------


def _save_to_bucket(out_dir, cfg: ModelConfig, params: Params, **options: Any):
    """`save_hf_checkpoint` to a URL (``gs://``): the same refusal rules on the bucket directory,
    the export written to a local temporary directory (safetensors shards are written with seeks)
    and then copied into the bucket through `etils.epath` by the lead process."""
    import tempfile

    from jaxsql import distributed
    from jaxsql.paths import as_path, upload_dir

    out = as_path(out_dir)
    failure: str | None = None
    if distributed.is_lead_process():
        try:
            _check_out_dir(out, options["overwrite"])
        except (JaxsqlError, OSError) as e:
            failure = str(e)
    if distributed.any_process(failure is not None):
        raise JaxsqlError(failure or f"{out}: HF export refused on the lead process (see its log)")
    with tempfile.TemporaryDirectory(prefix="jaxsql-export-") as tmp:
        save_hf_checkpoint(tmp, cfg, params, **{**options, "overwrite": True})
        if distributed.is_lead_process():
            try:
                marker = Path(tmp) / EXPORT_MARKER  # last, as locally: a partial upload is not an export
                upload_dir_files = [f for f in Path(tmp).iterdir() if f != marker]
                staging = Path(tmp) / ".upload"
                staging.mkdir()
                for f in upload_dir_files:
                    f.rename(staging / f.name)
                upload_dir(staging, out)
                (out / EXPORT_MARKER).write_text(marker.read_text())
            except OSError as e:
                failure = f"{out}: cannot write the export into the bucket ({e})"
        if distributed.any_process(failure is not None):
            raise JaxsqlError(failure or f"{out}: HF export failed on the lead process (see its log)")
    return out


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise JaxsqlError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / EXPORT_MARKER).exists() and not overwrite:
            raise JaxsqlError(f"{out_dir}: directory is not empty and is not a previous jaxsql export; "
                              f"choose an empty directory or pass overwrite=True (--overwrite)")
        for old in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_NAME]:
            if old.exists():
                old.unlink()


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    if not copied:
        raise JaxsqlError(f"{tokenizer_dir}: no tokenizer files found (looked for {list(TOKENIZER_FILES)})")
    return copied


def save_hf_checkpoint(out_dir: str | Path, cfg: ModelConfig, params: Params, *, tokenizer_dir: str | Path | None = None,
                       max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, dtype: str | None = None,
                       head: str = "lm") -> Path:
    """Write `params` as an HF checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads
    (``AutoModelForTokenClassification`` for ``head="value"``, `models.prm`).

    Tensors are stored in `dtype` (default `cfg.param_dtype`, the dtype of
    the master weights), which ``config.json`` records as ``dtype`` and
    ``torch_dtype``; they are split into shards
    ``model-XXXXX-of-YYYYY.safetensors`` of at most `max_shard_bytes` (a
    larger single tensor gets its own shard), with
    ``model.safetensors.index.json``. A non-empty `out_dir` is refused
    unless it is a previous jaxsql export or `overwrite` is set.

    On several processes every process must call this (each tensor is
    gathered with `jaxsql.distributed.to_host`, a collective, one tensor at
    a time, so host memory stays bounded by the largest tensor) and only the
    lead process writes files; an error on the lead is raised on every
    process once all tensors have been gathered.
    """
    from jaxsql import distributed
    from jaxsql.paths import is_remote, local_dir

    if tokenizer_dir is not None:
        tokenizer_dir = local_dir(tokenizer_dir, "tokenizer")
    if is_remote(out_dir):
        return _save_to_bucket(out_dir, cfg, params, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes,
                               overwrite=overwrite, dtype=dtype, head=head)
    out_dir = Path(out_dir)
    export_cfg = cfg if dtype is None else cfg.replace(param_dtype=dtype)
    dt = np.dtype(jnp.dtype(export_cfg.param_dtype))
    lead = distributed.is_lead_process()
    failure: str | None = None
    if lead:
        try:
            _check_out_dir(out_dir, overwrite)
            out_dir.mkdir(parents=True, exist_ok=True)
        except (JaxsqlError, OSError) as e:
            failure = str(e)
    if distributed.any_process(failure is not None):
        raise JaxsqlError(failure or f"{out_dir}: HF export refused on the lead process (see its log)")

    plan = []
    for name, rule, layer in params_map.hf_tensors(cfg, head):
        leaf = params_map.get_leaf(params, rule.path)
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        hf_shape = jax.eval_shape(lambda x: rule.to_hf(x, cfg), jax.ShapeDtypeStruct(shape, dt)).shape
        plan.append((name, rule, layer, tuple(hf_shape), int(np.prod(hf_shape, dtype=np.int64)) * dt.itemsize))

    shards: list[list[tuple]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[4]

    by_name = {item[0]: item for item in plan}
    produced: set[str] = set()

    def produce(name: str) -> np.ndarray:
        _, rule, layer, _, _ = by_name[name]
        produced.add(name)
        leaf = params_map.get_leaf(params, rule.path)
        value = distributed.to_host(leaf if layer is None else leaf[layer])
        return rule.to_hf(value, cfg).astype(dt, copy=False)

    weight_map: dict[str, str] = {}
    total = 0
    many = distributed.process_count() > 1
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update({item[0]: fname for item in shard})
        if lead and failure is None:
            try:
                total += write_safetensors(out_dir / fname, [(n, dt, s) for n, _, _, s, _ in shard], produce)
            except (JaxsqlError, OSError) as e:
                failure = f"{out_dir / fname}: {e}"
        if many:  # the other processes, or the lead after a failure: keep the collectives in step
            for item in shard:
                if item[0] not in produced:
                    produce(item[0])

    if lead and failure is None:
        try:
            (out_dir / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            (out_dir / "config.json").write_text(json.dumps(prm.head_config_dict(export_cfg, head), indent=2) + "\n")
            gen = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
                   "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0]}
            (out_dir / "generation_config.json").write_text(
                json.dumps({k: v for k, v in gen.items() if v not in (None, [])}, indent=2) + "\n")
            if tokenizer_dir is not None:
                _copy_tokenizer(Path(tokenizer_dir), out_dir)
            (out_dir / EXPORT_MARKER).write_text("written by jaxsql models.hf_io.save_hf_checkpoint\n")
        except (JaxsqlError, OSError) as e:
            failure = str(e)
    if distributed.any_process(failure is not None):
        raise JaxsqlError(failure or f"{out_dir}: HF export failed on the lead process (see its log)")
    return out_dir
