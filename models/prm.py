"""The process reward model (PRM) of Reward-SQL: the policy's decoder with one of two heads.

A PRM reads a prompt followed by a CoCTE trajectory (each step, its
execution result and a step tag, `jaxsql.cocte.trajectory_segments`) and
scores every step at the last token of its tag. Two heads, selected by
`PrmConfig.head`:

- ``"lm"``, the released form (Zhang et al. 2025, after Math-Shepherd, Wang
  et al. 2024): an ordinary causal LM read at the step tag; the step's score
  is the probability of the "good" token renormalised over the two
  candidates, ``softmax(logits[[good, bad]])[0] = sigmoid(l_good - l_bad)``.
  The checkpoint is a ``*ForCausalLM`` that ``transformers`` loads as is.
- ``"value"``: a scalar head on the same decoder, ``sigmoid(h . w + b)``,
  exported as ``*ForTokenClassification`` with ``num_labels = 1`` (the head
  is ``score``, an ``nn.Linear(hidden, 1)`` with bias, read from the final
  normed hidden state as transformers' ``GenericForTokenClassification``
  does); ``AutoModelForTokenClassification`` loads it.

`value_head_from_lm` turns the first into the second exactly
(``w = W[good] - W[bad]``, ``b = 0``), so a value-head PRM can start from
the policy with the same scores as the released form.

`step_logits` / `step_scores` are pure and jittable: token rows [B, T], a
mask, and the step-tag positions [B, K] (-1 for none) give [B, K] scores
from the hidden states at those positions only (no [B, T, V] logits), so
they can run on the accelerator beside the reference log-probs.

A PRM directory is an HF checkpoint plus ``jaxsql_prm.json`` (`SIDECAR`):
the head, the step tag, the candidate tokens and their ids. A plain causal
LM without the file is read as the released form with the default tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxsql.cocte import MAX_RESULT_CHARS, STEP_TAG
from jaxsql.config import require
from jaxsql.errors import JaxsqlError
from models import params_map
from models.config import ARCHITECTURES, ModelConfig
from models.model import ParamSpec, Params, hidden_states, param_specs, positions_from_mask

HEADS = params_map.HEADS
#: The token-classification architecture that carries a value head for each causal-LM family.
TOKEN_CLASSIFICATION = {
    "Qwen2ForCausalLM": "Qwen2ForTokenClassification",
    "Qwen3ForCausalLM": "Qwen3ForTokenClassification",
    "LlamaForCausalLM": "LlamaForTokenClassification",
}
SIDECAR = "jaxsql_prm.json"


@dataclasses.dataclass(frozen=True)
class PrmConfig:
    """What a PRM reads and where it answers (saved as `SIDECAR`).

    Attributes:
      head: ``"lm"`` (causal LM, P(good) over the two candidates) or ``"value"`` (scalar head).
      step_tag: text after each step's result; the score is read at its last token.
      good_token, bad_token: the two candidates of the ``lm`` head; each one's last token counts.
      max_result_chars: characters of each rendered step result.
    """

    head: str = "lm"
    step_tag: str = STEP_TAG
    good_token: str = " +"
    bad_token: str = " -"
    max_result_chars: int = MAX_RESULT_CHARS

    def __post_init__(self) -> None:
        require(self.head in HEADS, "PrmConfig", "head", f"must be one of {list(HEADS)}, got {self.head!r}")
        for f in ("step_tag", "good_token", "bad_token"):
            require(isinstance(getattr(self, f), str) and getattr(self, f).strip() != "", "PrmConfig", f,
                    "must be a non-blank string")
        require(self.good_token != self.bad_token, "PrmConfig", "bad_token", "must differ from good_token")
        require(isinstance(self.max_result_chars, int) and self.max_result_chars >= 16, "PrmConfig",
                "max_result_chars", f"must be an integer >= 16, got {self.max_result_chars!r}")


def candidate_ids(prm_cfg: PrmConfig, tokenizer: Any) -> tuple[int, int]:
    """(good id, bad id): the last token of each candidate's encoding (as the released code
    takes ``encode(" + -")``); JaxsqlError when they coincide or do not encode."""
    ids = []
    for text in (prm_cfg.good_token, prm_cfg.bad_token):
        enc = tokenizer.encode(text, add_special_tokens=False)
        if not enc:
            raise JaxsqlError(f"PRM candidate token {text!r} encodes to nothing with this tokenizer")
        ids.append(int(enc[-1]))
    if ids[0] == ids[1]:
        raise JaxsqlError(f"PRM candidates {prm_cfg.good_token!r} and {prm_cfg.bad_token!r} end in the same token")
    return ids[0], ids[1]


# --- parameters -----------------------------------------------------------------------------


def head_param_specs(cfg: ModelConfig, head: str) -> Params:
    """The head's own leaves: none for ``lm`` (it reuses the output embedding),
    ``score.kernel`` [D, 1] and ``score.bias`` [1] for ``value``."""
    if head == "lm":
        return {}
    if head == "value":
        return {"score": {"kernel": ParamSpec((cfg.hidden_size, 1), ("embed", None), "zeros"),
                          "bias": ParamSpec((1,), (None,), "zeros")}}
    raise JaxsqlError(f"unknown PRM head {head!r}; expected one of {list(HEADS)}")


def prm_param_specs(cfg: ModelConfig, head: str) -> Params:
    """The full parameter structure of a model with output `head` (`ParamSpec` leaves).

    A value-head model has no output embedding: ``lm_head`` is left out.
    """
    specs = param_specs(cfg)
    if head == "value":
        specs.pop("lm_head", None)
    specs.update(head_param_specs(cfg, head))
    return specs


def value_head_from_lm(params: Params, cfg: ModelConfig, candidates: tuple[int, int]) -> tuple[ModelConfig, Params]:
    """A value-head PRM that scores exactly as the ``lm``-head PRM `params` does.

    ``sigmoid(h . (W[good] - W[bad]))`` equals the two-candidate softmax, so
    ``score.kernel = W[good] - W[bad]`` and ``score.bias = 0``. The output
    embedding is dropped (an untied ``lm_head`` is not needed any more); the
    returned config is marked tied, meaning "no separate output matrix".
    """
    good, bad = candidates
    w_VD = params["embed"] if cfg.tie_word_embeddings else params["lm_head"].T
    kernel = (w_VD[good].astype(jnp.float32) - w_VD[bad].astype(jnp.float32))[:, None].astype(w_VD.dtype)
    out = {k: v for k, v in params.items() if k != "lm_head"}
    out["score"] = {"kernel": kernel, "bias": jnp.zeros((1,), w_VD.dtype)}
    return cfg.replace(tie_word_embeddings=True), out


# --- scoring --------------------------------------------------------------------------------


def _head_logits(params: Params, cfg: ModelConfig, head: str, candidates: tuple[int, int],
                 h_BKD: jax.Array) -> jax.Array:
    """The head's logit z [B, K] from hidden states [B, K, D] (float32)."""
    h_BKD = h_BKD.astype(jnp.float32)
    if head == "lm":
        good, bad = candidates
        if cfg.tie_word_embeddings:
            w_CD = params["embed"][jnp.asarray([good, bad])]
        else:
            w_CD = params["lm_head"][:, jnp.asarray([good, bad])].T
        l_BKC = jnp.einsum("BKD,CD->BKC", h_BKD, w_CD.astype(jnp.float32))
        return l_BKC[..., 0] - l_BKC[..., 1]
    if head == "value":
        return h_BKD @ params["score"]["kernel"][:, 0].astype(jnp.float32) + params["score"]["bias"][0].astype(
            jnp.float32)
    raise ValueError(f"unknown PRM head {head!r}")


def _hidden(params: Params, cfg: ModelConfig, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    mask = mask_BT.astype(jnp.bool_)
    h_BTD, _ = hidden_states(params, tokens_BT, positions_from_mask(mask), cfg, mask_BT=mask)
    return h_BTD


def step_logits(params: Params, cfg: ModelConfig, head: str, candidates: tuple[int, int], tokens_BT: jax.Array,
                mask_BT: jax.Array, positions_BK: jax.Array) -> jax.Array:
    """The PRM's logit z [B, K] (float32) at each step-tag position; the score is sigmoid(z).

    ``lm``: ``z = l_good - l_bad`` from the output embedding at the position
    (the two-candidate softmax in logit form); ``value``: ``z = h . w + b``.
    Rows may be left- or right-padded (``mask_BT`` marks real tokens);
    positions < 0 give 0 (there is no step there). Pure: `cfg`, `head` and
    `candidates` are static under jit.
    """
    h_BTD = _hidden(params, cfg, tokens_BT, mask_BT)
    T = tokens_BT.shape[1]
    valid_BK = positions_BK >= 0
    idx = jnp.clip(positions_BK, 0, T - 1)
    h_BKD = jnp.take_along_axis(h_BTD, idx[..., None], axis=1)
    return jnp.where(valid_BK, _head_logits(params, cfg, head, candidates, h_BKD), 0.0)


def token_logits(params: Params, cfg: ModelConfig, head: str, candidates: tuple[int, int], tokens_BT: jax.Array,
                 mask_BT: jax.Array, last: int | None = None) -> jax.Array:
    """The PRM's logit z [B, C] (float32) at every one of the last `last` positions (all by
    default): `step_logits` read everywhere, for batches that mark step ends with a mask
    (the registered ``prm_bce`` loss). Costs D x 2 (``lm``) or D (``value``) per position,
    never the vocabulary."""
    h_BTD = _hidden(params, cfg, tokens_BT, mask_BT)
    if last is not None:
        h_BTD = h_BTD[:, h_BTD.shape[1] - last:]
    return _head_logits(params, cfg, head, candidates, h_BTD)


def step_scores(params: Params, cfg: ModelConfig, head: str, candidates: tuple[int, int], tokens_BT: jax.Array,
                mask_BT: jax.Array, positions_BK: jax.Array) -> jax.Array:
    """Per-step scores [B, K] in [0, 1]: sigmoid of `step_logits`, 0 where positions < 0."""
    z = step_logits(params, cfg, head, candidates, tokens_BT, mask_BT, positions_BK)
    return jnp.where(positions_BK >= 0, jax.nn.sigmoid(z), 0.0)


#: `step_scores` under jit (cfg, head and candidates static).
score_steps = jax.jit(step_scores, static_argnums=(1, 2, 3))


def grouped_step_scores(params: Params, cfg: ModelConfig, head: str, candidates: tuple[int, int],
                        prompt_NP: jax.Array, prompt_mask_NP: jax.Array, rest_BR: jax.Array,
                        rest_mask_BR: jax.Array, positions_BK: jax.Array) -> jax.Array:
    """`step_scores` of B = N x G rows whose first tokens are one of N prompts, each prompt
    run once (GRPO's G samples share their prompt, which is about half of a PRM row in the
    study; the steps with their rendered results are the rest).

    Row b is prompt ``b // G`` (left-padded, ``prompt_mask_NP`` marks real tokens) followed
    by ``rest_BR[b]`` (right-padded): the prompts fill a KV cache, repeated G times, that the
    rest attends to, as `rl.policy.grouped_logprobs_and_entropy` does for the policy.
    `positions_BK` index `rest_BR` (every step tag follows the prompt); < 0 gives 0. Same
    values as `step_scores` on the whole rows up to float summation order.
    """
    N, P = prompt_NP.shape
    B, R = rest_BR.shape
    pm = prompt_mask_NP.astype(jnp.bool_)
    _, cache = hidden_states(params, prompt_NP, positions_from_mask(pm), cfg, mask_BT=pm, fill_cache=P + R,
                             last_only=True)
    cache = cache.repeat_rows(B // N)
    start_B = jnp.repeat(pm.sum(axis=1, dtype=jnp.int32), B // N)
    positions_BR = start_B[:, None] + jnp.arange(R, dtype=jnp.int32)[None, :]
    h_BRD, _ = hidden_states(params, rest_BR, positions_BR, cfg, mask_BT=rest_mask_BR.astype(jnp.bool_), cache=cache)
    valid_BK = positions_BK >= 0
    h_BKD = jnp.take_along_axis(h_BRD, jnp.clip(positions_BK, 0, R - 1)[..., None], axis=1)
    z = jnp.where(valid_BK, _head_logits(params, cfg, head, candidates, h_BKD), 0.0)
    return jnp.where(valid_BK, jax.nn.sigmoid(z), 0.0)


#: `grouped_step_scores` under jit (cfg, head and candidates static).
score_steps_grouped = jax.jit(grouped_step_scores, static_argnums=(1, 2, 3))


# --- HF config.json of a head ------------------------------------------------------------------


def head_config_dict(cfg: ModelConfig, head: str) -> dict[str, Any]:
    """``config.json`` contents for a model with output `head`."""
    d = cfg.to_hf_dict()
    if head == "lm":
        return d
    if head != "value":
        raise JaxsqlError(f"unknown PRM head {head!r}; expected one of {list(HEADS)}")
    d["architectures"] = [TOKEN_CLASSIFICATION[cfg.architecture]]
    d["num_labels"] = 1
    d["id2label"] = {"0": "LABEL_0"}
    d["label2id"] = {"LABEL_0": 0}
    d["tie_word_embeddings"] = True  # there is no output embedding to untie
    return d


def _read_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise JaxsqlError(f"{path}: no config.json (is {model_dir} an HF checkpoint directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JaxsqlError(f"{path}: not valid JSON: {e}") from None


def checkpoint_head(model_dir: str | Path) -> str:
    """``"value"`` for a ``*ForTokenClassification`` checkpoint, ``"lm"`` for a causal LM."""
    archs = _read_config_json(Path(model_dir)).get("architectures") or []
    return "value" if any(a in TOKEN_CLASSIFICATION.values() for a in archs) else "lm"


def load_head_config(model_dir: str | Path, head: str, **overrides: Any) -> ModelConfig:
    """The decoder's `ModelConfig` of a ``value``-head checkpoint (``*ForTokenClassification``,
    one label); JaxsqlError naming what does not match."""
    model_dir = Path(model_dir)
    if head != "value":
        raise JaxsqlError(f"load_head_config: head {head!r} is not a token-classification head")
    d = _read_config_json(model_dir)
    archs = d.get("architectures") or []
    causal = {v: k for k, v in TOKEN_CLASSIFICATION.items()}
    if len(archs) != 1 or archs[0] not in causal:
        raise JaxsqlError(f"{model_dir}: a value-head PRM is one of {sorted(causal)}, config.json has {archs}")
    labels = d.get("num_labels", len(d.get("id2label") or {}) or None)
    if labels != 1:
        raise JaxsqlError(f"{model_dir}: a value-head PRM has num_labels = 1, config.json has {labels}")
    d = dict(d, architectures=[causal[archs[0]]], tie_word_embeddings=True)
    if causal[archs[0]] not in ARCHITECTURES:  # pragma: no cover - the two tables are kept together
        raise JaxsqlError(f"{model_dir}: unsupported family {archs[0]}")
    return ModelConfig.from_hf_dict(d, **overrides)


# --- directories ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prm:
    """A loaded PRM: its config, the decoder config, parameters, candidate ids and tokenizer."""

    config: PrmConfig
    model_config: ModelConfig
    params: Params
    candidates: tuple[int, int]
    tokenizer: Any
    path: str = ""

    def scores(self, tokens_BT: jax.Array, mask_BT: jax.Array, positions_BK: jax.Array) -> jax.Array:
        """`step_scores` of this PRM (jitted)."""
        return score_steps(self.params, self.model_config, self.config.head, self.candidates, tokens_BT, mask_BT,
                           positions_BK)


def _load_tokenizer(model_dir: Path, vocab_size: int):
    from transformers import AutoTokenizer

    from models.hf_io import TOKENIZER_FILES

    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise JaxsqlError(f"{model_dir}: a PRM directory needs its tokenizer files (tokenizer.json, ...)")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise JaxsqlError(f"{model_dir}: cannot load the tokenizer: {e}") from None
    if len(tok) > vocab_size:
        raise JaxsqlError(f"{model_dir}: tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab_size}")
    return tok


def read_sidecar(model_dir: str | Path) -> tuple[PrmConfig, dict[str, Any]] | None:
    """(PrmConfig, recorded ids) from ``jaxsql_prm.json``, or None when the file is absent."""
    path = Path(model_dir) / SIDECAR
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        ids = d.pop("ids", {})
        d.pop("format", None)
        return PrmConfig(**d), ids
    except (json.JSONDecodeError, TypeError) as e:
        raise JaxsqlError(f"{path}: not a valid PRM description ({e})") from None


def load_prm(model_dir: str | Path, *, head: str | None = None, mesh=None, rules=None,
             param_dtype: str | None = None, compute_dtype: str | None = None) -> Prm:
    """Load a PRM directory (see the module docstring), local or in a bucket (``gs://``: copied
    to local disk first, `jaxsql.paths.local_dir`).

    `head`, when given, is the head the caller expects; a directory holding
    the other one is a JaxsqlError, as is a ``jaxsql_prm.json`` whose head
    or candidate ids disagree with the checkpoint and its tokenizer.
    """
    from jaxsql.paths import local_dir
    from models.hf_io import load_hf_checkpoint

    where = str(model_dir)
    model_dir = local_dir(model_dir, "PRM directory")  # gs://: staged to local disk once
    found = checkpoint_head(model_dir)
    side = read_sidecar(model_dir)
    prm_cfg, recorded = side if side is not None else (PrmConfig(head=found), {})
    if prm_cfg.head != found:
        raise JaxsqlError(f"{model_dir}: {SIDECAR} says head {prm_cfg.head!r} but config.json holds a "
                          f"{'token-classification' if found == 'value' else 'causal-LM'} ({found!r}) head")
    if head is not None and head != found:
        raise JaxsqlError(f"{model_dir}: the PRM has a {found!r} head, a {head!r} head was asked for")
    cfg, params = load_hf_checkpoint(model_dir, mesh=mesh, rules=rules, param_dtype=param_dtype,
                                     compute_dtype=compute_dtype, head=found)
    tok = _load_tokenizer(model_dir, cfg.vocab_size)
    cands = candidate_ids(prm_cfg, tok)
    if recorded and tuple(recorded.get("candidates", cands)) != cands:
        raise JaxsqlError(f"{model_dir}: {SIDECAR} records candidate ids {recorded['candidates']} but the "
                          f"tokenizer gives {list(cands)}: the tokenizer does not belong to this PRM")
    return Prm(prm_cfg, cfg, params, cands, tok, where)


def save_prm(out_dir: str | Path, prm_cfg: PrmConfig, cfg: ModelConfig, params: Params, *,
             tokenizer_dir: str | Path, overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a PRM directory: the HF checkpoint of its head, the tokenizer and `SIDECAR`."""
    from transformers import AutoTokenizer

    from models.hf_io import save_hf_checkpoint

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    cands = candidate_ids(prm_cfg, tok)
    out = save_hf_checkpoint(out_dir, cfg, params, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                             max_shard_bytes=max_shard_bytes, head=prm_cfg.head)
    side = {"format": "jaxsql-prm-1", **dataclasses.asdict(prm_cfg), "ids": {"candidates": list(cands)}}
    (out / SIDECAR).write_text(json.dumps(side, indent=1, ensure_ascii=False) + "\n")
    return out


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token to the same id (and have the same specials)."""
    return (len(a) == len(b) and a.get_vocab() == b.get_vocab()
            and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id)


def check_matches_policy(prm: Prm, policy_tokenizer: Any, policy_dir: str | Path = "policy") -> None:
    """JaxsqlError unless the PRM reads the policy's tokens (same tokenizer): PRM scores are
    computed on the policy's token rows."""
    if not same_tokenizer(prm.tokenizer, policy_tokenizer):
        raise JaxsqlError(f"the PRM {prm.path} and the policy {policy_dir} have different tokenizers; "
                          f"a PRM scores the policy's tokens, so build it from the policy (jaxsql prm init)")
