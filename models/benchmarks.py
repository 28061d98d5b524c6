"""Benchmarks of this package: sampling throughput (vs transformers) and HF import/export memory.

`bench_generate` times `models.sampler.generate` on random prompts after a
warm-up call (compilation excluded) and, optionally, transformers'
``generate`` on the same weights with the same sampling settings and a
fixed length (``min_new_tokens``), in the same process, so the ratio is
taken under the same machine load; each side's figure is the median of
`repeats` timed runs. It also times the prefill alone (``generate`` with one
new token, which runs no decoding step) so that decoding's share is the
difference, and reports model FLOPs, MFU and, for decoding, the fraction of
the memory-bandwidth ceiling (`models.flops`), beside the peaks they are
measured against.

`bench_hf_memory` runs import and export of a checkpoint in fresh
subprocesses and reports the peak RSS (``resource.getrusage``) above the
RSS of the same process right after JAX initialised, in units of the
checkpoint's parameter bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def bench_generate(model_dir: str | Path, *, batch: int = 32, prompt_len: int = 128, new_tokens: int = 64,
                   ignore_eos: bool = True, compare_hf: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, top_k: int = 0, greedy: bool = False, seed: int = 0,
                   dtype: str | None = None, repeats: int = 3, mesh=None,
                   attention: str | None = None) -> dict[str, Any]:
    """Generated tokens per second of jaxsql (and transformers with `compare_hf`), with MFU.

    The parameters are replicated on `mesh` (default: one device), and
    `generate` splits the batch over its devices (data parallel; the CLI's
    ``--devices auto`` picks them with `models.sampler.sampling_devices`).
    Each side is timed `repeats` times after its warm-up; the medians give
    the tokens/s and the ratio. `attention` overrides the model's attention
    implementation (`models.attention`; default: the config's, "auto").
    """
    import jax
    import numpy as np

    from models.attention import resolve as resolve_attention
    from models.hf_io import load_hf_checkpoint
    from models.sampler import generate

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cfg, params = load_hf_checkpoint(model_dir, param_dtype=dtype, mesh=mesh)
    if attention is not None:
        cfg = cfg.replace(attention=attention)
    rng = np.random.RandomState(seed)
    low = 3 if cfg.vocab_size > 3 else 0
    prompts = rng.randint(low, cfg.vocab_size, (batch, prompt_len)).tolist()
    kwargs = dict(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                  ignore_stop=ignore_eos)

    t0 = time.perf_counter()
    jax.block_until_ready(generate(params, cfg, prompts, key=jax.random.key(seed), **kwargs))
    compile_s = time.perf_counter() - t0
    seconds, generated = [], 0
    for r in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(generate(params, cfg, prompts, key=jax.random.key(seed + 1 + r), **kwargs))
        seconds.append(time.perf_counter() - t0)
        generated = int(np.asarray(out.lengths).sum())
    elapsed = float(np.median(seconds))
    prefill_s = _median_seconds(lambda r: generate(params, cfg, prompts, key=jax.random.key(seed + 1 + r),
                                                   **{**kwargs, "max_new_tokens": 1}), repeats)
    result: dict[str, Any] = {
        "model": str(model_dir), "architecture": cfg.architecture, "params": cfg.num_params(),
        "param_dtype": cfg.param_dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "ignore_eos": ignore_eos, "temperature": temperature, "top_p": top_p, "top_k": top_k, "greedy": greedy,
        "backend": jax.default_backend(), "devices": 1 if mesh is None else mesh.size,
        "process_devices": jax.local_device_count(), "repeats": repeats,
        "jaxsql_first_call_s": round(compile_s, 3), "jaxsql_seconds": round(elapsed, 3),
        "jaxsql_seconds_all": [round(x, 3) for x in seconds],
        "jaxsql_generated_tokens": generated, "jaxsql_tokens_per_s": round(generated / elapsed, 1),
        "attention": resolve_attention(cfg.attention, cfg.compute_dtype),
    }
    result.update(generate_utilisation(cfg, batch, prompt_len, new_tokens, elapsed, prefill_s,
                                       1 if mesh is None else mesh.size))
    if compare_hf:
        result.update(_bench_hf(model_dir, prompts, new_tokens=new_tokens, ignore_eos=ignore_eos,
                                temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, seed=seed,
                                pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0, repeats=repeats))
        result["speedup_vs_hf"] = round(result["jaxsql_tokens_per_s"] / result["hf_tokens_per_s"], 2)
    return result


def _median_seconds(call, repeats: int) -> float:
    """Median wall time of `repeats` calls of ``call(r)`` after one untimed (compiling) call."""
    import jax
    import numpy as np

    jax.block_until_ready(call(-1))
    seconds = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call(r))
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds))


def generate_utilisation(cfg, batch: int, prompt_len: int, new_tokens: int, seconds: float, prefill_s: float,
                         devices: int) -> dict[str, Any]:
    """FLOPs, MFU and decoding's bandwidth fraction of a `generate` call (`models.flops`).

    Prefill = the timed one-token call; decoding = the rest of the full call. Bandwidth: the
    weights and the attended cache read by each decoding step, in the parameter and compute
    dtypes, against the peak read bandwidth.
    """
    import numpy as np

    from models import flops

    f = flops.generate_flops(cfg, batch, 1, prompt_len, new_tokens)
    peaks = flops.device_peaks(cfg.compute_dtype, devices)
    decode_s = max(seconds - prefill_s, 0.0)
    moved = flops.decode_bytes(cfg, batch, prompt_len, new_tokens, np.dtype(cfg.param_dtype).itemsize,
                               np.dtype(cfg.compute_dtype).itemsize)
    peak_f, peak_b = peaks["peak_flops_per_s"], peaks["peak_bytes_per_s"]
    return {
        "model_flops": {"per_token_weights": flops.per_token_weight_flops(cfg), **f},
        "prefill_seconds": round(prefill_s, 3), "decode_seconds": round(decode_s, 3),
        "achieved_flops_per_s": round(f["total"] / seconds),
        "mfu": flops.utilisation(f["total"], seconds, peak_f),
        "prefill_mfu": flops.utilisation(f["prefill"], prefill_s, peak_f),
        "decode_mfu": flops.utilisation(f["decode"], decode_s, peak_f),
        "decode_bytes": moved,
        "decode_bandwidth_fraction": flops.utilisation(moved, decode_s, peak_b),
        **{k: (round(v) if isinstance(v, float) else v) for k, v in peaks.items()},
    }


def _bench_hf(model_dir, prompts, *, new_tokens, ignore_eos, temperature, top_p, top_k, greedy, seed, pad_id,
              repeats):
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(prompts)
    gen: dict[str, Any] = dict(max_new_tokens=new_tokens, pad_token_id=pad_id, attention_mask=torch.ones_like(ids))
    if greedy:
        gen.update(do_sample=False)
    else:
        gen.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    if ignore_eos:
        gen["min_new_tokens"] = new_tokens
    torch.manual_seed(seed)
    seconds = []
    with torch.no_grad():
        model.generate(ids[:, :8], **{**gen, "max_new_tokens": 2, "min_new_tokens": 0,
                                      "attention_mask": torch.ones_like(ids[:, :8])})  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **gen)
            seconds.append(time.perf_counter() - t0)
    elapsed = float(np.median(seconds))
    new = out[:, ids.shape[1]:]
    generated = int(new.numel()) if ignore_eos else int((new != pad_id).sum())
    return {"hf_seconds": round(elapsed, 3), "hf_seconds_all": [round(x, 3) for x in seconds],
            "hf_generated_tokens": generated,
            "hf_tokens_per_s": round(generated / elapsed, 1), "torch_threads": torch.get_num_threads(),
            "transformers_version": transformers.__version__, "torch_version": torch.__version__}


_MEMORY_CHILD = r"""
import json, resource, sys, threading, time
mode, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def current_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
from models import hf_io
base = peak_bytes()
t0 = time.perf_counter()
cfg, params = hf_io.load_hf_checkpoint(src)
jax.block_until_ready(params)
extra = {}
if mode == "export":
    # ru_maxrss cannot be reset, so the export's own high-water mark is sampled.
    before, high, stop = current_bytes(), [0], threading.Event()
    def poll():
        while not stop.is_set():
            high[0] = max(high[0], current_bytes())
            time.sleep(0.0005)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    hf_io.save_hf_checkpoint(dst, cfg, params, max_shard_bytes=int(sys.argv[4]), overwrite=True)
    stop.set()
    thread.join()
    extra = {"rss_before_export_bytes": before, "sampled_export_peak_bytes": max(high[0], current_bytes()),
             "export_own_rise_bytes": max(high[0], current_bytes()) - before}
elapsed = time.perf_counter() - t0
param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"mode": mode, "baseline_rss_bytes": base, "peak_rss_bytes": peak_bytes(),
                  "param_bytes": param_bytes, "seconds": round(elapsed, 3), **extra}))
"""


def bench_hf_memory(model_dir: str | Path, out_dir: str | Path, *, max_shard_bytes: int = 64 * 1024**2) -> dict[str, Any]:
    """Peak RSS of HF import and export above the JAX-initialised baseline, in parameter bytes.

    Baseline = peak RSS right after JAX initialised. Import loads the
    checkpoint, so its rise includes the parameters themselves (1x, CPU
    arrays live in host memory) plus transient buffers. Export first imports
    (the parameters must exist), then writes; ``ru_maxrss`` then covers both,
    and ``export_own_rise_bytes`` (current RSS sampled every 0.5 ms during
    the export, minus the RSS before it) isolates the export's own buffers.
    """
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    result: dict[str, Any] = {"model": str(model_dir), "max_shard_bytes": max_shard_bytes}
    for mode in ("import", "export"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode, str(model_dir), str(out_dir),
                               str(max_shard_bytes)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} benchmark failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rise = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
        result[mode] = {**r, "rss_rise_bytes": rise, "rise_over_param_bytes": round(rise / r["param_bytes"], 3)}
        if "export_own_rise_bytes" in r:
            result[mode]["export_own_rise_over_param_bytes"] = round(r["export_own_rise_bytes"] / r["param_bytes"], 3)
    return result
