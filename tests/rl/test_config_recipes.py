"""Run configs: recipes load and validate; bad values name their field."""

from pathlib import Path

import pytest

from jaxsql.errors import ConfigError
from rl.config import load_prm_train_config, load_sft_config, load_train_config
from rl.trainer import reward_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "rl" / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"grpo_weak_supervision", "think2sql", "reward_sql_base", "synthetic_demo", "reward_sql_prm",
            "reward_sql_grpo", "reward_sql_grpo_prm"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads(path):
    if "sft" in path.stem:
        load_sft_config(path)
        return
    if "prm" in path.stem and "grpo" not in path.stem:
        cfg = load_prm_train_config(path)
        assert cfg.prm.head == "lm" and cfg.prm.label_kind in ("hard", "soft")
        return
    cfg = load_train_config(path)
    reward_config(cfg)
    if path.stem.startswith("reward_sql_grpo"):  # Reward-SQL's released GRPO settings (grpo_trainer.yaml)
        assert (cfg.sampling.num_generations, cfg.sampling.temperature, cfg.algo.beta, cfg.algo.eps_low,
                cfg.algo.eps_high, cfg.optim.learning_rate, cfg.optim.schedule, cfg.optim.warmup_steps) == (
                    8, 1.0, 0.001, 0.2, 0.2, 1e-6, "constant", 0)
        assert cfg.data.prompt_format == "cocte"
        process = reward_config(cfg).process
        assert (process is None) == (path.stem == "reward_sql_grpo")
        if process is not None:
            assert process.form == "step" and process.advantage == "rewardsql"
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
