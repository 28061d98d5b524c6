"""Where one decoding step of the `mid` preset goes on XLA:CPU: the step against its parts.

Times (best and median of 7, seconds), in one process, of: a 2048^3 float32 matmul (the probe of
`jaxsql bench`), one decoding step as the CPU sampler runs it (unstacked, fused weights, 32 rows
against a 192-slot cache), the layers alone, the vocabulary matmul [32, 512] @ [512, 32000], the
layers' weight GEMMs alone (same shapes, no attention), and the sampling of a token. Prints one
JSON line; compare parts with the probe of the same run (docs/scale.md, "The CPU path").

    python benchmarks/decode_breakdown.py            # JAX_NUM_CPU_DEVICES / XLA_FLAGS to compare
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.config import preset
from models.model import forward, hidden_states, init_params, output_logits
from models.sampler import SamplingParams, _cpu_layout, draw_token

B, P, S = 32, 128, 192


def best_and_median(f, *args, n: int = 7) -> tuple[float, float]:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts))


def main() -> None:
    cfg = preset("mid")
    D, F = cfg.hidden_size, cfg.intermediate_size
    lay = _cpu_layout(init_params(cfg, jax.random.PRNGKey(0)), cfg)
    run_cfg = cfg.replace(tie_word_embeddings=False)
    rng = np.random.RandomState(0)
    prompt = jnp.asarray(rng.randint(3, cfg.vocab_size, (B, P)))
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    _, cache = jax.jit(lambda p, t: hidden_states(p, t, positions, run_cfg, fill_cache=S))(lay, prompt)
    tok = jnp.asarray(rng.randint(3, cfg.vocab_size, (B, 1)))
    pos = jnp.full((B, 1), P, jnp.int32)
    ones = jnp.ones((B, 1), bool)
    step = jax.jit(lambda p, c: forward(p, tok, pos, run_cfg, mask_BT=ones, cache=c))
    layers = jax.jit(lambda p, c: hidden_states(p, tok, pos, run_cfg, mask_BT=ones, cache=c)[0])
    h = layers(lay, cache)
    logits = jax.jit(lambda p, h: output_logits(p, h, run_cfg))(lay, h)[:, 0]
    x = jnp.asarray(rng.randn(B, D), jnp.float32)

    def gemms(lay, x):  # every layer's weight matmuls at the decode shape, nothing else
        out = []
        for lp in lay["layers"]:
            out.append(jnp.sum(x @ lp["w_qkv"]))
            out.append(jnp.sum(x @ lp["wo"].reshape(-1, D)[:D]))
            out.append(jnp.sum((x @ lp["w_gate_up"])[:, :F] @ lp["w_down"]))
        return sum(out)

    sp = SamplingParams(1.0, 1.0, 0, False, tuple(cfg.eos_token_ids), True, 0)
    big = jnp.asarray(rng.randn(2048, 2048), jnp.float32)
    res: dict = {"probe_2048_s": best_and_median(jax.jit(lambda a: a @ a), big)[0]}
    res["probe_gflops"] = 2 * 2048**3 / res["probe_2048_s"] / 1e9
    res["step_s"] = best_and_median(step, lay, cache)
    res["layers_s"] = best_and_median(layers, lay, cache)
    res["vocab_matmul_s"] = best_and_median(jax.jit(lambda w, x: x @ w), lay["lm_head"], x)
    res["layer_gemms_s"] = best_and_median(jax.jit(gemms), lay, x)
    res["sampling_s"] = best_and_median(jax.jit(lambda l, u: draw_token(l, u, sp)), logits,
                                        jnp.asarray(rng.rand(B), jnp.float32))
    res["gflop"] = {"vocab_matmul": 2 * B * D * cfg.vocab_size / 1e9,
                    "layer_gemms": 2 * B * cfg.num_layers * (D * lay["layers"][0]["w_qkv"].shape[1] + D * D
                                                             + D * 2 * F + F * D) / 1e9}
    res["devices"], res["xla_flags"] = len(jax.devices()), os.environ.get("XLA_FLAGS", "")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
