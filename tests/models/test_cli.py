"""The model commands end to end: model init, generate, convert, bench generate."""

import json
import re

import pytest
import torch
import transformers

from jaxsql.cli import main
from models import flops
from models.config import load_hf_config
from models.testing import save_random_checkpoint, save_test_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["model", "init", "--preset", "tiny", "--out", str(d), "--seed", "3", "--test-tokenizer",
                 "--family", "llama"]) == 0
    return d


def test_model_init_writes_loadable_checkpoint(tiny_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == 4096
    assert (tiny_dir / "tokenizer.json").is_file()


def test_generate_greedy_json_matches_transformers(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "SELECT name FROM", "--greedy",
                 "--max-new-tokens", "10", "--ignore-eos", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = tok.encode("SELECT name FROM")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert row["token_ids"] == ref[0, len(ids):].tolist()
    assert len(row["logprobs"]) == 10 and all(lp <= 0 for lp in row["logprobs"])


def test_generate_samples(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "a", "--prompt", "bc", "--num-samples", "2",
                 "--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("bc", 0), ("bc", 1)]


def test_generate_errors(tiny_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    assert main(["convert", "--hf-in", str(tiny_dir), "--hf-out", str(bare)]) == 0
    for f in bare.glob("tokenizer*"):
        f.unlink()
    assert main(["generate", "--model", str(bare), "--prompt", "x"]) == 1
    assert "no tokenizer files" in capsys.readouterr().err
    # a tokenizer bigger than the model's vocabulary does not belong to it
    small = tmp_path / "small"
    save_random_checkpoint(small, "tiny", vocab_size=200, num_layers=1, tokenizer_dir=save_test_tokenizer(tmp_path / "t"))
    assert main(["generate", "--model", str(small), "--prompt", "x"]) == 1
    assert re.search(r"tokenizer has 2\d\d tokens but the model's vocab_size is 200", capsys.readouterr().err)
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--greedy", "--temperature", "0.5"]) == 2


def test_convert_round_trip_and_dtype(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["convert", "--hf-in", str(tiny_dir), "--hf-out", str(out), "--dtype", "bfloat16",
                 "--max-shard-mb", "4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16" and info["tokenizer_copied"]
    assert len(list(out.glob("model-*.safetensors"))) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["convert", "--hf-in", str(tiny_dir), "--hf-out", str(foreign)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_bench_generate_compare_hf(tiny_dir, capsys):
    assert main(["bench", "generate", "--model", str(tiny_dir), "--batch", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--ignore-eos", "--compare-hf"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["jaxsql_generated_tokens"] == r["hf_generated_tokens"] == 8
    assert r["speedup_vs_hf"] > 0 and r["jaxsql_tokens_per_s"] > 0
    assert len(r["jaxsql_seconds_all"]) == len(r["hf_seconds_all"]) == r["repeats"] == 3
    # model FLOPs (models.flops) and utilisation against the probes of the same run
    cfg = load_hf_config(tiny_dir)
    assert r["model_flops"] == {"per_token_weights": flops.per_token_weight_flops(cfg),
                                **flops.generate_flops(cfg, 2, 1, 8, 4)}
    assert r["peak_flops_per_s"] > 0 and r["peak_bytes_per_s"] > 0 and r["attention"] == "xla"
    # the benchmark divides by its unrounded time; the printed seconds are rounded to milliseconds
    expected = r["model_flops"]["total"] / r["jaxsql_seconds"] / r["peak_flops_per_s"]
    assert r["mfu"] == pytest.approx(expected, rel=0.0006 / r["jaxsql_seconds"], abs=6e-5)
    # prefill is timed in calls of its own: on a loaded machine it may exceed the whole call's time
    assert r["prefill_seconds"] > 0 and r["decode_mfu"] > 0
    assert r["decode_bytes"] == flops.decode_bytes(cfg, 2, 8, 4, 4, 4)
    assert r["decode_bandwidth_fraction"] > 0


def test_devices_option(tiny_dir, capsys):
    import jax

    assert main(["bench", "generate", "--model", str(tiny_dir), "--batch", "4", "--prompt-len", "8",
                 "--new-tokens", "3", "--devices", "2", "--repeats", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["devices"] == 2 and r["jaxsql_generated_tokens"] == 12
    for bad in ("0", str(len(jax.devices()) + 1), "all"):
        assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--devices", bad]) == 2
        assert "--devices must be 'auto' or 1.." in capsys.readouterr().err
    assert main(["bench", "generate", "--model", str(tiny_dir), "--repeats", "0"]) == 2


@pytest.mark.slow
def test_test_tokenizer_is_identical_across_invocations(tmp_path):
    """Two `jaxsql model init --test-tokenizer` processes (two hash seeds) write byte-identical tokenizers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "jaxsql", "model", "init", "--preset", "tiny", "--out",
                        str(tmp_path / name), "--test-tokenizer"], check=True, env=env, cwd=root,
                       capture_output=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    save_test_tokenizer(tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    ids = tok.encode("SELECT x FROM t WHERE y = 'é'")
    assert tok.decode(ids) == "SELECT x FROM t WHERE y = 'é'"
    assert tok.convert_ids_to_tokens(3 + ord("A")) == "A" and tok.vocab_size == 259  # ids follow byte values
