"""Byte-level BPE tokenizer trained on the training split (seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .corpus import read_text

EOS = "<|endoftext|>"


# A plain chat template (the pair is trained on code, not chat): each message as a
# comment line naming its role, then the content; the OpenAI-compatible chat endpoint
# renders conversations with it. Checkpoints with their own template keep theirs.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '# ' + message['role'] + ':\\n' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:\\n' }}{% endif %}"
)


def train_tokenizer(files: list[Path], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(f) for f in files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=EOS, chat_template=CHAT_TEMPLATE
    )
