"""The one reader of data files: JSONL or parquet rows, from a file or a directory of them.

Every input file the tools read (generation prompts, evaluation sets, the leakage check's
sets) comes through `iter_rows`. A directory is read as the concatenation of its data files in
name order (a Hugging Face snapshot's `data/train-00000-of-00003.parquet ...`, LiveCodeBench's
`test.jsonl ... test6.jsonl`); other files in it are ignored. Parquet is read in record batches,
only the columns asked for, so a 28 GB OpenThoughts3 snapshot is never held whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from megatron_lopd.errors import ArtifactError, LopdError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # .json: JSON Lines too (one object per line)


@dataclass(frozen=True)
class Row:
    """One row: its fields, where it is (`FILE:LINE` for JSONL, `FILE row N` for parquet, for
    error messages), its position among all rows of the source (0-based), and the fields the
    file has (for a parquet file its schema's columns; for JSONL the row's own keys)."""

    data: dict[str, Any]
    where: str
    position: int
    file_fields: tuple[str, ...]


def data_files(path: Path, what: str, flag: str) -> list[Path]:
    """The files a path stands for: itself, or a directory's data files in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ArtifactError(f"{what} {path} is a directory without {', '.join(DATA_SUFFIXES)} files", f"pass a data file or a directory of them to {flag}")
        return files
    if not path.exists():
        raise ArtifactError(f"{what} {path} does not exist", f"check the {flag} path")
    if path.suffix not in DATA_SUFFIXES:
        raise ArtifactError(f"{what} {path}: unknown format {path.suffix!r}", f"use one of {', '.join(DATA_SUFFIXES)}")
    return [path]


def iter_rows(path: str | Path, what: str = "data file", flag: str = "the path", columns: Sequence[str] | None = None) -> Iterator[Row]:
    """Every row of `path` (a file or a directory), in order. `columns`: the top-level fields
    needed (parquet reads only those the file has; JSONL rows are kept whole). Any unreadable
    file, line or row raises one ArtifactError naming it."""
    position = 0
    for file in data_files(Path(path), what, flag):
        rows = _parquet_rows(file, what, columns) if file.suffix == ".parquet" else _jsonl_rows(file, what)
        for data, where, fields in rows:
            yield Row(data, where, position, fields)
            position += 1


def _jsonl_rows(path: Path, what: str) -> Iterator[tuple[dict[str, Any], str, tuple[str, ...]]]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise ArtifactError(f"{what} {path}: cannot be read ({exc.strerror})", "check the file's permissions") from None
    with f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{what} {path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ArtifactError(f"{where}: invalid JSON ({exc.msg})", "write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise ArtifactError(f"{where}: a {type(row).__name__}, not a JSON object", "write one JSON object per line")
                yield row, where, tuple(row)
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{what} {path}:{lineno + 1}: not UTF-8 text ({exc.reason})", "write the file as UTF-8") from None


def _parquet_rows(path: Path, what: str, columns: Sequence[str] | None) -> Iterator[tuple[dict[str, Any], str, tuple[str, ...]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise LopdError(f"{what} {path}: reading parquet needs pyarrow", "pip install pyarrow, or convert the file to JSONL") from exc
    try:
        parquet = pq.ParquetFile(path)
        names = tuple(parquet.schema_arrow.names)
        wanted = names if columns is None else [c for c in names if c in set(columns)]
        index = 0
        for batch in parquet.iter_batches(columns=list(wanted), batch_size=1024):
            for row in batch.to_pylist():
                yield row, f"{what} {path} row {index}", names
                index += 1
    except LopdError:
        raise
    except Exception as exc:  # pyarrow raises several error types for damaged files
        raise ArtifactError(f"{what} {path}: unreadable parquet ({str(exc).splitlines()[0]})", "download or rewrite the file") from None
