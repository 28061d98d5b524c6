"""`jaxsql plan`: per-chip memory and step time of a GRPO run on a mesh of accelerator chips."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxsql.errors import UsageError


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add `jaxsql plan`."""
    from models.flops import CHIPS

    p = sub.add_parser("plan", help="per-chip memory and step time of a GRPO run on a TPU/GPU mesh",
                       description="Per-chip memory (parameters, optimizer, reference model, KV cache, activations "
                                   "under the remat policy, logits chunks) and roofline step time of GRPO, from the "
                                   "model's shapes and a chip's published peaks. Nothing runs on a device. See "
                                   "docs/scale.md.")
    p.add_argument("--model", required=True, help="HF checkpoint directory (its config.json) or a preset name "
                                                  "(qwen2.5-0.5b, qwen3-4b, qwen2.5-coder-7b, qwen2.5-14b, tiny, mid)")
    p.add_argument("--chip", required=True, choices=sorted(CHIPS), help="accelerator chip (one JAX device)")
    p.add_argument("--mesh", default="data=1,fsdp=1,tensor=1",
                   help="mesh shape: data=D,fsdp=F,tensor=T (omitted axes are 1) or DxFxT; chips = D*F*T")
    p.add_argument("--batch", type=int, default=16, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens (the padded bucket length)")
    p.add_argument("--new-tokens", type=int, default=1024, help="completion tokens")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches of the update")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="master weights (and gradients)")
    p.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="matmul inputs, sampler and reference copies, KV cache")
    # the trainer's default is read when the command runs: rl.config imports JAX, which must not
    # start before the CLI has set the CPU device count (jaxsql.distributed.configure_cpu_devices)
    p.add_argument("--remat", default=None, choices=["none", "full", "dots", "dots_no_batch"],
                   help="checkpoint policy of the layers in the update: the run config's model.remat "
                        "(default: the trainer's default model.remat, none; the real-model recipes set full)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "splash"])
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; 0 loads no reference model")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="assumed fraction of the bf16 peak reached by the compute phases (expected time)")
    p.add_argument("--bandwidth-efficiency", type=float, default=0.7,
                   help="assumed fraction of the HBM bandwidth reached by decoding (expected time)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)


def trainer_remat_default() -> str:
    """The run config's default ``model.remat`` (what `jaxsql train` does when the config is silent)."""
    import dataclasses

    from rl.config import ModelSection

    return next(f.default for f in dataclasses.fields(ModelSection) if f.name == "remat")


def model_config(spec: str):
    """A `ModelConfig` from an HF checkpoint directory or a preset name."""
    from models.config import PRESETS, load_hf_config, preset

    if Path(spec).is_dir():
        return load_hf_config(spec)
    if spec in PRESETS:
        return preset(spec)
    raise UsageError(f"--model {spec!r} is neither a directory nor a preset; presets: {sorted(PRESETS)}")


def _plan(args: argparse.Namespace) -> int:
    from jaxsql.plan import PlanInput, format_plan, parse_mesh, plan
    from rl.policy import WHOLE_LOGITS_LIMIT

    data, fsdp, tensor = parse_mesh(args.mesh)
    request = PlanInput(cfg=model_config(args.model), chip=args.chip, data=data, fsdp=fsdp, tensor=tensor,
                        batch=args.batch, generations=args.generations, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, micro_batches=args.micro_batches, param_dtype=args.param_dtype,
                        compute_dtype=args.compute_dtype, remat=args.remat or trainer_remat_default(),
                        attention=args.attention,
                        reference=args.beta != 0, logits_budget=WHOLE_LOGITS_LIMIT, mfu=args.mfu,
                        bandwidth_efficiency=args.bandwidth_efficiency)
    result = plan(request)
    if args.json:
        result["input"]["model"] = args.model
        print(json.dumps(result))
    else:
        print(format_plan(result, Path(args.model).name if Path(args.model).is_dir() else args.model))
    return 0
