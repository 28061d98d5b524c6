"""Configuration of GRPO, SFT and PRM runs: frozen dataclasses loaded from YAML.

Load with ``load_train_config(path, overrides)`` / ``load_sft_config`` /
``load_prm_train_config``; every
value is validated at construction and a bad one fails naming
``Section.field``. Sections:

- `ModelSection`: which weights (an HF directory or a ``models.config`` preset) and tokenizer.
- `DataSection`: which examples, prompt format, batch size, shuffle seed.
- `SamplingSection`: G samples per prompt, lengths, temperature / top-p / top-k.
- `AlgoSection`: advantage, loss aggregation, clip, KL, inner iterations, TIS, dynamic sampling.
- `OptimSection`: AdamW, warmup + schedule, gradient clipping, micro-batches.
- `CheckpointSection`: where and how often, how many to keep, HF export.
- `MeshSection`: mesh shape (data, fsdp, tensor) and sharding rules.
- ``reward``: a free mapping handed to ``jaxsql.rewards.RewardConfig``.
- `PrmSection`, `PrmDataSection`: the PRM's head and labels, its label files and held-out split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from jaxsql.config import load_config, require, to_dict
from jaxsql.errors import JaxsqlError
from jaxsql.sql import sandbox
from jaxsql.tools import ToolConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Weights and tokenizer.

    Attributes:
      path: HF checkpoint directory (config.json + safetensors + tokenizer), or "".
      preset: a ``models.config`` preset name used with random weights when `path` is "".
      tokenizer: tokenizer directory/file; "" means the one in `path`.
      param_dtype: master weights and optimizer state (float32; bfloat16 only to save
        memory, at the cost of small updates rounding away).
      compute_dtype: matmul inputs of the forward and backward passes (float32 or
        bfloat16); norms, softmax and log-probs stay float32.
      init_seed: seed of random initialisation (only with `preset`).
      remat: rematerialisation of the policy's layers in the update's backward pass (none |
        full | dots | dots_no_batch, `models.config.REMAT_POLICIES`): ``full`` keeps only each
        layer's input and recomputes the rest (about a third more update FLOPs, the
        activations of one layer instead of all); ``dots`` / ``dots_no_batch`` keep the matmul
        outputs (all / those without batch dimensions). Sampling and the reference model
        never differentiate and run without it.
    """

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "dtype": "write model.param_dtype (master weights and optimizer state; float32 is "
                 "right for training) and model.compute_dtype (matmul inputs, e.g. bfloat16)",
    }

    path: str = ""
    preset: str = ""
    tokenizer: str = ""
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    init_seed: int = 0
    remat: str = "none"

    def __post_init__(self) -> None:
        from models.config import REMAT_POLICIES

        require(bool(self.path) or bool(self.preset), "ModelSection", "path",
                "set model.path (HF directory) or model.preset")
        require(self.remat in REMAT_POLICIES, "ModelSection", "remat",
                f"must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        for f in ("param_dtype", "compute_dtype"):
            require(getattr(self, f) in ("float32", "bfloat16"), "ModelSection", f,
                    f"must be float32 or bfloat16, got {getattr(self, f)!r}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Examples and prompts.

    Attributes:
      source: reader name ("synthetic", "jsonl", "spider", ...).
      path: dataset location ("" for the embedded synthetic benchmark).
      split: split name.
      prompt_format: "plain", "think", "cocte" or "tool" (multi-turn SQL tool use,
        docs/multiturn.md; GRPO takes it exactly with ``rollout.mode: multi_turn``).
      batch_size: prompts per step (each sampled G times in GRPO).
      shuffle_seed: seed of the deterministic shuffle.
      max_prompt_len: prompts longer than this (tokens) are left-truncated.
      max_target_len: SFT target length cap (tokens).
    """

    source: str = "synthetic"
    path: str = ""
    split: str = "train"
    prompt_format: str = "plain"
    batch_size: int = 4
    shuffle_seed: int = 0
    max_prompt_len: int = 512
    max_target_len: int = 256

    def __post_init__(self) -> None:
        from data.readers import READERS

        sources = sorted(["synthetic", *READERS])
        require(self.source in sources, "DataSection", "source",
                f"unknown {self.source!r}; known: {sources}")
        require(self.batch_size >= 1, "DataSection", "batch_size", "must be >= 1")
        require(self.prompt_format in ("plain", "think", "cocte", "tool"), "DataSection", "prompt_format",
                f"must be plain, think, cocte or tool, got {self.prompt_format!r}")
        require(self.max_prompt_len >= 8, "DataSection", "max_prompt_len", "must be >= 8")
        require(self.max_target_len >= 1, "DataSection", "max_target_len", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    """Rollout sampling.

    Attributes:
      num_generations: G completions per prompt.
      max_new_tokens: completion length cap (also Dr. GRPO's L_max).
      temperature, top_p, top_k: sampling (top_k 0 = off).
      ignore_stop: never stop early (benchmarks).
    """

    num_generations: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    ignore_stop: bool = False

    def __post_init__(self) -> None:
        require(self.num_generations >= 2, "SamplingSection", "num_generations",
                "GRPO needs at least 2 samples per prompt")
        require(self.max_new_tokens >= 1, "SamplingSection", "max_new_tokens", "must be >= 1")
        require(self.temperature > 0, "SamplingSection", "temperature", "must be > 0")
        require(0 < self.top_p <= 1, "SamplingSection", "top_p", "must be in (0, 1]")
        require(self.top_k >= 0, "SamplingSection", "top_k", "must be >= 0")


#: Rollout modes of GRPO: one completion per sample, or episodes with SQL tool calls.
ROLLOUT_MODES = ("single_turn", "multi_turn")


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    """How GRPO's samples are produced.

    Attributes:
      mode: ``single_turn`` (each sample one uninterrupted completion) or ``multi_turn``
        (the model may run SQL through ``<sql>`` tool calls while it reasons; the observations
        are appended to its row as context, `rl.multiturn`, docs/multiturn.md). ``multi_turn``
        needs ``data.prompt_format: tool``; the tool's budgets are the ``tool`` section
        (`jaxsql.tools.ToolConfig`).
    """

    mode: str = "single_turn"

    def __post_init__(self) -> None:
        require(self.mode in ROLLOUT_MODES, "RolloutSection", "mode",
                f"must be one of {list(ROLLOUT_MODES)}, got {self.mode!r}")

    @property
    def multi_turn(self) -> bool:
        return self.mode == "multi_turn"


@dataclasses.dataclass(frozen=True)
class AlgoSection:
    """The policy-gradient algorithm (see rl/algo.py for the formulas).

    Attributes:
      advantage: grpo | batch | drgrpo | none.
      loss_agg: token_mean | seq_mean_token_mean | seq_mean_token_sum_norm.
      eps_low, eps_high: PPO clip range [1-eps_low, 1+eps_high].
      beta: k3 KL weight; 0 skips the reference model entirely.
      num_iterations: mu, optimizer steps per rollout batch (old log-probs cached).
      tis_cap: truncated importance-sampling cap C, or null for none.
      dynamic_sampling: DAPO: drop groups whose rewards are all equal and refill.
      max_refill_batches: how many extra batches dynamic sampling may draw per step.
      adv_eps: epsilon in the std normalisation.
    """

    advantage: str = "grpo"
    loss_agg: str = "seq_mean_token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04
    num_iterations: int = 1
    tis_cap: float | None = None
    dynamic_sampling: bool = False
    max_refill_batches: int = 4
    adv_eps: float = 1e-6

    def __post_init__(self) -> None:
        from rl import algo

        names = algo.known_names()
        require(self.advantage in names["advantage"], "AlgoSection", "advantage",
                f"unknown {self.advantage!r}; known: {names['advantage']}")
        require(self.loss_agg in names["loss_agg"], "AlgoSection", "loss_agg",
                f"unknown {self.loss_agg!r}; known: {names['loss_agg']}")
        require(0 <= self.eps_low < 1, "AlgoSection", "eps_low", "must be in [0, 1)")
        require(self.eps_high >= 0, "AlgoSection", "eps_high", "must be >= 0")
        require(self.beta >= 0, "AlgoSection", "beta", "must be >= 0")
        require(self.num_iterations >= 1, "AlgoSection", "num_iterations", "must be >= 1")
        require(self.tis_cap is None or self.tis_cap >= 1.0, "AlgoSection", "tis_cap",
                "must be null or >= 1")
        require(self.max_refill_batches >= 0, "AlgoSection", "max_refill_batches", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then a decay schedule, and global-norm clipping.

    Attributes:
      learning_rate: peak learning rate.
      warmup_steps: linear warmup from 0.
      schedule: cosine | linear | constant (decay after warmup to `final_lr_ratio` x peak).
      final_lr_ratio: end value as a fraction of the peak.
      weight_decay, b1, b2, eps: AdamW.
      max_grad_norm: global-norm clip (0 = off).
      micro_batches: gradient-accumulation micro-batches per optimizer step.
    """

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batches: int = 1

    def __post_init__(self) -> None:
        require(self.learning_rate > 0, "OptimSection", "learning_rate", "must be > 0")
        require(self.warmup_steps >= 0, "OptimSection", "warmup_steps", "must be >= 0")
        require(self.schedule in ("cosine", "linear", "constant"), "OptimSection", "schedule",
                f"must be cosine, linear or constant, got {self.schedule!r}")
        require(0 <= self.final_lr_ratio <= 1, "OptimSection", "final_lr_ratio", "must be in [0, 1]")
        require(self.max_grad_norm >= 0, "OptimSection", "max_grad_norm", "must be >= 0")
        require(self.micro_batches >= 1, "OptimSection", "micro_batches", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Checkpointing and export.

    Attributes:
      every_steps: save every N optimizer steps (0 = only at the end / on SIGTERM).
      max_to_keep: keep the N most recent.
      async_save: write in the background.
      export_hf: write an HF checkpoint to ``<run_dir>/hf`` at the end.
      fallback_to_previous: on resume, if the latest checkpoint cannot be restored (truncated,
        damaged), move it aside and resume from the one before (``--resume-from-previous``).
    """

    every_steps: int = 50
    max_to_keep: int = 3
    async_save: bool = True
    export_hf: bool = True
    fallback_to_previous: bool = False

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "CheckpointSection", "every_steps", "must be >= 0")
        require(self.max_to_keep >= 1, "CheckpointSection", "max_to_keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh and how arrays are split over it.

    Attributes:
      data, fsdp, tensor: mesh shape; -1 on one axis takes the remaining devices.
      rules: sharding preset of ``jaxsql.sharding.RULE_PRESETS``: dp (parameters
        replicated), fsdp (parameters split along embed over fsdp) or fsdp_tensor
        (fsdp plus heads / MLP / vocabulary over tensor).
      rule_overrides: logical axis -> mesh axis (a name, a list of names, or null =
        replicated) on top of the preset, e.g. ``{vocab: null}``.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "fsdp_tensor"
    rule_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        dims = (self.data, self.fsdp, self.tensor)
        require(all(d == -1 or d >= 1 for d in dims), "MeshSection", "data",
                "each axis must be >= 1 or -1")
        require(sum(d == -1 for d in dims) <= 1, "MeshSection", "data", "at most one axis may be -1")
        from jaxsql.sharding import RULE_PRESETS

        require(self.rules in RULE_PRESETS, "MeshSection", "rules",
                f"unknown {self.rules!r}; presets are {sorted(RULE_PRESETS)}")
        try:
            self.sharding_rules()
        except JaxsqlError as e:
            require(False, "MeshSection", "rule_overrides", str(e))

    def sharding_rules(self):
        """The `jaxsql.sharding.ShardingRules` of `rules` with `rule_overrides` applied."""
        from jaxsql.sharding import sharding_rules

        return sharding_rules(self.rules, dict(self.rule_overrides))

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) for `num_devices` devices."""
        dims = [self.data, self.fsdp, self.tensor]
        if -1 in dims:
            known = 1
            for d in dims:
                if d != -1:
                    known *= d
            require(num_devices % known == 0, "MeshSection", "data",
                    f"{num_devices} devices are not divisible by {known}")
            dims[dims.index(-1)] = num_devices // known
        return tuple(dims)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class SqlSection:
    """The SQL pool that executes the completions for rewards (`jaxsql.sql.SqlPool`).

    Attributes:
      workers: worker processes (null: the CPU cores this process may use).
      timeout_s: wall-clock deadline of one query, seconds, covering its preparation.
      max_vm_steps: SQLite VM-instruction budget of one query (null: none); a query that
        uses it up is a ``timeout`` on any machine at any load.
      max_rows / max_bytes: caps on one result (``too_large`` beyond).
      max_memory: private memory of each worker process, bytes.
      cache_size: query-cache entries (0 turns the cache off).
    """

    workers: int | None = None
    timeout_s: float = sandbox.DEFAULT_TIMEOUT_S
    max_vm_steps: int | None = None
    max_rows: int = sandbox.DEFAULT_MAX_ROWS
    max_bytes: int = sandbox.DEFAULT_MAX_BYTES
    max_memory: int = sandbox.DEFAULT_MAX_MEMORY
    cache_size: int = 100_000

    def __post_init__(self) -> None:
        import math

        require(self.workers is None or self.workers >= 1, "SqlSection", "workers", "must be >= 1 or null")
        require(0 < self.timeout_s < math.inf, "SqlSection", "timeout_s", "must be a positive finite number")
        require(self.max_vm_steps is None or self.max_vm_steps >= 1, "SqlSection", "max_vm_steps",
                "must be >= 1 or null")
        require(self.max_rows >= 1, "SqlSection", "max_rows", "must be >= 1")
        require(self.max_bytes >= 1, "SqlSection", "max_bytes", "must be >= 1")
        require(self.max_memory >= 128 << 20, "SqlSection", "max_memory", "must be at least 128 MiB (134217728)")
        require(self.cache_size >= 0, "SqlSection", "cache_size", "must be >= 0")

    def open_pool(self):
        """A `jaxsql.sql.SqlPool` with these limits (the caller closes it)."""
        from jaxsql.sql import SqlPool

        return SqlPool(self.workers, timeout_s=self.timeout_s, max_vm_steps=self.max_vm_steps,
                       max_rows=self.max_rows, max_bytes=self.max_bytes, max_memory=self.max_memory,
                       cache_size=self.cache_size)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A GRPO run (`jaxsql train`)."""

    run_dir: str
    model: ModelSection
    data: DataSection = DataSection()
    sampling: SamplingSection = SamplingSection()
    algo: AlgoSection = AlgoSection()
    optim: OptimSection = OptimSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    reward: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sql: SqlSection = SqlSection()
    rollout: RolloutSection = RolloutSection()
    tool: ToolConfig = ToolConfig()
    steps: int = 100
    seed: int = 0
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "TrainConfig", "run_dir", "must be set")
        require(self.steps >= 1, "TrainConfig", "steps", "must be >= 1")
        require(self.log_every >= 1, "TrainConfig", "log_every", "must be >= 1")
        self._check_rollout_mode()
        n = self.data.batch_size * self.sampling.num_generations
        require(n % self.optim.micro_batches == 0, "OptimSection", "micro_batches",
                f"must divide batch_size x num_generations = {n}")

    def _check_rollout_mode(self) -> None:
        """The tool prompt format, the multi-turn rollout and the episode rewards go together."""
        multi = self.rollout.multi_turn
        require(multi or self.data.prompt_format != "tool", "DataSection", "prompt_format",
                "tool (multi-turn) needs rollout.mode: multi_turn in GRPO")
        require(not multi or self.data.prompt_format == "tool", "RolloutSection", "mode",
                f"multi_turn needs data.prompt_format: tool, got {self.data.prompt_format!r}")
        from jaxsql.rewards import EPISODE_REWARDS

        weights = self.reward.get("weights", {}) if isinstance(self.reward, Mapping) else {}
        for name in EPISODE_REWARDS:
            require(multi or name not in weights, "RewardConfig", f"weights.{name}",
                    "reads the tool episode: it needs rollout.mode: multi_turn")
        if not multi:
            return
        require("process" not in weights, "RewardConfig", "weights.process",
                "the process reward is not supported with rollout.mode: multi_turn")
        stated = ToolConfig()  # what the tool prompt tells the model (data.prompts)
        for f in ("call_tag", "answer_tag", "max_turns", "max_rows"):
            require(getattr(self.tool, f) == getattr(stated, f), "ToolConfig", f,
                    f"the tool prompt states {getattr(stated, f)!r}; a different value would contradict it")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """A supervised cold start (`jaxsql sft`): cross-entropy on completion tokens."""

    run_dir: str
    model: ModelSection
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection(learning_rate=1e-4)
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    steps: int = 100
    seed: int = 0
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "SftConfig", "run_dir", "must be set")
        require(self.steps >= 1, "SftConfig", "steps", "must be >= 1")
        require(self.data.batch_size % self.optim.micro_batches == 0, "OptimSection", "micro_batches",
                f"must divide data.batch_size = {self.data.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclasses.dataclass(frozen=True)
class PrmSection:
    """The process reward model being trained (`models.prm`, docs/rewardsql.md).

    Attributes:
      head: ``lm`` (the released form: P(good) over two candidate tokens at the step tag) or
        ``value`` (a scalar head, exported as ``*ForTokenClassification``). ``model.path`` is a
        PRM directory with this head (``jaxsql prm init``) or a policy, which becomes an ``lm``
        PRM as it is and a ``value`` PRM by `models.prm.value_head_from_lm`.
      label_kind: ``soft`` (the fraction of continuations that reach a correct result) or
        ``hard`` (1 when one does) as the BCE target.
      max_len: longest PRM input in tokens (prompt + steps, results and tags); steps past it
        are left out of the row.
    """

    head: str = "lm"
    label_kind: str = "soft"
    max_len: int = 1024

    def __post_init__(self) -> None:
        from models.prm import HEADS
        from rl.prm import LABEL_KINDS

        require(self.head in HEADS, "PrmSection", "head", f"must be one of {list(HEADS)}, got {self.head!r}")
        require(self.label_kind in LABEL_KINDS, "PrmSection", "label_kind",
                f"must be one of {list(LABEL_KINDS)}, got {self.label_kind!r}")
        require(self.max_len >= 16, "PrmSection", "max_len", "must be >= 16")


@dataclasses.dataclass(frozen=True)
class PrmDataSection:
    """Label files (``jaxsql prm label``) and the held-out split.

    Attributes:
      labels: the training label file (JSONL).
      eval_labels: a held-out label file; "" takes `heldout_fraction` of the questions in
        `labels` instead (every trajectory of a question on the same side).
      heldout_fraction: share of `labels`' questions held out when `eval_labels` is "" (0: no
        held-out evaluation).
      batch_size: trajectories per step.
      eval_batch_size: trajectories per held-out forward pass.
      shuffle_seed: seed of the training order and of the held-out draw.
      max_prompt_len: prompt tokens kept (the last ones), as `jaxsql prm label --max-prompt-len`.
    """

    labels: str = ""
    eval_labels: str = ""
    heldout_fraction: float = 0.1
    batch_size: int = 8
    eval_batch_size: int = 16
    shuffle_seed: int = 0
    max_prompt_len: int = 512

    def __post_init__(self) -> None:
        require(bool(self.labels), "PrmDataSection", "labels", "set data.labels (a `jaxsql prm label` file)")
        require(0.0 <= self.heldout_fraction < 1.0, "PrmDataSection", "heldout_fraction", "must be in [0, 1)")
        require(self.batch_size >= 1, "PrmDataSection", "batch_size", "must be >= 1")
        require(self.eval_batch_size >= 1, "PrmDataSection", "eval_batch_size", "must be >= 1")
        require(self.max_prompt_len >= 8, "PrmDataSection", "max_prompt_len", "must be >= 8")

    @property
    def prompt_format(self) -> str:
        """Label files hold CoCTE trajectories of `cocte` prompts (``jaxsql prm label``)."""
        return "cocte"


@dataclasses.dataclass(frozen=True)
class PrmTrainConfig:
    """PRM training (`jaxsql prm train`): BCE of step scores against step labels, held-out
    BCE and step AUC every `eval_every` steps (and before the first and after the last)."""

    run_dir: str
    model: ModelSection
    data: PrmDataSection
    prm: PrmSection = PrmSection()
    optim: OptimSection = OptimSection(learning_rate=1e-5)
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    steps: int = 100
    eval_every: int = 0
    seed: int = 0
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "PrmTrainConfig", "run_dir", "must be set")
        require(bool(self.model.path), "ModelSection", "path",
                "a PRM trains from a directory (a policy or `jaxsql prm init` output), not a preset")
        require(self.steps >= 1, "PrmTrainConfig", "steps", "must be >= 1")
        require(self.eval_every >= 0, "PrmTrainConfig", "eval_every", "must be >= 0 (0: first and last only)")
        require(self.log_every >= 1, "PrmTrainConfig", "log_every", "must be >= 1")
        require(self.data.batch_size % self.optim.micro_batches == 0, "OptimSection", "micro_batches",
                f"must divide data.batch_size = {self.data.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_prm_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PrmTrainConfig:
    """`PrmTrainConfig` from YAML plus ``a.b=value`` overrides."""
    return load_config(PrmTrainConfig, path, overrides)


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """`TrainConfig` from YAML plus ``a.b=value`` overrides."""
    return load_config(TrainConfig, path, overrides)


def load_sft_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SftConfig:
    """`SftConfig` from YAML plus ``a.b=value`` overrides."""
    return load_config(SftConfig, path, overrides)
