"""Run-config fields of mixed precision and of the mesh: load-time validation naming the field,
recipes for real models, start-up checks of the mesh against the devices."""

from pathlib import Path

import jax
import pytest

from jaxsql.errors import ConfigError, JaxsqlError
from rl import setup
from rl.config import MeshSection, load_train_config

RECIPES = Path(__file__).resolve().parents[2] / "rl" / "recipes"
BASE = ["run_dir=/tmp/x", "model.preset=tiny"]


@pytest.mark.parametrize("name", ["grpo_weak_supervision", "think2sql", "reward_sql_base"])
def test_real_model_recipes_keep_float32_master_weights(name):
    cfg = load_train_config(RECIPES / f"{name}.yaml")
    assert (cfg.model.param_dtype, cfg.model.compute_dtype) == ("float32", "bfloat16")
    assert cfg.model.remat == "full"  # the plans in docs/scale.md assume it


def test_remat_key_is_validated_and_reaches_only_the_update(tiny_env, tmp_path):
    assert load_train_config(None, BASE).model.remat == "none"
    with pytest.raises(ConfigError, match=r"ModelSection\.remat: must be one of \['none', 'full', 'dots', "
                                          r"'dots_no_batch'\], got 'some'"):
        load_train_config(None, BASE + ["model.remat=some"])
    from rl.sft import SftTrainer
    from rl.config import load_sft_config

    cfg = load_sft_config(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_env['model']}",
                                 f"data.path={tiny_env['synthetic']}", "model.remat=dots", "mesh.data=1",
                                 "progress=false", "tensorboard=false", "checkpoint.export_hf=false"])
    with SftTrainer(cfg) as t:
        assert t.update_step.model_cfg.remat == "dots"  # the update differentiates
        assert t.model_cfg.remat == "none"  # sampling and the reference model do not


def test_old_dtype_key_says_what_to_write():
    with pytest.raises(ConfigError, match=r"TrainConfig\.model\.dtype: no longer exists; write "
                                          r"model\.param_dtype .* and model\.compute_dtype"):
        load_train_config(None, BASE + ["model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"ModelSection\.compute_dtype: must be float32 or bfloat16"):
        load_train_config(None, BASE + ["model.compute_dtype=float16"])


def test_mesh_rules_from_the_config():
    cfg = load_train_config(None, BASE + ["mesh.rules=fsdp", "mesh.rule_overrides.vocab=fsdp"])
    rules = cfg.mesh.sharding_rules()
    assert rules.vocab == "fsdp" and rules.embed == "fsdp" and rules.heads is None
    assert MeshSection().sharding_rules() == MeshSection(rules="fsdp_tensor").sharding_rules()
    assert load_train_config(None, BASE + ["mesh.rule_overrides.vocab=null"]).mesh.sharding_rules().vocab is None
    for override, match in [("mesh.rules=zero3", r"MeshSection\.rules: unknown 'zero3'"),
                            ("mesh.rule_overrides.vocabulary=null", r"MeshSection\.rule_overrides: unknown logical"),
                            ("mesh.rule_overrides.vocab=model", r"MeshSection\.rule_overrides: .*unknown mesh axis")]:
        with pytest.raises(ConfigError, match=match):
            load_train_config(None, BASE + [override])


def test_mesh_that_does_not_fit_fails_at_start_with_both_numbers():
    n = len(jax.devices())
    with pytest.raises(JaxsqlError, match=f"= {2 * n} devices, but {n} devices are available"):
        setup.build_mesh(MeshSection(data=2 * n))
    with pytest.raises(ConfigError, match=f"{n} devices are not divisible by 3"):
        setup.build_mesh(MeshSection(data=-1, tensor=3))
    with pytest.raises(JaxsqlError, match=r"MeshSection\.rules: mesh axis tensor=2 is used by no sharding rule"):
        setup.build_mesh(MeshSection(data=-1, tensor=2, rules="fsdp"))
    mesh = setup.build_mesh(MeshSection(data=-1, fsdp=2, rules="fsdp"))
    assert dict(mesh.shape) == {"data": n // 2, "fsdp": 2, "tensor": 1}


def test_policy_dtypes_and_the_global_batch_check(tmp_path):
    from rl.config import DataSection, ModelSection

    mesh = setup.build_mesh(MeshSection(data=1))
    cfg, params = setup.load_policy(ModelSection(preset="tiny", compute_dtype="bfloat16"), mesh)
    assert (cfg.param_dtype, cfg.compute_dtype) == ("float32", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jax.numpy.dtype("float32")}
    examples = [object()] * 12
    with pytest.raises(JaxsqlError, match=r"DataSection\.batch_size: batch_size 5 .* does not split over 3 "
                                          r"processes"):
        setup.data_stream(examples, DataSection(), 5, process_index=0, process_count=3)
