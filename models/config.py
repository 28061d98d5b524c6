"""`ModelConfig`: the decoder's hyper-parameters, read from and written to HF `config.json`.

One frozen, hashable dataclass covers the three supported families:

- ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5, Qwen2.5-Coder): bias on q/k/v projections;
- ``Qwen3ForCausalLM``: RMSNorm on each head of q and k (before rotary), no bias;
- ``LlamaForCausalLM`` (Llama 3 / 3.1): optional ``llama3`` rope scaling.

Being hashable it can be a static argument of `jax.jit`. Anything the model
does not implement (another architecture, sliding-window attention, another
rope scaling type, MLP bias, a non-SiLU activation) is a `JaxsqlError`
naming the option, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from jaxsql.config import require
from jaxsql.errors import JaxsqlError

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters (names follow HF where they exist).

    `rope_scaling` is None or the Llama 3 parameters as a sorted tuple of
    (name, value) pairs: factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings. `param_dtype` is the storage dtype of
    the parameters, `compute_dtype` the dtype of matmul inputs (norms,
    softmax and logits are always float32). `remat` names the
    `jax.checkpoint` policy of the scanned layer: none | full | dots |
    dots_no_batch. `attention` picks the attention implementation (auto |
    xla | cudnn | splash, see `models.attention`); it is how this process
    runs the model, not part of the checkpoint, so `config.json` neither
    carries nor sets it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str = "Qwen2ForCausalLM"
    rope_theta: float = 1_000_000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"

    def __post_init__(self) -> None:
        name = "ModelConfig"
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            require(isinstance(getattr(self, f), int) and getattr(self, f) > 0, name, f,
                    f"must be a positive integer, got {getattr(self, f)!r}")
        require(self.num_heads % self.num_kv_heads == 0, name, "num_kv_heads",
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        require(self.head_dim % 2 == 0, name, "head_dim", "must be even (rotary embeddings)")
        require(self.architecture in ARCHITECTURES, name, "architecture",
                f"unsupported {self.architecture!r}; supported: {sorted(ARCHITECTURES)}")
        require(self.param_dtype in DTYPES, name, "param_dtype", f"must be one of {DTYPES}")
        require(self.compute_dtype in DTYPES, name, "compute_dtype", f"must be one of {DTYPES}")
        require(self.remat in REMAT_POLICIES, name, "remat", f"must be one of {REMAT_POLICIES}")
        require(self.attention in ATTENTION_IMPLEMENTATIONS, name, "attention",
                f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        require(self.rope_theta > 0, name, "rope_theta", "must be positive")
        if self.rope_scaling is not None:
            keys = {k for k, _ in self.rope_scaling}
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            require(keys == need, name, "rope_scaling", f"llama3 scaling needs exactly {sorted(need)}, got {sorted(keys)}")
        if isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def family(self) -> str:
        """'qwen2', 'qwen3' or 'llama'."""
        return ARCHITECTURES[self.architecture]

    @property
    def rope_scaling_dict(self) -> dict[str, float] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_heads, self.num_kv_heads
        per_layer = d * h * (n + 2 * k) + n * h * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += h * (n + 2 * k)
        if self.qk_norm:
            per_layer += 2 * h
        total = self.num_layers * per_layer + self.vocab_size * d + d
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
        return total

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- HF config.json ---------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from the contents of an HF ``config.json`` (transformers 4.x or 5.x layout)."""
        archs = d.get("architectures") or []
        if not archs:
            by_type = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
            mt = d.get("model_type")
            if mt not in by_type:
                raise JaxsqlError(f"config.json: unsupported model_type {mt!r} and no 'architectures'; "
                                  f"supported: {sorted(ARCHITECTURES)}")
            archs = [by_type[mt]]
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise JaxsqlError(f"config.json: unsupported architectures {archs}; supported: {sorted(ARCHITECTURES)}")
        arch = archs[0]
        family = ARCHITECTURES[arch]

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise JaxsqlError(f"config.json: unsupported hidden_act {act!r} (only 'silu')")
        if d.get("use_sliding_window"):
            raise JaxsqlError("config.json: use_sliding_window=true is not supported")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            raise JaxsqlError("config.json: layer_types other than 'full_attention' are not supported")
        if d.get("mlp_bias"):
            raise JaxsqlError("config.json: mlp_bias=true is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise JaxsqlError(f"config.json: pretraining_tp={d['pretraining_tp']} is not supported")

        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope_scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise JaxsqlError(f"config.json: llama3 rope scaling is missing {missing}")
            rope_scaling = tuple(sorted((k, float(rope[k])) for k in keys))
        elif rope_type != "default":
            raise JaxsqlError(f"config.json: unsupported rope scaling type {rope_type!r} (supported: default, llama3)")

        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if family == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(d.get("attention_bias", False))
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        kwargs = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            architecture=arch,
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),  # transformers default
            qkv_bias=qkv_bias,
            qk_norm=family == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            param_dtype=dtype if dtype in DTYPES else "float32",
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` contents transformers needs to rebuild this model."""
        if self.family == "qwen2" and not self.qkv_bias:
            raise JaxsqlError("ModelConfig.qkv_bias: Qwen2ForCausalLM always has q/k/v bias")
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope = {"rope_theta": self.rope_theta, "rope_type": "llama3", **self.rope_scaling_dict}
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        eos: Any = list(self.eos_token_ids)
        if len(eos) == 1:
            eos = eos[0]
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if eos != [] else None,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "use_cache": True,
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(rope)
        if self.family == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = False
        elif self.family == "qwen3":
            d["attention_bias"] = False
            d["use_sliding_window"] = False
        else:
            d["use_sliding_window"] = False
        return d


def load_hf_config(model_dir: str | Path, **overrides: Any) -> ModelConfig:
    """Read ``DIR/config.json`` into a `ModelConfig` (overrides e.g. param_dtype); DIR local or
    in a bucket (``gs://``, `jaxsql.paths`)."""
    from jaxsql.paths import as_path

    path = as_path(model_dir) / "config.json"
    if not path.is_file():
        raise JaxsqlError(f"{path}: no config.json (is {model_dir} an HF checkpoint directory?)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JaxsqlError(f"{path}: not valid JSON: {e}") from None
    return ModelConfig.from_hf_dict(d, **overrides)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    ),
    "mid": ModelConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
        num_heads=8, num_kv_heads=4, head_dim=64, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    ),
    # The shapes of released models, from their config.json on the Hugging Face hub (values as
    # published; dtypes left at this class's defaults, choose them per run). They size plans
    # (`jaxsql plan`, docs/scale.md) and random checkpoints shaped like the real thing.
    # huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, architecture="Qwen2ForCausalLM",
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645,),
    ),
    # huggingface.co/Qwen/Qwen3-4B/blob/main/config.json
    "qwen3-4b": ModelConfig(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, architecture="Qwen3ForCausalLM",
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=False,
        qk_norm=True, max_position_embeddings=40960, bos_token_id=151643, eos_token_ids=(151645,),
    ),
    # huggingface.co/Qwen/Qwen2.5-Coder-7B-Instruct/blob/main/config.json
    "qwen2.5-coder-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, architecture="Qwen2ForCausalLM",
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645,),
    ),
    # huggingface.co/Qwen/Qwen2.5-14B-Instruct/blob/main/config.json
    "qwen2.5-14b": ModelConfig(
        vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
        num_heads=40, num_kv_heads=8, head_dim=128, architecture="Qwen2ForCausalLM",
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_ids=(151645,),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration: the random-model presets "tiny" and "mid" (Qwen2 family by
    default), or the shape of a released model ("qwen2.5-0.5b", "qwen3-4b",
    "qwen2.5-coder-7b", "qwen2.5-14b")."""
    if name not in PRESETS:
        raise JaxsqlError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if "architecture" in overrides and "qkv_bias" not in overrides:
        family = ARCHITECTURES.get(overrides["architecture"])
        overrides["qkv_bias"] = family == "qwen2"
        overrides.setdefault("qk_norm", family == "qwen3")
    return cfg.replace(**overrides)
