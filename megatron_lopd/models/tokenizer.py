"""Character-level tokenizers built locally (no hub), for tests, the demo and tiny models.

A real Hugging Face fast tokenizer (`tokenizer.json` + `tokenizer_config.json`), so the
same code paths (chat template, `AutoTokenizer.from_pretrained`, vLLM) run as with
Qwen3's own tokenizer. Chat roles are single special tokens to keep sequences short.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|end|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>")
DEFAULT_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"

# A Qwen-style template: role markers, EOS after every turn, optional empty think block
# when thinking is switched off (Qwen3's `enable_thinking=False` convention).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS, out_dir: str | Path | None = None, chat_template: str = CHAT_TEMPLATE):
    """A fast tokenizer with one token per character in `chars` plus the special tokens.

    Ids: special tokens first (0..len(SPECIAL_TOKENS)-1), then `chars` in the given order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "".join(dict.fromkeys(chars))  # dedupe, keep order
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
        model_max_length=1 << 20,
    )
    tok.chat_template = chat_template
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok
