"""The one table between HF tensor names and our parameter pytree, used both ways.

Each `TensorRule` names an HF tensor (``{i}`` is the layer index), the path
of our leaf (per-layer leaves are stacked on a leading layers axis), and
the reshape/transpose in each direction. HF linear weights are stored
[out, in]; ours are [in, out] with heads split out, so that the forward
pass is a plain einsum ("BTD,DNH->BTNH").

`hf_import` and `hf_export` read this table and nothing else, so a rule
fixed here is fixed in both directions.

A rule may belong to one output head (`HEADS`): ``"lm"`` is the causal-LM
head (``lm_head`` of ``*ForCausalLM``), ``"value"`` the scalar head of a
process reward model exported as ``*ForTokenClassification`` with one
label (``score``: a linear layer with bias, see `models.prm`). The decoder's
rules serve both heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from models.config import ModelConfig

Array = Any  # numpy array or jax tracer: the rules only use .T and .reshape


def _same(x: Array, c: ModelConfig) -> Array:
    return x


def _t(x: Array, c: ModelConfig) -> Array:
    return x.T


# q/k/v projections: HF [n*H, D] <-> ours [D, n, H]
def _q_in(x, c):
    return x.T.reshape(c.hidden_size, c.num_heads, c.head_dim)


def _kv_in(x, c):
    return x.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim)


def _heads_out(x, c):
    return x.reshape(c.hidden_size, -1).T


# q/k/v bias: HF [n*H] <-> ours [n, H]
def _qb_in(x, c):
    return x.reshape(c.num_heads, c.head_dim)


def _kvb_in(x, c):
    return x.reshape(c.num_kv_heads, c.head_dim)


def _flat(x, c):
    return x.reshape(-1)


# output projection: HF [D, N*H] <-> ours [N, H, D]
def _o_in(x, c):
    return x.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_out(x, c):
    return x.reshape(c.num_heads * c.head_dim, c.hidden_size).T


def _always(c: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """HF name <-> our leaf path, with the conversion each way."""

    hf: str
    path: tuple[str, ...]
    to_ours: Callable[[Array, ModelConfig], Array]
    to_hf: Callable[[Array, ModelConfig], Array]
    when: Callable[[ModelConfig], bool] = _always
    head: str | None = None  # None: every head; else only checkpoints with this head

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


L = "model.layers.{i}."
RULES: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", ("embed",), _same, _same),                # [V, D]
    TensorRule(L + "input_layernorm.weight", ("layers", "attn_norm"), _same, _same),  # [D]
    TensorRule(L + "self_attn.q_proj.weight", ("layers", "wq"), _q_in, _heads_out),   # [N*H, D] -> [D, N, H]
    TensorRule(L + "self_attn.k_proj.weight", ("layers", "wk"), _kv_in, _heads_out),  # [K*H, D] -> [D, K, H]
    TensorRule(L + "self_attn.v_proj.weight", ("layers", "wv"), _kv_in, _heads_out),  # [K*H, D] -> [D, K, H]
    TensorRule(L + "self_attn.q_proj.bias", ("layers", "bq"), _qb_in, _flat, lambda c: c.qkv_bias),   # [N*H] -> [N, H]
    TensorRule(L + "self_attn.k_proj.bias", ("layers", "bk"), _kvb_in, _flat, lambda c: c.qkv_bias),  # [K*H] -> [K, H]
    TensorRule(L + "self_attn.v_proj.bias", ("layers", "bv"), _kvb_in, _flat, lambda c: c.qkv_bias),  # [K*H] -> [K, H]
    TensorRule(L + "self_attn.q_norm.weight", ("layers", "q_norm"), _same, _same, lambda c: c.qk_norm),  # [H]
    TensorRule(L + "self_attn.k_norm.weight", ("layers", "k_norm"), _same, _same, lambda c: c.qk_norm),  # [H]
    TensorRule(L + "self_attn.o_proj.weight", ("layers", "wo"), _o_in, _o_out),       # [D, N*H] -> [N, H, D]
    TensorRule(L + "post_attention_layernorm.weight", ("layers", "mlp_norm"), _same, _same),  # [D]
    TensorRule(L + "mlp.gate_proj.weight", ("layers", "w_gate"), _t, _t),             # [F, D] -> [D, F]
    TensorRule(L + "mlp.up_proj.weight", ("layers", "w_up"), _t, _t),                 # [F, D] -> [D, F]
    TensorRule(L + "mlp.down_proj.weight", ("layers", "w_down"), _t, _t),             # [D, F] -> [F, D]
    TensorRule("model.norm.weight", ("final_norm",), _same, _same),                   # [D]
    TensorRule("lm_head.weight", ("lm_head",), _t, _t, lambda c: not c.tie_word_embeddings,
               head="lm"),                                                          # [V, D] -> [D, V]
    TensorRule("score.weight", ("score", "kernel"), _t, _t, head="value"),          # [1, D] -> [D, 1]
    TensorRule("score.bias", ("score", "bias"), _same, _same, head="value"),        # [1]
)
HEADS = ("lm", "value")

# Tied checkpoints sometimes still carry the (identical) output matrix.
TIED_EXTRA = "lm_head.weight"


def hf_tensors(cfg: ModelConfig, head: str = "lm") -> list[tuple[str, TensorRule, int | None]]:
    """Every HF tensor of a checkpoint for `cfg` with output `head`, in file order:
    (name, rule, layer index or None)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    rules = [r for r in RULES if r.when(cfg) and r.head in (None, head)]
    out: list[tuple[str, TensorRule, int | None]] = []
    layered = [r for r in rules if r.per_layer]
    out += [(r.hf, r, None) for r in rules if not r.per_layer and r.path == ("embed",)]
    for i in range(cfg.num_layers):
        out += [(r.hf.format(i=i), r, i) for r in layered]
    out += [(r.hf, r, None) for r in rules if not r.per_layer and r.path != ("embed",)]
    return out


def get_leaf(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree
