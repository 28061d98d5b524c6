"""Learning on the synthetic benchmark: a small model after a short SFT cold start, then GRPO
with the execution reward (1 correct / 0 wrong / -1 fails) raises the mean reward (seeded)."""

import numpy as np
import pytest

from rl.config import load_sft_config, load_train_config
from rl.sft import sft
from rl.trainer import train

from .conftest import build_env


@pytest.mark.slow
def test_sft_then_grpo_raises_execution_reward(tmp_path):
    env = build_env(tmp_path, n_train=300, vocab=512, hidden=64, layers=2, max_level=1)
    common = [f"data.path={env['synthetic']}", "data.max_prompt_len=96", "progress=false",
              "tensorboard=false", "mesh.data=1"]
    s = sft(load_sft_config(None, common + [
        f"model.path={env['model']}", f"run_dir={tmp_path / 'sft'}", "steps=300", "data.batch_size=16",
        "data.max_target_len=40", "optim.learning_rate=0.003", "optim.warmup_steps=10",
        "optim.schedule=cosine", "optim.final_lr_ratio=0.1", "checkpoint.every_steps=0"]))
    nll = [h["train/nll"] for h in s["history"]]
    assert np.mean(nll[-20:]) < 0.6 * np.mean(nll[:20])

    r = train(load_train_config(None, common + [
        f"model.path={tmp_path / 'sft' / 'hf'}", f"run_dir={tmp_path / 'grpo'}", "steps=40",
        "data.batch_size=4", "data.shuffle_seed=1", "sampling.num_generations=8",
        "sampling.max_new_tokens=40", "optim.learning_rate=0.001", "algo.beta=0",
        "algo.loss_agg=token_mean", "algo.eps_high=0.28", "checkpoint.every_steps=0",
        "checkpoint.export_hf=false", "reward.weights.execution=1.0"]))
    reward = [h["reward/mean"] for h in r["history"]]
    errors = [h["sql/error_rate"] for h in r["history"]]
    before, after = np.mean(reward[:10]), np.mean(reward[-10:])
    print(f"mean reward first 10 steps {before:.3f} -> last 10 steps {after:.3f}; "
          f"error rate {np.mean(errors[:10]):.3f} -> {np.mean(errors[-10:]):.3f}")
    # observed on this CPU: +0.19 to +0.35; separate processes do not reproduce each
    # other bit for bit here (cause not pinned down), hence the room in the margin
    assert after - before >= 0.1
    assert np.mean(errors[:10]) - np.mean(errors[-10:]) >= 0.1
    assert r["skipped_updates"] == 0
