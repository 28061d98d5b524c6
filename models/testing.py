"""Helpers that build small random checkpoints and tokenizers for tests and benchmarks.

`save_random_hf_checkpoint` builds the model with `transformers` (PyTorch,
imported lazily: torch is a test extra) so parity tests compare against an
independent implementation. `save_random_checkpoint` needs no torch: it
initialises with JAX and exports with `models.hf_io` (what
``jaxsql model init`` runs). `save_test_tokenizer` writes a byte-level BPE
tokenizer with no merges (256 byte tokens + a few specials), enough for
the CLI to encode and decode any text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 like the presets

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6)


def hf_config(family: str = "qwen2", **overrides: Any):
    """A small transformers config of `family` ("qwen2", "qwen3", "llama")."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    kwargs = dict(SMALL)
    kwargs.update(overrides)
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "llama": transformers.LlamaConfig}[family]
    cfg = cls(**kwargs)
    cfg.architectures = [FAMILIES[family]]
    return cfg


def save_random_hf_checkpoint(out_dir: str | Path, family: str = "qwen2", *, seed: int = 0,
                              max_shard_size: str | int | None = None, tokenizer: bool = False,
                              **config_overrides: Any) -> Path:
    """Random float32 `family` model built and saved by transformers' ``save_pretrained``.

    Every parameter (norm scales and biases included) is drawn at random so
    that a wrong mapping of any tensor shows in the logits.
    """
    import torch
    import transformers

    out_dir = Path(out_dir)
    cfg = hf_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    if tokenizer:
        save_test_tokenizer(out_dir)
    return out_dir


def _byte_level_chars() -> list[str]:
    """The character byte-level BPE uses for each byte value 0..255, in byte order (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def save_test_tokenizer(out_dir: str | Path) -> Path:
    """Byte-level BPE with no merges: specials <pad>=0, <bos>=1, <eos>=2, then the 256 bytes in byte order.

    The same files on every call (ids do not depend on set iteration order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    # ByteLevel.alphabet() is a set in a random order each run; ids follow the byte values instead.
    byte_chars = _byte_level_chars()
    assert set(byte_chars) == set(pre_tokenizers.ByteLevel.alphabet())
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def save_random_checkpoint(out_dir: str | Path, preset_name: str = "tiny", *, seed: int = 0,
                           tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                           **overrides: Any) -> Path:
    """JAX-initialised random model of a preset, exported in HF format (no torch needed)."""
    import jax

    from models.config import preset
    from models.hf_io import save_hf_checkpoint
    from models.model import init_params

    cfg = preset(preset_name, **overrides)
    params = init_params(cfg, jax.random.key(seed))
    return save_hf_checkpoint(out_dir, cfg, params, tokenizer_dir=tokenizer_dir, overwrite=overwrite)
