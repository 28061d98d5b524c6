"""TRL's GRPOTrainer on the `jaxsql bench grpo` workload, for the ratio.

Needs ``trl`` (not a jaxsql dependency; install the ``bench`` extra or
``pip install trl --no-deps accelerate datasets pandas dill multiprocess xxhash``).
Same weights (the HF directory), same prompts (exactly `prompt_len` tokens
with the checkpoint's tokenizer), G generations of exactly `new_tokens`
tokens (``min_new_tokens``), beta, one iteration, float32, the same cheap
reward, ``loss_type="grpo"`` and group-std scaling as jaxsql's side.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxsql.errors import JaxsqlError


def run_trl(model_dir: str | Path, texts: Sequence[str], *, steps: int, warmup: int, generations: int,
            prompts: int, prompt_len: int, new_tokens: int, beta: float, learning_rate: float,
            reward: Callable[[list[list[int]]], list[float]], seed: int = 0) -> dict[str, Any]:
    """Seconds per TRL GRPO step (mean over `steps` after `warmup`) and a coarse breakdown.

    `reward` maps completion token ids to rewards (the jaxsql side's, passed in by
    `rl.bench` so this module does not import it back)."""
    try:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise JaxsqlError(f"--compare-trl needs TRL and its dependencies: {e}") from None

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if any(n != prompt_len for n in lens):
        raise JaxsqlError(f"TRL prompts are {lens} tokens, expected {prompt_len}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    total = warmup + steps
    ds = Dataset.from_dict({"prompt": list(texts) * total})

    def trl_reward(prompts, completions, completion_ids, **kwargs):
        return reward([list(map(int, ids)) for ids in completion_ids])

    step_times: list[float] = []
    gen_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1000,
            save_strategy="no", per_device_train_batch_size=prompts * generations,
            gradient_accumulation_steps=1, num_generations=generations, max_completion_length=new_tokens,
            generation_kwargs={"min_new_tokens": new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
            beta=beta, num_iterations=1, loss_type="grpo", scale_rewards="group", epsilon=0.2,
            learning_rate=learning_rate, max_steps=total, shuffle_dataset=False, seed=seed,
            dataloader_num_workers=0, disable_dropout=True,
            # TRL 1.16 defaults to gradient checkpointing; off is its faster setting at these sizes
            gradient_checkpointing=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Timer()])
        inner = trainer._generate_and_score_completions

        def timed(*a, **k):
            t0 = time.perf_counter()
            out_ = inner(*a, **k)
            gen_times.append(time.perf_counter() - t0)
            return out_

        trainer._generate_and_score_completions = timed
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its metrics dict; stdout is our JSON
            trainer.train()
    s = step_times[warmup:]
    g = gen_times[warmup:len(step_times)]
    mean = float(np.mean(s))
    gen = float(np.mean(g)) if g else float("nan")
    import trl

    return {"trl_version": trl.__version__, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "trl_s_per_step": round(mean, 4),
            "trl_breakdown": {"generate_score_and_ref_logprobs_s": round(gen, 4),
                              "loss_backward_optimizer_s": round(mean - gen, 4)}}
