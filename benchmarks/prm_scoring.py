"""The PRM's step scores of one GRPO draw, rows scored whole against each prompt run once.

A GRPO draw with process rewards scores N prompts x G samples with the PRM
(`rl.process.PrmScorer.dispatch`). Each row is the prompt, then the steps with their
rendered results and step tags. This times, in one process, both layouts of the same
rows: ``whole`` (`models.prm.step_scores`: every row from its first token) and ``grouped``
(`models.prm.grouped_step_scores`: each prompt once into a KV cache its G rows attend to).
It also times the matmul probe of `jaxsql bench` (`models.flops.matmul_probe`). Random
tokens stand in for the text: the cost depends only on the lengths. Rest lengths are
drawn log-normal around `--rest-median`, clipped to [--rest-min, --rest-max].
Prints one JSON line (best and median of `--repeats`, seconds).

    python benchmarks/prm_scoring.py --prm run/checkpoints/prm/hf            # a trained PRM
    python benchmarks/prm_scoring.py --prm DIR --rest-median 60 --rest-max 120   # short rests
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def best_and_median(f, repeats: int) -> tuple[float, float]:
    jax.block_until_ready(f())  # compilation
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prm", required=True, help="a PRM directory (jaxsql prm init / prm train)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=185)
    ap.add_argument("--rest-median", type=int, default=159)
    ap.add_argument("--rest-min", type=int, default=60)
    ap.add_argument("--rest-max", type=int, default=330)
    ap.add_argument("--steps", type=int, default=3, help="step tags per row")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from jaxsql.sharding import ShardingRules, make_mesh
    from models.flops import matmul_probe
    from models.prm import load_prm
    from rl.prm import PrmRow
    from rl.process import PrmScorer

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    prm = load_prm(args.prm, mesh=mesh, rules=ShardingRules())
    scorer = PrmScorer(prm, mesh, ShardingRules())
    rng = np.random.default_rng(0)
    V, G = prm.model_config.vocab_size, args.generations
    rows, prompts = [], []
    for _ in range(args.prompts):
        p = tuple(int(t) for t in rng.integers(3, V, args.prompt_len))
        for _ in range(G):
            n = int(np.clip(rng.lognormal(np.log(args.rest_median), 0.45), args.rest_min, args.rest_max))
            tags = sorted(int(x) for x in rng.choice(n, min(n, args.steps), replace=False))
            rows.append(PrmRow(p + tuple(int(t) for t in rng.integers(3, V, n)), tuple(len(p) + x for x in tags)))
            prompts.append(list(p))
    res: dict = {"prm": args.prm, "hidden_size": prm.model_config.hidden_size,
                 "num_layers": prm.model_config.num_layers, "rows": len(rows), "prompt_len": args.prompt_len,
                 "rest_tokens_mean": float(np.mean([len(r.tokens) - args.prompt_len for r in rows])),
                 "rest_tokens_max": max(len(r.tokens) - args.prompt_len for r in rows)}
    res["whole_s"] = best_and_median(lambda: scorer.dispatch(rows), args.repeats)
    res["grouped_s"] = best_and_median(lambda: scorer.dispatch(rows, prompts, G), args.repeats)
    res["speedup_best"] = res["whole_s"][0] / res["grouped_s"][0]
    res["probe_gflops"] = matmul_probe("float32") / 1e9
    res["devices"] = len(jax.devices())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
