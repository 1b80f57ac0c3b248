"""A data source: a file (or a directory of them) and the format that reads it, and the examples it holds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_lopd.datasets.columns import Example
from megatron_lopd.datasets.formats import FORMATS, DataFormat, data_format
from megatron_lopd.datasets.rows import data_files, iter_rows
from megatron_lopd.errors import ArtifactError, ConfigError

PROBLEM_PLACEHOLDER = "{problem}"


@dataclass(frozen=True)
class DataSource(os.PathLike):
    """Where the data is and how to read it. It stands for its path wherever a path is expected
    (`os.fspath`, `Path(source)`, `str(source)`), so a config field that holds a prompt file path
    can hold a source. `prompt_template` (generation): the user turn made of a plain-text prompt,
    with `{problem}` where the prompt goes; chats are sent as they are."""

    path: Path
    format: DataFormat
    prompt_template: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.prompt_template is not None and PROBLEM_PLACEHOLDER not in self.prompt_template:
            raise ConfigError(f"prompt template {self.prompt_template!r} has no {PROBLEM_PLACEHOLDER} placeholder",
                              f"put {PROBLEM_PLACEHOLDER} where the prompt text goes")

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def of(cls, data: "DataSource | str | os.PathLike", default_format: str) -> "DataSource":
        """`data` itself if it is a source, else the file read in the format `default_format`."""
        return data if isinstance(data, DataSource) else cls(Path(data), FORMATS[default_format])

    def is_plain_file(self, native_format: str) -> bool:
        """One file in `native_format`, no template: what the tools read before formats existed."""
        return self.format == FORMATS[native_format] and self.prompt_template is None and not self.path.is_dir()

    def digest(self, what: str = "data file", flag: str = "the path") -> str:
        """sha256 of how the data is read (format, template) and of every data file's content."""
        from megatron_lopd.provenance import file_digest

        h = hashlib.sha256(json.dumps({**self.format.spec(), "prompt_template": self.prompt_template}, sort_keys=True).encode())
        for file in data_files(self.path, what, flag):
            h.update(f"|{file.name}|{file_digest(file)}".encode())
        return h.hexdigest()


def iter_examples(source: DataSource, *, with_answer: bool, what: str = "data file", flag: str = "the path") -> Iterator[Example]:
    """Every example of `source` in file order, as the format reads it (rows outside a
    LiveCodeBench window skipped), repeats and duplicate ids included."""
    reader = source.format.reader
    for row in iter_rows(source.path, what, flag, columns=sorted(reader.top_level_fields())):
        example = reader.example(row, with_answer=with_answer)
        if example is not None:
            yield example


def read_examples(source: DataSource, *, with_answer: bool, what: str = "data file", flag: str = "the path") -> list[Example]:
    """The examples of `source`, checked: at least one, unique ids; with `unique_prompts` a row
    repeating an earlier prompt (and answer) is dropped, and how many were is printed."""
    examples: list[Example] = []
    seen_ids: dict[str, str] = {}
    seen_prompts: set = set()
    repeats = 0
    for ex in iter_examples(source, with_answer=with_answer, what=what, flag=flag):
        if source.format.unique_prompts:
            chat = tuple((t["role"], t["content"]) for t in ex.messages) if ex.messages else ex.text
            key = (chat, ex.answer)
            if key in seen_prompts:
                repeats += 1
                continue
            seen_prompts.add(key)
        if ex.id in seen_ids:
            raise ArtifactError(f"{ex.where}: duplicate id {ex.id!r} (first at {seen_ids[ex.id]})",
                                "give every row a unique id (or pass --id-key naming a unique field)")
        seen_ids[ex.id] = ex.where
        examples.append(ex)
    if repeats:
        print(f"{what} {source.path}: dropped {repeats:,} rows repeating an earlier prompt (format {source.format.name}: "
              f"{source.format.source})", file=sys.stderr, flush=True)
    if not examples:
        window = getattr(source.format.reader, "window", None)
        inside = f" in the contest-date window {window}" if window is not None and str(window) != ":" else ""
        raise ArtifactError(f"{what} {source.path} holds no rows{inside}", "check the file (and the --format / window)")
    return examples


_NAMED_SOURCE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?::(?P<format>[A-Za-z0-9_]+))?=(?P<path>.+)$")


def parse_named_source(text: str, flag: str) -> tuple[str, str | None, Path]:
    """`NAME[:FORMAT]=PATH` (as `--suite-data` and `--eval` take it) -> (name, format or None, path)."""
    match = _NAMED_SOURCE.match(text.strip())
    if match is None:
        raise ConfigError(f"{flag} {text!r} is not NAME=PATH or NAME:FORMAT=PATH", f"e.g. {flag} aime24=/data/aime_2024.parquet")
    return match["name"], match["format"], Path(match["path"])


def named_source(text: str, flag: str) -> tuple[str, DataSource]:
    """`NAME[:FORMAT]=PATH` as (name, source); the format defaults to NAME."""
    name, fmt, path = parse_named_source(text, flag)
    fmt = fmt or name
    if fmt not in FORMATS:
        raise ConfigError(f"{flag} {text!r}: no data format {fmt!r}", f"name one with {flag} {name}:FORMAT={path} (formats: {', '.join(FORMATS)})")
    return name, DataSource(path, data_format(fmt))
