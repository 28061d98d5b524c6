"""Fixtures of the model tests: small random HF checkpoints built by transformers."""

import pytest

from models.testing import save_random_hf_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (family, transformers config overrides); together they cover GQA, tied and
# untied embeddings, qkv bias, Qwen3 q/k norm with head_dim != hidden/heads, Llama 3 rope scaling.
VARIANTS = {
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE, "num_hidden_layers": 3}),
}


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Variant name -> directory of a random transformers checkpoint (sharded into several files)."""
    out = {}
    for name, (family, overrides) in VARIANTS.items():
        d = tmp_path_factory.mktemp(f"hf_{name}")
        save_random_hf_checkpoint(d, family, seed=len(out), max_shard_size="60KB", tokenizer=True, **overrides)
        out[name] = d
    return out
