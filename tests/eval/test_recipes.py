"""The Think2SQL recipes reproduce the reward mixes of its released training scripts."""

from pathlib import Path

import pytest

from rl.config import load_train_config
from rl.trainer import reward_config

RECIPES = Path(__file__).resolve().parents[2] / "rl" / "recipes"


@pytest.mark.parametrize("name,weights,advantage", [
    ("think2sql", {"gated": 0.95, "format": 0.05}, "batch"),  # the paper's description
    ("think2sql_released", {"qatch": 0.95, "format": 0.05}, "batch"),  # scripts/grpo.sh
    ("think2sql_released_gated", {"gated": 1.0}, "grpo"),  # scripts/slurm/train_grpo_multi_node.sh
])
def test_think2sql_reward_mixes(name, weights, advantage):
    cfg = load_train_config(RECIPES / f"{name}.yaml")
    rc = reward_config(cfg)
    assert dict(rc.weights) == weights and cfg.algo.advantage == advantage
    assert cfg.algo.loss_agg == "token_mean" and cfg.algo.eps_high == 0.28 and cfg.algo.beta == 0.0
    if name != "think2sql":
        assert cfg.sampling.num_generations == 16 and cfg.optim.max_grad_norm == 0.2
