"""Prompt files -> chat-templated token ids.

A prompt file is read by a data format (`megatron_lopd.datasets`; `lopd generate --format`): by
default `prompts`, JSONL (one object per line) or parquet (one row per prompt; or a directory of
such files) with:
- `id` (optional, string or int; default: the row number, from 0): unique per file;
- `prompt` (a string, sent as one user turn, or a chat list) or `messages` (a chat: a list of
  {"role", "content"}).
The published layouts (DAPO-Math-17k, OpenThoughts3, ...) are formats too, and `--id-key`,
`--prompt-key`, `--messages-key` name other fields. A `DataSource` may carry a prompt template
with `{problem}` for plain-text prompts.
Each prompt is rendered with the tokenizer's own chat template and
`add_generation_prompt=True`; `thinking` (None: the template's default) is passed as
`enable_thinking`, the Qwen3 switch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_lopd.datasets.source import PROBLEM_PLACEHOLDER, DataSource, read_examples
from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.provenance import file_digest

NATIVE_FORMAT = "prompts"


@dataclass
class PromptSet:
    """Prompts ready for a backend. `fingerprint`: the prompts' content hash (the files and how they
    are read; not their name or path)."""

    path: Path
    ids: list[str]
    token_ids: list[list[int]]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{model_dir}: no loadable tokenizer ({str(exc).splitlines()[0][:200]})", "save the tokenizer next to the weights") from exc


def render_prompt(tokenizer, messages: list[dict[str, str]], thinking: bool | None) -> list[int]:
    """The chat template with a generation prompt, as token ids (no extra BOS/EOS)."""
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))


def load_prompt_set(prompts: DataSource | str | os.PathLike, tokenizer, *, thinking: bool | None = None) -> PromptSet:
    """Read, validate and render a prompt file (a path: the `prompts` format). Any bad row raises
    one ArtifactError naming it."""
    source = DataSource.of(prompts, NATIVE_FORMAT)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model's tokenizer has no chat template", "save a tokenizer with a chat template next to the model")
    examples = read_examples(source, with_answer=False, what="prompt file", flag="--prompts")
    template = source.prompt_template or PROBLEM_PLACEHOLDER
    chat = next((ex for ex in examples if ex.messages), None)
    if source.prompt_template is not None and chat is not None:
        raise ConfigError(f"{chat.where}: a chat prompt, and the prompt template applies to plain-text prompts only",
                          "drop --prompt-template (chats are sent as they are), or read a plain-text field with --prompt-key")
    token_ids = [
        render_prompt(tokenizer, list(ex.messages) if ex.messages else [{"role": "user", "content": template.replace(PROBLEM_PLACEHOLDER, ex.text)}],
                      thinking)
        for ex in examples
    ]
    return PromptSet(path=source.path, ids=[ex.id for ex in examples], token_ids=token_ids, fingerprint=prompt_file_fingerprint(source))


def prompt_file_fingerprint(prompts: DataSource | str | os.PathLike) -> str:
    """What a rollout artifact records as inputs.prompts_fingerprint: the prompt file's content,
    and how it is read when that is not the plain `prompts` format of one file."""
    source = DataSource.of(prompts, NATIVE_FORMAT)
    if source.is_plain_file(NATIVE_FORMAT):
        return "prompts-" + file_digest(source.path)[:32]
    return "prompts-" + source.digest("prompt file", "--prompts")[:32]
