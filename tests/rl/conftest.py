"""A tiny but real environment for the learning room's tests: synthetic SQLite
benchmark, a BPE tokenizer trained on its prompts, a random HF checkpoint."""

from pathlib import Path

import pytest


def build_env(root: Path, *, n_train: int = 64, vocab: int = 600, hidden: int = 32, layers: int = 2,
              max_level: int = 1) -> dict:
    from data.prompts import render_target
    from data.synthetic import generate_benchmark
    from data.tokenizer import train_tokenizer
    from models.testing import save_random_checkpoint
    from rl.rollout import PromptEncoder

    bench = generate_benchmark(root / "synthetic", seed=0, n_train=n_train, n_dev=16, max_level=max_level)
    enc = PromptEncoder(None, "plain")
    texts = []
    for ex in bench.train + bench.dev:
        from data.prompts import render_prompt

        texts.append(render_prompt(ex, enc.schema(ex.db_path), "plain"))
        texts.append(render_target(ex, "plain"))
    tok = train_tokenizer(texts * 2, vocab_size=vocab, out_dir=root / "tok")
    model_dir = save_random_checkpoint(
        root / "model", "tiny", seed=0, tokenizer_dir=root / "tok",
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
        num_heads=4, num_kv_heads=2, head_dim=hidden // 4, bos_token_id=tok.bos_token_id,
        eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    return {"root": root, "synthetic": str(root / "synthetic"), "model": str(model_dir),
            "tokenizer": str(root / "tok"), "bench": bench}


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("rl_env"))


def grpo_overrides(env: dict, run_dir, **extra) -> list[str]:
    """key=value overrides for a tiny, fast GRPO run."""
    base = {
        "run_dir": str(run_dir), "model.path": env["model"], "data.path": env["synthetic"],
        "data.batch_size": 2, "data.max_prompt_len": 48, "sampling.num_generations": 4,
        "sampling.max_new_tokens": 8, "optim.learning_rate": 1e-3, "steps": 3, "progress": False,
        "tensorboard": False, "checkpoint.export_hf": False, "mesh.data": 1,
        "reward.weights.execution": 1.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
