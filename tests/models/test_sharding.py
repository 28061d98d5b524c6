"""Mesh, logical sharding rules, and the sharded forward on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsql.errors import JaxsqlError
from jaxsql.sharding import MESH_AXES, ShardingRules, logical_to_sharding, make_mesh
from models import hf_io
from models.config import preset
from models.model import forward, init_params, param_axes, positions_from_mask, token_logprobs

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")


def test_make_mesh_checks_device_count():
    mesh = make_mesh(2, 2, 2)
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(JaxsqlError, match="= 4 devices, but 8"):
        make_mesh(2, 2, 1)


def test_rules_map_logical_axes():
    mesh = make_mesh(2, 2, 2)
    s = logical_to_sharding(("batch", "seq", None), mesh)
    assert s.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    s = logical_to_sharding(("layers", "embed", "heads", "head_dim"), mesh)
    assert s.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    with pytest.raises(JaxsqlError, match="unknown mesh axis"):
        ShardingRules(embed="model")


def test_rules_that_cannot_be_honoured_are_errors_not_replication():
    mesh = make_mesh(2, 2, 2)
    # fsdp is asked for by batch and by embed: once the first silently won
    with pytest.raises(JaxsqlError, match=r"x: mesh axis 'fsdp' is asked for by dimension 0 \('batch'\) "
                                          r"and dimension 2 \('embed'\)"):
        logical_to_sharding(("batch", "seq", "embed"), mesh, name="x")
    # 3 heads do not split over 2 devices: once replicated, now an error with the sizes
    with pytest.raises(JaxsqlError, match=r"wk: dimension 0 \('kv_heads'\) of size 3 does not divide over "
                                          r"mesh axes tensor=2 = 2"):
        logical_to_sharding(("kv_heads",), mesh, shape=(3,), name="wk")
    # rows of activations are the listed exception (few prompts on many devices) ...
    s = logical_to_sharding(("batch", None), mesh, shape=(2, 5))
    assert s.spec == jax.sharding.PartitionSpec(None, None)
    # ... and taking it off the list makes them an error too
    strict = ShardingRules(replicate_indivisible=())
    with pytest.raises(JaxsqlError, match="of size 2 does not divide over mesh axes data=2 x fsdp=2 = 4"):
        logical_to_sharding(("batch", None), mesh, strict, shape=(2, 5))
    # a parameter names its path
    cfg = preset("tiny", num_layers=1, num_kv_heads=1, num_heads=4, qkv_bias=False)
    from models.model import param_shardings

    with pytest.raises(JaxsqlError, match=r"parameter layers/wk: dimension 2 \('kv_heads'\) of size 1"):
        param_shardings(cfg, mesh)


def test_rule_presets_and_overrides():
    from jaxsql.sharding import RULE_PRESETS, check_rules_fit_mesh, sharding_rules

    assert set(RULE_PRESETS) == {"dp", "fsdp", "fsdp_tensor"}
    assert sharding_rules() == ShardingRules()
    cfg = preset("tiny", num_layers=1)
    from models.model import param_shardings

    mesh = make_mesh(2, 4, 1)
    dp = param_shardings(cfg, mesh, sharding_rules("dp"))
    assert all(s.spec == jax.sharding.PartitionSpec(*([None] * len(s.spec))) for s in jax.tree.leaves(dp))
    fsdp = param_shardings(cfg, mesh, sharding_rules("fsdp"))
    assert fsdp["embed"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert fsdp["layers"]["wq"].spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    mixed = sharding_rules("fsdp_tensor", {"vocab": None, "batch": ["data"]})
    assert mixed.vocab is None and mixed.batch == ("data",) and mixed.heads == "tensor"
    with pytest.raises(JaxsqlError, match="unknown sharding rules 'zero3'"):
        sharding_rules("zero3")
    with pytest.raises(JaxsqlError, match=r"unknown logical axes \['vocabulary'\]"):
        sharding_rules("fsdp", {"vocabulary": None})
    # a mesh axis that no rule splits over would only repeat the work
    with pytest.raises(JaxsqlError, match="mesh axis tensor=2 is used by no sharding rule"):
        check_rules_fit_mesh(sharding_rules("fsdp"), make_mesh(2, 2, 2))
    check_rules_fit_mesh(sharding_rules("fsdp_tensor"), make_mesh(2, 2, 2))


def test_param_axes_cover_every_leaf():
    cfg = preset("tiny", architecture="Qwen3ForCausalLM", tie_word_embeddings=False)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    axes = param_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_axes)
    for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
        assert len(p.shape) == len(a)


def test_sharded_forward_equals_single_device(hf_dirs):
    mesh = make_mesh(2, 2, 2)
    cfg, params = hf_io.load_hf_checkpoint(hf_dirs["qwen2"])
    cfg_s, params_s = hf_io.load_hf_checkpoint(hf_dirs["qwen2"], mesh=mesh)
    wq = params_s["layers"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (2, 32, 2, 16)

    rng = np.random.RandomState(0)
    tokens = rng.randint(3, cfg.vocab_size, (4, 10))
    mask = np.ones((4, 10), bool)
    mask[1, :3] = False
    batch = logical_to_sharding(("batch", "seq"), mesh)
    tok_s, mask_s = jax.device_put(tokens, batch), jax.device_put(mask, batch)

    @jax.jit
    def run(p, t, m):
        logits, _ = forward(p, t, positions_from_mask(m), cfg, mask_BT=m)
        return logits, token_logprobs(p, cfg, t, m, chunk=4)

    ref_logits, ref_lp = run(params, jnp.asarray(tokens), jnp.asarray(mask))
    logits, lp = run(params_s, tok_s, mask_s)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)


def test_init_params_lands_on_sharding():
    mesh = make_mesh(1, 4, 2)
    cfg = preset("tiny", num_layers=2)
    params = init_params(cfg, jax.random.key(0), mesh=mesh)
    ref = init_params(cfg, jax.random.key(0))
    emb = params["embed"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (2048, 64)
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(ref["embed"]))


def test_sampling_with_sharded_params_matches_one_device(hf_dirs):
    from models.sampler import generate

    cfg, params = hf_io.load_hf_checkpoint(hf_dirs["qwen2"])
    _, params_s = hf_io.load_hf_checkpoint(hf_dirs["qwen2"], mesh=make_mesh(2, 2, 2))
    kw = dict(key=jax.random.key(0), max_new_tokens=5, num_samples=2, temperature=0.8)
    a = generate(params, cfg, [[5, 6, 7], [8, 9]], **kw)
    b = generate(params_s, cfg, [[5, 6, 7], [8, 9]], **kw)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_export_from_sharded_params_round_trips(hf_dirs, tmp_path):
    mesh = make_mesh(2, 2, 2)
    cfg, params_s = hf_io.load_hf_checkpoint(hf_dirs["qwen3"], mesh=mesh)
    out = hf_io.save_hf_checkpoint(tmp_path / "from-mesh", cfg, params_s, max_shard_bytes=40_000)
    _, back = hf_io.load_hf_checkpoint(out)
    for a, b in zip(jax.tree.leaves(params_s), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sampling_splits_rows_over_data_devices(hf_dirs):
    from models.sampler import batch_sharding, generate

    cfg, params = hf_io.load_hf_checkpoint(hf_dirs["llama3"])
    _, params_d = hf_io.load_hf_checkpoint(hf_dirs["llama3"], mesh=make_mesh(8, 1, 1))
    sharding, shards = batch_sharding(params_d)
    assert shards == 8 and sharding.spec == jax.sharding.PartitionSpec(("data",), None)
    assert batch_sharding(params) == (None, 1)
    # 3 prompts do not divide over 8 devices: filler rows are added, then dropped
    prompts = [[5, 6, 7], [8, 9], [4, 4, 4, 4]]
    kw = dict(key=jax.random.key(3), max_new_tokens=6, num_samples=2, temperature=0.9, ignore_stop=True)
    a, b = generate(params, cfg, prompts, **kw), generate(params_d, cfg, prompts, **kw)
    assert b.tokens.shape == (6, 6) and b.prompt_tokens.shape == a.prompt_tokens.shape
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_sampling_devices_follow_the_cache_rule(monkeypatch):
    from models import sampler

    devices = jax.devices()
    assert sampler.last_level_cache_bytes() is None or sampler.last_level_cache_bytes() > 0
    monkeypatch.setattr(sampler, "last_level_cache_bytes", lambda: 32 * 2**20)
    assert sampler.sampling_devices(16 * 2**20, devices) == list(devices)  # a replica fits: every core
    assert sampler.sampling_devices(120 * 2**20, devices) == list(devices[:1])  # it does not: one device
    monkeypatch.setattr(sampler, "last_level_cache_bytes", lambda: None)
    assert sampler.sampling_devices(1, devices) == list(devices[:1])
