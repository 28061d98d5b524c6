"""`jaxsql bench grpo` prompt preparation: never hangs on a checkpoint without a tokenizer."""

import pytest

from jaxsql.cli import main
from models.testing import save_random_checkpoint, save_test_tokenizer
from rl.bench import bench_prompts


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """A random model with no tokenizer files (what `jaxsql model init` writes by default)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("bare") / "m", "tiny", vocab_size=300,
                                  hidden_size=32, intermediate_size=64, num_layers=1,
                                  num_heads=2, num_kv_heads=1)


def test_checkpoint_without_tokenizer_gets_random_ids(bare_checkpoint):
    texts, ids, tok = bench_prompts(bare_checkpoint, num=3, length=16)
    assert texts is None and tok is None
    assert [len(row) for row in ids] == [16, 16, 16]


def test_compare_trl_without_tokenizer_fails_before_timing(bare_checkpoint, capsys):
    assert main(["bench", "grpo", "--model", str(bare_checkpoint), "--compare-trl"]) == 1
    assert "--compare-trl needs a tokenizer" in capsys.readouterr().err


def test_prompts_have_exact_length_with_a_tokenizer(tmp_path):
    tok_dir = save_test_tokenizer(tmp_path / "tok")
    texts, ids, tok = bench_prompts(tok_dir, num=2, length=24)
    assert [len(row) for row in ids] == [24, 24]
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == ids


def test_bench_grpo_reports_model_flops_and_mfu(bare_checkpoint, capsys):
    """The breakdown stays, and every phase gets model FLOPs (models.flops) and its MFU against
    the matmul probe of the same run."""
    import json

    from models.config import load_hf_config
    from models.flops import grpo_step_flops

    assert main(["bench", "grpo", "--model", str(bare_checkpoint), "--steps", "1", "--warmup", "1", "--prompts", "2",
                 "--generations", "2", "--prompt-len", "8", "--new-tokens", "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["jaxsql_breakdown"]) == {"generate_s", "reward_s", "ref_logprobs_wait_s", "update_s", "step_s"}
    u = r["jaxsql_utilisation"]
    expected = grpo_step_flops(load_hf_config(bare_checkpoint), 2, 2, 8, 4, reference=True)
    assert u["model_flops"] == expected
    assert u["peak_flops_per_s"] > 0 and "matmul" in u["peak_source"]
    step_s = r["jaxsql_breakdown"]["step_s"]
    assert u["mfu"]["total"] == round(expected["total"] / step_s / u["peak_flops_per_s"], 4)
    assert set(u["mfu"]) == {"generate", "ref_logprobs", "update", "total"}
