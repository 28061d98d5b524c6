"""Train a small byte-level BPE tokenizer and save it as a `transformers` tokenizer.

Used by the demo and the tests, where no tokenizer may be downloaded. Special
tokens, each a single id: ``<pad>`` (0), ``<|endoftext|>`` (bos), ``<|im_end|>``
(eos, ends every chat turn), ``<|im_start|>``, and ``<think>``, ``</think>``,
``<answer>``, ``</answer>`` so the Think2SQL tags cost one token each. The chat
template is ChatML-like::

    <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{...}<|im_end|>\\n<|im_start|>assistant\\n

`AutoTokenizer.from_pretrained(out_dir)` loads the result offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from jaxsql.errors import JaxsqlError

PAD, BOS, EOS, IM_START = "<pad>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START) + TAG_TOKENS

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, out_dir: str | Path,
                    min_frequency: int = 2) -> "transformers.PreTrainedTokenizerFast":  # noqa: F821
    """Train byte-level BPE on `texts`, save to `out_dir`, and return the loaded tokenizer.

    Args:
      texts: training text (prompts and targets; include the chat markup's words).
      vocab_size: total vocabulary including the 256 byte tokens and the specials.
      out_dir: where ``save_pretrained`` writes ``tokenizer.json`` and its config.
      min_frequency: a merge needs at least this many occurrences.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise JaxsqlError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=None,
        additional_special_tokens=[IM_START, *TAG_TOKENS],
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast
