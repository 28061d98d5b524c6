"""Sampling throughput of jaxsql vs transformers on the "tiny" and "mid" random models.

Creates the random checkpoints (``jaxsql model init``) under a scratch
directory, then runs ``jaxsql bench generate --batch 32 --prompt-len 128
--new-tokens 64 --ignore-eos --compare-hf`` on each and prints one JSON line
per model. Optionally also the HF import/export memory benchmark on "mid".

    python benchmarks/bench_generate.py [--work DIR] [--presets tiny mid] [--memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--memory", action="store_true", help="also run `jaxsql bench hf-memory` on mid")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="jaxsql-bench-"))
    for name in args.presets:
        model = work / name
        if not (model / "config.json").is_file():
            subprocess.run(["jaxsql", "model", "init", "--preset", name, "--out", str(model)], check=True,
                           stdout=subprocess.DEVNULL)
        out = subprocess.run(["jaxsql", "bench", "generate", "--model", str(model), "--batch", "32",
                              "--prompt-len", "128", "--new-tokens", "64", "--ignore-eos", "--compare-hf"],
                             check=True, capture_output=True, text=True).stdout
        print(json.dumps({"preset": name, **json.loads(out.strip().splitlines()[-1])}), flush=True)
    if args.memory:
        model = work / "mid"
        if not (model / "config.json").is_file():
            subprocess.run(["jaxsql", "model", "init", "--preset", "mid", "--out", str(model)], check=True,
                           stdout=subprocess.DEVNULL)
        out = subprocess.run(["jaxsql", "bench", "hf-memory", "--model", str(model), "--out", str(work / "mid-export")],
                             check=True, capture_output=True, text=True).stdout
        print(out.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
