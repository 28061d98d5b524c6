"""Model FLOPs and bytes (models.flops) against hand counts, and the device peaks."""

import types

import pytest

from models import flops
from models.config import ModelConfig, preset

# D=4, F=6, N=2 query heads, K=1 KV head, H=2, V=10, L=1.
HAND = ModelConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=2, tie_word_embeddings=True, qkv_bias=False)


def test_flops_against_a_hand_count():
    # One token, one layer: q 4*2*2 = 16, k 4*1*2 = 8, v 8, o 2*2*4 = 16, gate/up/down 3*4*6 = 72
    # multiply-adds: 120 -> 240 FLOPs. Vocabulary: 4*10 = 40 -> 80 FLOPs.
    assert flops.layer_matmul_flops_per_token(HAND) == 240
    assert flops.head_flops_per_position(HAND) == 80
    assert flops.per_token_weight_flops(HAND) == 320
    # Three tokens, causal: keys 1 + 2 + 3 = 6; q.k and p.v: 2 heads * 2 dims * 6 * 2 FLOPs each = 48 + 48.
    assert flops.attention_flops(HAND, rows=1, tokens=3) == 96
    assert flops.forward_flops(HAND, 1, 3) == 3 * 240 + 3 * 80 + 96 == 1056
    # Two tokens after five cached ones: keys 6 + 7 = 13 -> 4 * 2 * 2 * 13 = 208 per row; 2 rows, logits on 1.
    assert flops.forward_flops(HAND, 2, 2, past=5, logits=1) == 2 * (2 * 240 + 80) + 2 * 208 == 1536


def test_workloads_decompose():
    # generate: prefill of 2 prompts x 3 tokens (logits at the last), then 3 decoding steps for 2 x 2 samples.
    g = flops.generate_flops(HAND, prompts=2, samples=2, prompt_len=3, new_tokens=4)
    assert g["prefill"] == 2 * (3 * 240 + 80) + 2 * 96
    # decoding steps attend 4, 5, 6 keys: 15 -> 4 * 2 * 2 * 15 = 240 per row
    assert g["decode"] == 4 * (3 * (240 + 80) + 240)
    assert g["total"] == g["prefill"] + g["decode"]
    # grouped log-probs: prompts once (no logits), completions against the prompt, logits on completions
    lp = flops.logprob_flops(HAND, 2, 2, 3, 4)
    assert lp == 2 * (3 * 240 + 96) + 4 * (4 * 240 + flops.attention_flops(HAND, 1, 4, 3)) + 4 * 4 * 80
    full = flops.logprob_flops(HAND, 2, 2, 3, 4, grouped=False)
    assert full == 4 * (7 * 240 + flops.attention_flops(HAND, 1, 7)) + 4 * 4 * 80
    step = flops.grpo_step_flops(HAND, 2, 2, 3, 4, reference=True)
    assert step["update"] == 3 * lp and step["ref_logprobs"] == lp
    assert step["total"] == g["total"] + 4 * lp and step["remat_recompute"] == 0
    assert flops.grpo_step_flops(HAND, 2, 2, 3, 4, reference=False)["ref_logprobs"] == 0
    full_remat = flops.remat_flops(HAND.replace(remat="full"), 2, 2, 3, 4)
    assert full_remat == (2 * 3 + 4 * 4) * 240 + flops.attention_flops(HAND, 2, 3) + flops.attention_flops(HAND, 4, 4, 3)
    assert flops.remat_flops(HAND.replace(remat="dots_no_batch"), 2, 2, 3, 4) == full_remat - 22 * 240


def test_decode_bytes_against_a_hand_count():
    # tied: a step reads every parameter (the embedding is the output head)
    n = HAND.num_params()
    assert n == 4 * 2 * 4 + 2 * 2 * 4 + 3 * 4 * 6 + 2 * 4 + 10 * 4 + 4
    # 3 steps after 3 prompt tokens attend 4 + 5 + 6 = 15 keys per row; K*H*2 (k and v) = 4 values a key
    assert flops.decode_bytes(HAND, rows=2, prompt_len=3, new_tokens=4, weight_itemsize=4, cache_itemsize=2) \
        == 3 * n * 4 + 2 * 15 * 4 * 2
    untied = HAND.replace(tie_word_embeddings=False)
    assert flops.weight_bytes_per_step(untied, 2) == (untied.num_params() - 40) * 2


def test_real_model_per_token_flops_are_about_twice_the_parameters():
    cfg = preset("qwen2.5-coder-7b")
    embed = cfg.vocab_size * cfg.hidden_size  # the lookup is not a matmul
    assert flops.per_token_weight_flops(cfg) == pytest.approx(2 * (cfg.num_params() - embed), rel=1e-3)


def test_chip_table_and_lookup():
    for key, chip in flops.CHIPS.items():
        assert chip.bf16_flops > 1e14 and chip.hbm_bytes_per_s > 5e11 and chip.hbm_bytes >= 16e9, key
        assert chip.source
    dev = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)  # noqa: E731
    assert flops.chip_for_device(dev("tpu", "TPU v5 lite")) is flops.CHIPS["v5e"]
    assert flops.chip_for_device(dev("tpu", "TPU v5")) is flops.CHIPS["v5p"]
    assert flops.chip_for_device(dev("tpu", "TPU v4")) is flops.CHIPS["v4"]
    assert flops.chip_for_device(dev("tpu", "TPU v6 lite")) is flops.CHIPS["v6e"]
    assert flops.chip_for_device(dev("gpu", "NVIDIA H100 80GB HBM3")) is flops.CHIPS["h100"]
    assert flops.chip_for_device(dev("gpu", "NVIDIA A100-SXM4-80GB")) is flops.CHIPS["a100"]
    assert flops.chip_for_device(dev("gpu", "NVIDIA GeForce RTX 4090")) is None
    assert flops.chip_for_device(dev("cpu", "cpu")) is None


def test_cpu_peaks_are_probed_in_the_run():
    peaks = flops.device_peaks("float32")
    assert peaks["peak_flops_per_s"] > 1e8 and peaks["peak_bytes_per_s"] > 1e8
    assert "measured in this run" in peaks["peak_source"]
    assert flops.utilisation(50.0, 2.0, 100.0) == 0.25 and flops.utilisation(1.0, 1.0, None) is None
