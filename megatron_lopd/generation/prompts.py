"""Prompt files -> chat-templated token ids.

A prompt file is JSONL (one object per line) or parquet (one row per prompt) with:
- `id` (optional, string or int; default: the row number): unique per file;
- `prompt` (a string, sent as one user turn) or `messages` (a chat: a list of
  {"role", "content"}).
Each prompt is rendered with the tokenizer's own chat template and
`add_generation_prompt=True`; `thinking` (None: the template's default) is passed as
`enable_thinking`, the Qwen3 switch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lopd.errors import ArtifactError, ConfigError, LopdError
from megatron_lopd.provenance import file_digest

PROMPT_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class PromptSet:
    """Prompts ready for a backend. `fingerprint`: the prompt file's content hash (not its name or path)."""

    path: Path
    ids: list[str]
    token_ids: list[list[int]]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        raise ArtifactError(f"prompt file {path} is a directory, not a file", "pass a JSONL or parquet file to --prompts")
    if not path.is_file():
        raise ArtifactError(f"prompt file {path} does not exist", "check the --prompts path")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise LopdError(f"prompt file {path}: reading parquet needs pyarrow", "pip install pyarrow, or convert the prompts to JSONL") from exc
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several error types for damaged files
            raise ArtifactError(f"prompt file {path}: unreadable parquet ({str(exc).splitlines()[0]})", "rewrite the file") from exc
    if path.suffix not in (".jsonl", ".json"):
        raise ArtifactError(f"prompt file {path}: unknown format {path.suffix!r}", f"use one of {', '.join(PROMPT_SUFFIXES)}")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"prompt file {path}: not UTF-8 text ({exc.reason})", "write the prompts as UTF-8 JSONL") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"prompt file {path}:{lineno}: invalid JSON ({exc.msg})", "one JSON object per line") from exc
        if not isinstance(row, dict):
            raise ArtifactError(f"prompt file {path}:{lineno}: a {type(row).__name__}, not an object", "one JSON object per line with 'prompt' or 'messages'")
        rows.append(row | {"_line": lineno})
    return rows


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if isinstance(row.get("messages"), list) and row["messages"]:
        msgs = row["messages"]
        if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
        raise ArtifactError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}", "fix the row")
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return [{"role": "user", "content": row["prompt"]}]
    raise ArtifactError(f"{where}: no non-empty 'prompt' string or 'messages' list", "give every row a 'prompt' or 'messages' field")


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


def load_prompt_set(path: str | Path, tokenizer, *, thinking: bool | None = None) -> PromptSet:
    """Read, validate and render a prompt file. Any bad row raises one ArtifactError naming it."""
    path = Path(path)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model's tokenizer has no chat template", "save a tokenizer with a chat template next to the model")
    rows = _read_rows(path)
    if not rows:
        raise ArtifactError(f"prompt file {path} holds no prompts", "check the file")
    ids, token_ids, seen = [], [], {}
    for i, row in enumerate(rows):
        where = f"prompt file {path}:{row['_line']}" if "_line" in row else f"prompt file {path} row {i}"
        pid = row.get("id", i)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise ArtifactError(f"{where}: 'id' must be a string or an integer", "fix the row")
        pid = str(pid)
        if pid in seen:
            raise ArtifactError(f"{where}: duplicate id {pid!r} (first at row {seen[pid]})", "give every prompt a unique id")
        seen[pid] = i
        ids.append(pid)
        token_ids.append(render_prompt(tokenizer, _messages(row, where), thinking))
    return PromptSet(path=path, ids=ids, token_ids=token_ids, fingerprint=prompt_file_fingerprint(path))


def prompt_file_fingerprint(path: str | Path) -> str:
    """What a rollout artifact records as inputs.prompts_fingerprint: the prompt file's content."""
    return "prompts-" + file_digest(path)[:32]
