"""The model: pure-functional decoder (Qwen2/Qwen3/Llama-3), KV cache, sampler, HF import/export."""
