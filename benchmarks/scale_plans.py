"""The table of docs/scale.md: for each model, G and chip, the smallest slice and mesh that fit a GRPO step.

For every model preset, G in (8, 16) and chip, it tries the slice sizes in `SLICES`, every mesh
data x fsdp x tensor of that size (tensor 1, 2, 4 or 8, dividing the heads) and the micro-batch
counts that give each chip whole prompts, runs the same planner as `jaxsql plan` and keeps, for
the smallest slice with a fitting plan, the plan with the shortest expected step time (among
those that leave 15% of the usable memory free, when some do). It prints
a markdown table and, under it, the `jaxsql plan` command of every row.

    python benchmarks/scale_plans.py [--batch 16] [--prompt-len 2048] [--new-tokens 1024]
"""

from __future__ import annotations

import argparse

from jaxsql.plan import PlanInput, plan
from models.config import preset
from models.flops import CHIPS

MODELS = ("qwen3-4b", "qwen2.5-coder-7b", "qwen2.5-14b")
# chip -> (slice name format, chips per slice to try)
SLICES = {
    "v4": ("v4-{cores}", (4, 8, 16, 32, 64)),
    "v5e": ("v5litepod-{chips}", (8, 16, 32, 64, 128, 256)),
    "v5p": ("v5p-{cores}", (4, 8, 16, 32, 64)),
    "h100": ("{chips} x H100", (8,)),
}


def meshes(chips: int, cfg):
    for tensor in (1, 2, 4, 8):
        if chips % tensor or cfg.num_heads % tensor or cfg.num_kv_heads % tensor:
            continue
        rest = chips // tensor
        for data in (1, 2, 4):
            if rest % data == 0:
                yield data, rest // data, tensor


def best_plan(model: str, G: int, chip: str, batch: int, P: int, C: int):
    cfg = preset(model)
    fmt, sizes = SLICES[chip]
    for n in sizes:
        fitting = []
        for data, fsdp, tensor in meshes(n, cfg):
            for m in (1, 2, 4, 8, 16):
                if batch % m or (batch // m) % (data * fsdp):
                    continue
                r = plan(PlanInput(cfg=cfg, chip=chip, data=data, fsdp=fsdp, tensor=tensor, batch=batch,
                                   generations=G, prompt_len=P, new_tokens=C, micro_batches=m, remat="full"))
                if r["fits"] and not r["warnings"]:
                    fitting.append((r["step_time_s"]["expected_total"], m, (data, fsdp, tensor), r))
        if fitting:  # the fastest, among plans that leave 15% of the usable memory free when there are any
            _, m, mesh, r = min(fitting, key=lambda x: (x[3]["peak_bytes"] > 0.85 * x[3]["usable_bytes"], x[0], x[1]))
            name = fmt.format(chips=n, cores=2 * n)
            return name, n, mesh, m, r
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=1024)
    args = parser.parse_args()
    rows, commands = [], []
    print("| model | G | chip | slice | mesh (data, fsdp, tensor) | micro-batches | peak GiB / usable | "
          "roofline s | expected s | of which decoding |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for G in (8, 16):
            for chip in SLICES:
                found = best_plan(model, G, chip, args.batch, args.prompt_len, args.new_tokens)
                if found is None:
                    print(f"| {model} | {G} | {CHIPS[chip].name} | none of {SLICES[chip][1]} chips fits | | | | | | |")
                    continue
                name, n, (d, f, t), m, r = found
                st = r["step_time_s"]
                print(f"| {model} | {G} | {CHIPS[chip].name} | {name} | {d}, {f}, {t} | {m} | "
                      f"{r['peak_bytes'] / 2**30:.1f} / {r['usable_bytes'] / 2**30:.1f} | "
                      f"{st['roofline_total']:.1f} | {st['expected_total']:.1f} | {st['expected']['decode']:.1f} |")
                commands.append(f"jaxsql plan --model {model} --chip {chip} --mesh data={d},fsdp={f},tensor={t} "
                                f"--batch {args.batch} --generations {G} --prompt-len {args.prompt_len} "
                                f"--new-tokens {args.new_tokens} --micro-batches {m} --remat full")
                rows.append(found)
    print()
    for c in commands:
        print(c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
