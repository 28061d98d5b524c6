"""Run configs: recipes load and validate; bad values name their field."""

from pathlib import Path

import pytest

from jaxsql.errors import ConfigError
from rl.config import load_prm_train_config, load_sft_config, load_train_config
from rl.trainer import reward_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "rl" / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"grpo_weak_supervision", "think2sql", "reward_sql_base", "synthetic_demo", "reward_sql_prm"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads(path):
    if "sft" in path.stem:
        load_sft_config(path)
        return
    if "prm" in path.stem:
        cfg = load_prm_train_config(path)
        assert cfg.prm.head == "lm" and cfg.prm.label_kind in ("hard", "soft")
        return
    cfg = load_train_config(path)
    reward_config(cfg)
    if path.stem == "think2sql":
        assert dict(cfg.reward["weights"]) == {"gated": 0.95, "format": 0.05}
        assert cfg.algo.loss_agg == "token_mean" and cfg.algo.eps_high == 0.28 and cfg.algo.beta == 0.0


@pytest.mark.parametrize("override,field", [
    ("algo.advantage=std", "AlgoSection.advantage"),
    ("algo.eps_low=1.5", "AlgoSection.eps_low"),
    ("sampling.num_generations=1", "SamplingSection.num_generations"),
    ("optim.schedule=step", "OptimSection.schedule"),
    ("optim.micro_batches=3", "OptimSection.micro_batches"),
    ("data.source=nope", "DataSection.source"),
    ("algo.tis_cap=0.5", "AlgoSection.tis_cap"),
    ("sql.timeout_s=.inf", "SqlSection.timeout_s"),
    ("sql.max_memory=1000", "SqlSection.max_memory"),
    ("sql.workers=0", "SqlSection.workers"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_train_config(None, ["run_dir=/tmp/x", "model.preset=tiny", override])


def test_bad_reward_names_the_field():
    cfg = load_train_config(None, ["run_dir=/tmp/x", "model.preset=tiny", "reward.weights.nope=1"])
    with pytest.raises(ConfigError, match="weights.nope"):
        reward_config(cfg)
