"""Real orbax checkpoints: round trip, keep-last-N, incomplete dirs, SIGTERM guard."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsql.checkpoint import Checkpointer, CheckpointError, PreemptionGuard
from jaxsql.metrics import MetricsWriter, read_metrics


def _state(seed):
    params = {"w": jax.random.normal(jax.random.PRNGKey(seed), (3, 4)), "b": jnp.zeros(4)}
    opt = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt, "rng": jax.random.PRNGKey(seed + 7),
            "step": jnp.asarray(seed, jnp.int32)}


def test_round_trip_keep_last_and_meta(tmp_path):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    for s in (1, 2, 3):
        ck.save(s, _state(s), data_state=b'{"pos": %d}' % s, config={"lr": 0.1})
    ck.wait()
    assert ck.all_steps() == [2, 3]
    assert ck.save(3, _state(3)) is False  # never overwrites
    state, meta = ck.restore(_state(0))
    np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])
    np.testing.assert_array_equal(state["rng"], _state(3)["rng"])
    assert isinstance(state["opt_state"], type(_state(0)["opt_state"]))
    assert meta["data_state"] == b'{"pos": 3}' and meta["config"] == {"lr": 0.1}
    assert ck.read_meta(2)["step"] == 2
    ck.close()


def test_tmp_dirs_ignored_and_incomplete_is_clear_error(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, _state(1))
    ck.wait()
    # an interrupted orbax write leaves a tmp dir: not a step
    (tmp_path / "ck" / "2.orbax-checkpoint-tmp-123").mkdir()
    ck2 = Checkpointer(tmp_path / "ck")
    assert ck2.latest_step() == 1
    shutil.rmtree(tmp_path / "ck" / "1" / "meta")
    with pytest.raises(CheckpointError, match="incomplete"):
        ck2.restore(_state(0))
    with pytest.raises(CheckpointError, match="no completed"):
        Checkpointer(tmp_path / "empty").restore(_state(0))


def test_restore_mismatched_structure_is_clear_error(tmp_path):
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(1, _state(1))
    bad = _state(0)
    bad["params"]["w"] = jnp.zeros((5, 5))
    with pytest.raises(CheckpointError, match="cannot be restored"):
        ck.restore(bad)


def test_preemption_guard_catches_sigterm():
    with PreemptionGuard() as g:
        assert not g.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert g.stop_requested()
    assert signal.getsignal(signal.SIGTERM) is not g._handler


def test_metrics_writer(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.write(1, {"reward/mean": 0.5, "loss": float("nan"), "n": np.float32(2)})
    rows = read_metrics(tmp_path)
    assert rows[0]["reward/mean"] == 0.5 and rows[0]["loss"] is None and rows[0]["n"] == 2.0
    assert any((tmp_path / "tb").iterdir())
