"""`rl.rollout.PromptEncoder`: an over-long prompt keeps its last tokens, and says so."""

import warnings

import pytest


def test_over_long_prompts_keep_their_end_warn_once_and_are_counted(tiny_env):
    from transformers import AutoTokenizer

    from rl.rollout import PromptEncoder

    tok = AutoTokenizer.from_pretrained(tiny_env["tokenizer"])
    examples = tiny_env["bench"].train[:4]
    full = PromptEncoder(tok, "plain", 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut: no warning
        whole = [full(ex) for ex in examples]
    assert full.truncated == 0
    n = min(len(w) for w in whole) - 5
    cut = PromptEncoder(tok, "plain", n)
    with pytest.warns(UserWarning, match=rf"example '{examples[0].id}' is {len(whole[0])} tokens, over "
                                         rf"max_prompt_len={n}"):
        first = cut(examples[0])
    assert first == whole[0][-n:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later prompts are counted, not reported again
        rest = [cut(ex) for ex in examples[1:]]
        cut(examples[1])  # cached: not counted twice
    assert rest == [w[-n:] for w in whole[1:]] and cut.truncated == len(examples)
