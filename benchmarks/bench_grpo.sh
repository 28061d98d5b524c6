#!/usr/bin/env bash
# GRPO step time of jaxsql vs TRL's GRPOTrainer on the "tiny" and "mid" random models
# (4 prompts x 8 generations, 128-token prompts, 64 completion tokens, beta 0.04, fp32).
# Needs TRL for the comparison: pip install trl accelerate datasets pandas dill multiprocess xxhash --no-deps
# Usage: benchmarks/bench_grpo.sh [OUT_DIR]   (JSON results in OUT_DIR/grpo_{tiny,mid}.json)
set -euo pipefail
out="${1:-/tmp/jaxsql_bench_grpo}"
mkdir -p "$out"
for preset in tiny mid; do
  model="$out/model_$preset"
  [ -f "$model/config.json" ] || jaxsql model init --preset "$preset" --out "$model" --test-tokenizer
  jaxsql bench grpo --model "$model" --steps 3 --compare-trl | tee "$out/grpo_$preset.json"
done
