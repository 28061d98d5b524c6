import json

import pytest

from jaxsql.errors import JaxsqlError
from models.config import ModelConfig, load_hf_config, preset


def _hf(**kw):
    d = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 100, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "eos_token_id": [2, 3]}
    d.update(kw)
    return d


def test_qwen2_from_transformers_4_layout():
    cfg = ModelConfig.from_hf_dict(_hf())
    assert (cfg.family, cfg.head_dim, cfg.qkv_bias, cfg.qk_norm, cfg.eos_token_ids) == ("qwen2", 8, True, False, (2, 3))
    assert cfg.rope_theta == 10000.0 and cfg.tie_word_embeddings
    hash(cfg)  # usable as a static jit argument
    d = _hf()
    del d["tie_word_embeddings"], d["rope_theta"]
    cfg = ModelConfig.from_hf_dict(d)  # transformers' defaults when absent
    assert not cfg.tie_word_embeddings and cfg.rope_theta == 10000.0


def test_llama3_rope_parameters_transformers_5_layout():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = ModelConfig.from_hf_dict(_hf(architectures=["LlamaForCausalLM"], model_type="llama", rope_parameters=rope))
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict["factor"] == 8.0 and not cfg.qkv_bias
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_to_hf_round_trip(arch):
    cfg = preset("tiny", architecture=arch)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, word", [
    ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_options_are_named(change, word):
    with pytest.raises(JaxsqlError, match=word):
        ModelConfig.from_hf_dict(_hf(**change))


def test_validation_names_field():
    with pytest.raises(JaxsqlError, match="num_kv_heads"):
        preset("tiny", num_kv_heads=3)
    with pytest.raises(JaxsqlError, match="unknown model preset"):
        preset("huge")


def test_presets_match_issue():
    t, m = preset("tiny"), preset("mid")
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads,
            t.tie_word_embeddings, t.family) == (4096, 256, 768, 4, 4, 2, True, "qwen2")
    assert (m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads,
            m.tie_word_embeddings) == (32000, 512, 1536, 8, 8, 4, True)


def test_load_hf_config_missing_file(tmp_path):
    with pytest.raises(JaxsqlError, match="config.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf()))
    assert load_hf_config(tmp_path, param_dtype="bfloat16").param_dtype == "bfloat16"


def test_released_model_presets():
    """The shapes of released models (config.json values) give the parameter counts of their model
    cards (rounded there: 0.49 B, 4.0 B, 7.61 B, 14.7 B)."""
    published = {"qwen2.5-0.5b": 0.49e9, "qwen3-4b": 4.0e9, "qwen2.5-coder-7b": 7.61e9, "qwen2.5-14b": 14.7e9}
    for name, count in published.items():
        cfg = preset(name)
        assert abs(cfg.num_params() - count) / count < 0.01, name
        assert cfg.attention == "auto" and "attention" not in cfg.to_hf_dict()
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert preset("qwen3-4b").family == "qwen3" and preset("qwen3-4b").qk_norm
    assert preset("qwen2.5-coder-7b").qkv_bias and not preset("qwen2.5-coder-7b").tie_word_embeddings
