"""Rows -> examples: which field of a row is the id, the prompt and the reference answer.

A `ColumnMap` names them by key; a key may be a dotted path into nested fields
(`reward_model.ground_truth`). The prompt is either a string (one user turn, put through the
consumer's `{problem}` template) or a chat: a list of `{"role", "content"}` turns or of
ShareGPT `{"from", "value"}` turns (`human`/`user`, `gpt`/`assistant`, `system`). Trailing
assistant turns of a chat are the dataset's own response (OpenThoughts3's `gpt` turn), not part
of the prompt, and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lopd.datasets.rows import Row
from megatron_lopd.errors import ArtifactError

_MISSING = object()
# ShareGPT speaker names -> chat roles
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant", "system": "system"}


@dataclass(frozen=True)
class Example:
    """One prompt of a data file.

    `text`: the problem as the dataset writes it (the user turns of a chat, joined), what the
    leakage check compares. `messages`: a chat to send as it is; None means `text` is sent as one
    user turn through the consumer's prompt template. `answer`: the reference (evaluation)."""

    id: str
    where: str
    text: str
    messages: tuple[dict[str, str], ...] | None = None
    answer: str | None = None


def lookup(data: dict[str, Any], key: str) -> Any:
    """`data[key]`, where a dotted key walks nested mappings; `_MISSING` when absent."""
    if key in data:
        return data[key]
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _known_keys(row: Row) -> str:
    return ", ".join(repr(k) for k in row.file_fields) or "none"


def missing_key(row: Row, key: str, flag: str) -> ArtifactError:
    """A row without `key`: names the key, the row and the keys that do exist."""
    return ArtifactError(f"{row.where}: no {key!r} (its keys: {_known_keys(row)})", f"pass {flag} with one of them, or fix the row")


def parse_chat(value: Any, where: str, key: str) -> tuple[dict[str, str], ...]:
    """A chat list as `{"role", "content"}` turns, trailing assistant turns dropped."""
    fix = "write the chat as a list of {'role': ..., 'content': ...} (or {'from': ..., 'value': ...}) turns"
    if not isinstance(value, list) or not value:
        raise ArtifactError(f"{where}: {key!r} is not a non-empty chat list", fix)
    turns = []
    for turn in value:
        if not isinstance(turn, dict):
            raise ArtifactError(f"{where}: {key!r} holds a {type(turn).__name__}, not a chat turn", fix)
        role, content = (turn.get("role"), turn.get("content")) if "role" in turn else (turn.get("from"), turn.get("value"))
        if not isinstance(role, str) or role.lower() not in _ROLES or not isinstance(content, str):
            raise ArtifactError(f"{where}: {key!r} has a turn without a known role and text content ({sorted(turn)})", fix)
        turns.append({"role": _ROLES[role.lower()], "content": content})
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not any(t["role"] == "user" for t in turns):
        raise ArtifactError(f"{where}: {key!r} has no user turn before its answer", fix)
    return tuple(turns)


def chat_text(messages: tuple[dict[str, str], ...]) -> str:
    """The problem a chat asks: its user turns, joined by blank lines."""
    return "\n\n".join(t["content"] for t in messages if t["role"] == "user")


def answer_text(value: Any, row: Row, key: str, flag: str) -> str:
    if value is _MISSING:
        raise missing_key(row, key, flag)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ArtifactError(f"{row.where}: empty {key!r}", "give every row its reference answer (or drop the row)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ArtifactError(f"{row.where}: {key!r} is a {type(value).__name__}, not a string or number", "store the reference answer as a string")
    return str(value)


def row_id(value: Any, row: Row, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ArtifactError(f"{row.where}: {key!r} is a {type(value).__name__}, not a string or an integer", "use string or integer ids")
    return str(value)


@dataclass(frozen=True)
class ColumnMap:
    """Which fields of a row are what (`--id-key`, `--prompt-key`, `--messages-key`, `--answer-key`).

    `id_key` None: the row's `id` field when it has one, else its position (0-based). A row with
    a non-null `messages_key` field is a chat; else `prompt_key` holds a string or a chat list.
    `answer_key` is read only where answers are wanted (evaluation)."""

    prompt_key: str = "prompt"
    messages_key: str | None = "messages"
    answer_key: str = "answer"
    id_key: str | None = None

    def top_level_fields(self) -> set[str]:
        keys = [self.prompt_key, self.messages_key, self.answer_key, self.id_key or "id"]
        return {k.split(".")[0] for k in keys if k} | {k for k in keys if k}

    def example(self, row: Row, *, with_answer: bool) -> Example:
        data = row.data
        if self.id_key is None:
            pid = data.get("id", row.position)
            pid = row.position if pid is None else pid
            ident = row_id(pid, row, "id")
        else:
            value = lookup(data, self.id_key)
            if value is _MISSING or value is None:
                raise missing_key(row, self.id_key, "--id-key")
            ident = row_id(value, row, self.id_key)
        chat = lookup(data, self.messages_key) if self.messages_key else _MISSING
        if chat is not _MISSING and chat is not None:
            messages = parse_chat(chat, row.where, self.messages_key)
            text = chat_text(messages)
        else:
            prompt = lookup(data, self.prompt_key)
            if prompt is _MISSING or prompt is None:
                keys = f"{self.prompt_key!r}" + (f" or {self.messages_key!r}" if self.messages_key else "")
                raise ArtifactError(f"{row.where}: no {keys} (its keys: {_known_keys(row)})",
                                    "pass --prompt-key (a string or chat field) or --messages-key naming one of them, or fix the row")
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ArtifactError(f"{row.where}: empty {self.prompt_key!r}", "give every row a prompt (or drop the row)")
                messages, text = None, prompt
            else:
                messages = parse_chat(prompt, row.where, self.prompt_key)
                text = chat_text(messages)
        answer = answer_text(lookup(data, self.answer_key), row, self.answer_key, "--answer-key") if with_answer else None
        return Example(id=ident, where=row.where, text=text, messages=messages, answer=answer)
