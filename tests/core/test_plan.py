"""`jaxsql plan` against a hand calculation (Qwen2.5-Coder-7B, GRPO, 8 x TPU v5p, FSDP)."""

import json

import pytest

from jaxsql.cli import main
from jaxsql.errors import ConfigError, JaxsqlError
from jaxsql.plan import PlanInput, parse_mesh, plan
from models.config import preset

GIB = 1024**3


def test_memory_against_a_hand_calculation():
    cfg = preset("qwen2.5-coder-7b")
    # config.json: V 152064, D 3584, F 18944, L 28, N 28, K 4, H 128, untied, q/k/v bias.
    V, D, F, L, N, K, H = 152064, 3584, 18944, 28, 28, 4, 128
    p = PlanInput(cfg=cfg, chip="v5p", data=1, fsdp=8, tensor=1, batch=64, generations=8, prompt_len=2048,
                  new_tokens=1024, micro_batches=8, param_dtype="float32", compute_dtype="bfloat16", remat="full",
                  attention="auto", reference=True, logits_budget=64 * 1024 * 1024)
    r = plan(p)
    m = r["memory_bytes"]
    # Every matrix has an embed axis (fsdp = 8 divides 3584): an eighth per chip. Norms and biases
    # have no axis on fsdp and tensor = 1: whole on every chip.
    matrices = 2 * V * D + L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)
    whole = L * 2 * D + D + L * (N + 2 * K) * H
    shard = matrices // 8 + whole
    assert shard * 8 > cfg.num_params()  # the replicated leaves count on every chip
    assert m["params"] == 4 * shard                      # float32 master
    assert m["optimizer"] == 8 * shard                   # AdamW mu and nu, float32
    assert m["gradients"] == 2 * 4 * shard               # accumulator + one micro-batch
    assert m["reference"] == m["sampler_weights"] == 2 * shard  # bfloat16 copies
    # KV cache: 64 x 8 rows over 8 chips = 64 rows, 2 (k, v) x 28 layers x 4 heads x 128 x 3072 slots x 2 bytes
    assert m["kv_cache"] == 2 * 28 * 64 * 4 * 128 * 3072 * 2 == 11_274_289_152
    # prefill: 8 prompts per chip x 2048 tokens x 3 MLP activations of 18944 x 2 bytes (splash: no scores)
    assert m["prefill_working"] == 8 * 2048 * 3 * 18944 * 2
    # update, one micro-batch of 8 prompts over 8 chips: 1 prompt (2048 tokens) + 8 completions (8192)
    tokens = 2048 + 8 * 1024
    every = 4 * D + (2 * N + 3 * K) * H + 4 * F  # one layer's activations per token, no remat
    assert m["activations"] == L * tokens * D * 2 + tokens * every * 2  # layer inputs + one layer recomputed
    # the prompt's cache repeated for its 8 completions, and its gradient: 2 x (2 x 28 x 8 x 4 x 128 x 3072 x 2)
    assert m["update_kv_cache"] == 2 * (2 * 28 * 8 * 4 * 128 * 3072 * 2)
    # logits: 64 rows per micro-batch; chunk = 2^26 // (64 * V) = 6 positions; 8 rows per chip, x3 float32
    assert m["logits"] == 3 * 8 * 6 * V * 4
    persistent = m["params"] + m["optimizer"] + m["reference"]
    assert r["phase_peak_bytes"]["sampling"] == persistent + m["sampler_weights"] + m["kv_cache"] + m["prefill_working"]
    assert r["phase_peak_bytes"]["update"] == (persistent + m["gradients"] + m["activations"] + m["update_kv_cache"]
                                               + m["logits"])
    assert r["fits"] and r["usable_bytes"] == int(0.9 * 95e9) and not r["warnings"]


def test_xla_attention_and_no_remat_do_not_fit_and_say_so():
    cfg = preset("qwen2.5-coder-7b")
    r = plan(PlanInput(cfg=cfg, chip="v5e", data=1, fsdp=8, batch=16, remat="none", attention="xla"))
    assert not r["fits"] and r["warnings"][0].startswith("does not fit: the update phase needs")
    # the xla scores: 2 x 28 heads x (2048^2 per prompt + 1024 x 3072 per completion) float32 per layer
    kernel = plan(PlanInput(cfg=cfg, chip="v5e", data=1, fsdp=8, batch=16, remat="none", attention="splash"))
    # 28 layers x 2 (scores, probabilities) x 28 heads x (2 prompts x 2048^2 + 16 rows x 1024 x 3072) x 4 bytes,
    # and one layer's gradients of them in the backward pass
    scores = (28 + 1) * 2 * 28 * (2 * 2048 * 2048 + 16 * 1024 * 3072) * 4
    assert r["memory_bytes"]["activations"] - kernel["memory_bytes"]["activations"] == scores


def test_step_time_roofline():
    cfg = preset("qwen3-4b")
    r = plan(PlanInput(cfg=cfg, chip="h100", data=8, batch=8, generations=8, prompt_len=512, new_tokens=4))
    st = r["step_time_s"]
    # decoding (3 steps, 8 rows per chip) is bandwidth bound: bf16 weights (tied: all of them) per step
    weights = cfg.num_params() * 2
    kv = 2 * 36 * 8 * 128 * 2  # bytes of one token's keys and values
    expected = sum((weights + 8 * (512 + j + 1) * kv) / 3.35e12 for j in range(3))
    assert st["roofline"]["decode"] == pytest.approx(expected, rel=1e-9)
    assert st["expected"]["update"] == pytest.approx(st["roofline"]["update"] / 0.4)
    assert st["roofline_total"] == pytest.approx(sum(st["roofline"].values()))


def test_inputs_are_checked():
    cfg = preset("tiny")
    with pytest.raises(ConfigError, match="plan.chip"):
        PlanInput(cfg=cfg, chip="v9")
    with pytest.raises(ConfigError, match="plan.micro_batches"):
        PlanInput(cfg=cfg, chip="v4", batch=6, micro_batches=4)
    assert parse_mesh("fsdp=8") == (1, 8, 1) and parse_mesh("2x2x1") == (2, 2, 1)
    for bad in ("fsdp=x", "pipeline=2", "2x2"):
        with pytest.raises(JaxsqlError, match="--mesh"):
            parse_mesh(bad)
    r = plan(PlanInput(cfg=cfg, chip="v4", tensor=8, batch=3, generations=2))
    assert any("query heads (4) do not divide over tensor = 8" in w for w in r["warnings"])
    r = plan(PlanInput(cfg=cfg, chip="v4", fsdp=4, batch=6, generations=2))
    assert len(r["warnings"]) == 2 and "the 6 prompts do not split evenly" in r["warnings"][0]
    assert "every chip then holds all of them" in r["warnings"][1]


def test_cli(capsys):
    assert main(["plan", "--model", "qwen2.5-14b", "--chip", "v4", "--mesh", "data=1,fsdp=16,tensor=1",
                 "--batch", "16", "--generations", "16", "--prompt-len", "2048", "--new-tokens", "1024",
                 "--micro-batches", "8", "--remat", "full"]) == 0
    text = capsys.readouterr().out
    assert "qwen2.5-14b (14.77 B params) on 16 x TPU v4" in text and "FITS" in text
    assert main(["plan", "--model", "qwen2.5-14b", "--chip", "v5e", "--mesh", "1x4x1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] is False and "does not fit" in r["warnings"][0]
    # the default remat is the trainer's (model.remat), and a plan that does not fit without it says so
    from rl.config import ModelSection

    assert r["input"]["remat"] == ModelSection(preset="tiny").remat == "none"
    assert r["warnings"][1].startswith("no remat: --remat full")
    assert main(["plan", "--model", "nope", "--chip", "v4"]) == 2
    assert "neither a directory nor a preset" in capsys.readouterr().err
