"""Model commands: convert, generate, model init, bench generate, bench hf-memory.

jax, transformers and torch are imported inside the handlers so that the
dispatcher starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxsql.errors import JaxsqlError, UsageError

DEVICES_HELP = ("devices to split the samples over (data parallel): 'auto' (all accelerators; on CPU, one "
                "device per core when the weights fit in the last-level cache, else one) or a count N")


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub` and benchmarks to `bench`."""
    p = sub.add_parser("convert", help="import an HF checkpoint and re-export it (round trip, dtype change)")
    p.add_argument("--hf-in", required=True, help="HF checkpoint directory to read")
    p.add_argument("--hf-out", required=True, help="directory to write (empty, or a previous export)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype of the export (default: the checkpoint's)")
    p.add_argument("--max-shard-mb", type=int, default=2048, help="largest safetensors shard (MiB)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty directory that is not an export")
    p.set_defaults(func=_convert)

    p = sub.add_parser("generate", help="sample completions of a prompt from an HF checkpoint")
    p.add_argument("--model", required=True, help="HF checkpoint directory (with its tokenizer)")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for several)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="mask stop tokens: every sample runs the full length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="parameter/compute dtype")
    p.add_argument("--json", action="store_true", help="print JSON lines with token ids and log-probs")
    p.add_argument("--devices", default="auto", help=DEVICES_HELP)
    p.set_defaults(func=_generate)

    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_command", metavar="ACTION")
    m.set_defaults(func=lambda args: _help(m))
    p = msub.add_parser("init", help="write a randomly initialised checkpoint of a preset (no torch needed)")
    p.add_argument("--preset", required=True,
                   help="tiny | mid, or a released model's shape: qwen2.5-0.5b | qwen3-4b | qwen2.5-coder-7b | qwen2.5-14b")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=["qwen2", "qwen3", "llama"], default=None,
                   help="architecture family (default: the preset's; qwen2 for tiny and mid)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied")
    p.add_argument("--test-tokenizer", action="store_true",
                   help="write a byte-level test tokenizer (<pad>, <bos>, <eos> and the 256 bytes)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_model_init)

    p = bench.add_parser("generate", help="sampling throughput (tokens/s), optionally vs transformers")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' generate in this run")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the medians are reported")
    p.add_argument("--devices", default="auto", help=DEVICES_HELP)
    p.add_argument("--attention", choices=["auto", "xla", "cudnn", "splash"], default=None,
                   help="attention implementation (default: the model config's, auto; see docs/model.md)")
    p.set_defaults(func=_bench_generate)

    p = bench.add_parser("hf-memory", help="peak RSS of HF import/export (subprocesses), JSON")
    p.add_argument("--model", required=True, help="HF checkpoint directory to import")
    p.add_argument("--out", required=True, help="scratch directory for the export")
    p.add_argument("--max-shard-mb", type=int, default=64)
    p.set_defaults(func=_bench_hf_memory)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _convert(args: argparse.Namespace) -> int:
    from models.hf_io import TOKENIZER_FILES, load_hf_checkpoint, save_hf_checkpoint

    from jaxsql.paths import local_dir

    src = local_dir(args.hf_in, "--hf-in")  # gs://: staged to local disk
    cfg, params = load_hf_checkpoint(src, param_dtype=args.dtype)
    has_tok = any((src / f).is_file() for f in TOKENIZER_FILES)
    save_hf_checkpoint(args.hf_out, cfg, params, tokenizer_dir=src if has_tok else None,
                       max_shard_bytes=args.max_shard_mb * 1024**2, overwrite=args.overwrite)
    print(json.dumps({"hf_out": str(args.hf_out), "architecture": cfg.architecture, "dtype": cfg.param_dtype,
                      "params": cfg.num_params(), "tokenizer_copied": has_tok}))
    return 0


def load_tokenizer(model_dir: str | Path, vocab_size: int):
    """The checkpoint's tokenizer (transformers AutoTokenizer), checked against the model's vocabulary;
    a checkpoint in a bucket (``gs://``) has its tokenizer files (not its weights) copied to local disk."""
    from jaxsql.paths import local_dir
    from models.hf_io import TOKENIZER_FILES

    model_dir = local_dir(model_dir, "tokenizer of", only=(*TOKENIZER_FILES, "config.json"))
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise JaxsqlError(f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
                          f"copy the tokenizer into the checkpoint directory")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise JaxsqlError(f"{model_dir}: cannot load the tokenizer: {e}") from None
    if len(tok) > vocab_size:
        raise JaxsqlError(f"{model_dir}: tokenizer has {len(tok)} tokens but the model's vocab_size is "
                          f"{vocab_size}; they do not belong together")
    return tok


def sampling_mesh(model_dir: str | Path, args: argparse.Namespace):
    """A data-parallel mesh for sampling: ``--devices auto`` (`models.sampler.sampling_devices`) or N.

    The parameters are replicated on it and `generate` splits the rows over it.
    """
    import jax
    import numpy as np

    from jaxsql.sharding import make_mesh
    from models.config import load_hf_config
    from models.sampler import sampling_devices

    available = jax.devices()
    if args.devices == "auto":
        cfg = load_hf_config(model_dir)
        devices = sampling_devices(cfg.num_params() * np.dtype(args.dtype or cfg.param_dtype).itemsize, available)
    else:
        try:
            count = int(args.devices)
        except ValueError:
            count = 0
        if not 1 <= count <= len(available):
            raise UsageError(f"--devices must be 'auto' or 1..{len(available)} (local devices), got {args.devices!r}")
        devices = available[:count]
    return make_mesh(data=len(devices), devices=devices)


def _generate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from models.hf_io import load_hf_checkpoint
    from models.sampler import generate

    if args.greedy and (args.temperature != 1.0 or args.top_p != 1.0 or args.top_k != 0):
        raise UsageError("--greedy cannot be combined with --temperature/--top-p/--top-k")
    cfg, params = load_hf_checkpoint(args.model, param_dtype=args.dtype, mesh=sampling_mesh(args.model, args))
    tok = load_tokenizer(args.model, cfg.vocab_size)
    prompts = [tok.encode(p) for p in args.prompt]
    stop = set(cfg.eos_token_ids)
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (tok.pad_token_id or 0)
    out = generate(params, cfg, prompts, key=jax.random.key(args.seed), max_new_tokens=args.max_new_tokens,
                   num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, greedy=args.greedy, stop_ids=sorted(stop), ignore_stop=args.ignore_eos,
                   pad_id=pad)
    tokens, logprobs, lengths = (np.asarray(x) for x in (out.tokens, out.logprobs, out.lengths))
    for row in range(tokens.shape[0]):
        ids = tokens[row, : lengths[row]].tolist()
        text = tok.decode(ids, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"prompt": args.prompt[row // args.num_samples], "sample": row % args.num_samples,
                              "completion": text, "token_ids": ids,
                              "logprobs": [round(float(x), 6) for x in logprobs[row, : lengths[row]]]}))
        else:
            print(text)
    return 0


def _model_init(args: argparse.Namespace) -> int:
    import tempfile

    from models.config import preset
    from models.testing import FAMILIES, save_random_checkpoint, save_test_tokenizer

    if args.tokenizer and args.test_tokenizer:
        raise UsageError("--tokenizer and --test-tokenizer are exclusive")
    preset(args.preset)  # fail fast on an unknown preset name
    tok_dir = args.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        if args.test_tokenizer:
            tok_dir = save_test_tokenizer(tmp)
        overrides = {"param_dtype": args.dtype, "compute_dtype": args.dtype}
        if args.family is not None:
            overrides["architecture"] = FAMILIES[args.family]
        save_random_checkpoint(args.out, args.preset, seed=args.seed, tokenizer_dir=tok_dir,
                               overwrite=args.overwrite, **overrides)
    family = args.family or preset(args.preset).family
    print(json.dumps({"out": str(args.out), "preset": args.preset, "family": family, "seed": args.seed}))
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from models.benchmarks import bench_generate

    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    result = bench_generate(args.model, mesh=sampling_mesh(args.model, args), batch=args.batch,
                            prompt_len=args.prompt_len, new_tokens=args.new_tokens, ignore_eos=args.ignore_eos,
                            compare_hf=args.compare_hf, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, greedy=args.greedy, seed=args.seed, dtype=args.dtype,
                            repeats=args.repeats, attention=args.attention)
    print(json.dumps(result))
    return 0


def _bench_hf_memory(args: argparse.Namespace) -> int:
    from models.benchmarks import bench_hf_memory

    print(json.dumps(bench_hf_memory(args.model, args.out, max_shard_bytes=args.max_shard_mb * 1024**2)))
    return 0
