"""Where a teacher store keeps what (drawn in the schema docstring): root metadata, shard paths,
done markers, the presence and size checks of a shard's files. It needs no writer, so writer,
finalizer, reader and checks find their way around a store here, none through another."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lopd.errors import ArtifactError
from megatron_lopd.runtime.files import LOCK_NAME, OutputLock
from megatron_lopd.store.schema import MARKERS_DIR, ROOT_ATTR, SEQUENCE_ARRAYS, SHARDS_DIR, TOPK_VOCABULARY, StoreMeta

GROUP_JSON = {"zarr_format": 3, "node_type": "group", "attributes": {}}
PER_SEQUENCE = tuple(SEQUENCE_ARRAYS)  # in every shard and, after finalize, store-wide under sequences/


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def root_json(meta: StoreMeta, consolidated: dict[str, Any] | None = None) -> bytes:
    """The root ``zarr.json``: a group whose store attribute is ``meta``; the finalizer adds
    zarr v3 inline consolidated metadata."""
    doc: dict[str, Any] = {**GROUP_JSON, "attributes": {ROOT_ATTR: meta.to_attrs()}}
    if consolidated is not None:
        doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": consolidated}
    return json_bytes(doc)


def read_root(path: Path) -> dict[str, Any]:
    """The root ``zarr.json`` of a teacher store as a dict; ArtifactError if it is not one."""
    root = Path(path) / "zarr.json"
    if not Path(path).exists():
        raise ArtifactError(f"{path}: not a teacher store (it does not exist)", "check the path, or create the store with `lopd score`")
    if not Path(path).is_dir():
        raise ArtifactError(f"{path}: not a teacher store (a file, not a directory)", "pass the directory `lopd score --out` wrote")
    try:
        doc = json.loads(root.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: not a teacher store (no zarr.json)",
                            "check the path, or create the store with the scoring tool") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{root}: unreadable ({exc})", "the store's root metadata is corrupted: rescore") from exc
    if not isinstance(doc, dict) or ROOT_ATTR not in (doc.get("attributes") or {}):
        raise ArtifactError(f"{path}: a zarr hierarchy but not a teacher store (no {ROOT_ATTR!r} attribute)",
                            "point at a store written by megatron_lopd.store")
    return doc


def read_meta(path: Path) -> StoreMeta:
    return StoreMeta.from_attrs(read_root(path)["attributes"][ROOT_ATTR], str(path))


def is_teacher_store(path: str | os.PathLike) -> bool:
    """True only if ``path`` provably is a teacher store: its root zarr.json carries the store attribute.
    A directory holding only the temporaries of a creator killed before publishing counts too."""
    path = Path(path)
    try:
        doc = json.loads((path / "zarr.json").read_text())
        return isinstance(doc, dict) and ROOT_ATTR in (doc.get("attributes") or {})
    except FileNotFoundError:
        entries = [p.name for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []
        return bool(entries) and all(n.startswith(".zarr.json.") and n.endswith(".tmp") for n in entries)
    except (OSError, ValueError):
        return False


def live_locks(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The store's locks (shard writers, finalizer) whose holder may still be alive."""
    out = []
    for lock_path in [path / LOCK_NAME, *sorted((path / MARKERS_DIR).glob("*.lock"))]:
        lock = OutputLock(lock_path, "teacher store")
        holder = lock.read_holder()
        if holder is not None and lock.stale_reason(holder) is None:
            out.append((lock_path, holder))
    return out


def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


def shard_dir(path: Path, shard_id: int) -> Path:
    return Path(path) / SHARDS_DIR / shard_name(shard_id)


def marker_path(path: Path, shard_id: int) -> Path:
    return Path(path) / MARKERS_DIR / f"{shard_name(shard_id)}.json"


def shard_range(meta: StoreMeta, shard_id: int) -> range:
    """The contiguous sequence indices of one store shard."""
    sps = meta.sequences_per_shard
    return range(shard_id * sps, min((shard_id + 1) * sps, meta.num_sequences))


def token_array_names(meta: StoreMeta, with_topk: bool = True) -> list[str]:
    """The sharded per-token arrays of every store shard."""
    names = ["prompt_ids", "response_ids", "teacher_logprobs"]
    names += ["rollout_logprobs"] if meta.has_rollout_logprobs else []
    return names + (["topk_ids", "topk_logprobs"] if meta.top_k and with_topk else [])


def shard_array_names(meta: StoreMeta) -> list[str]:
    """Every array of a store shard: token arrays, the top-k vocabulary, per-sequence arrays."""
    return token_array_names(meta) + ([TOPK_VOCABULARY] if meta.top_k else []) + list(PER_SEQUENCE)


@dataclass
class ShardMarker:
    """The done marker of one shard (``markers/NNNNNN.json``)."""

    shard: int
    first_sequence: int
    num_sequences: int
    prompt_tokens: int
    response_tokens: int
    content_digest: str  # sha256 over the shard's per-sequence content hashes
    files: dict[str, int]  # data file (relative to the shard directory) -> size in bytes
    written_at: str = ""
    host: str = ""
    pid: int = 0

    @classmethod
    def read(cls, path: Path) -> "ShardMarker | None":
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: unreadable done marker ({exc})",
                                "delete the marker and rerun the writer for that shard") from exc


def done_shards(path: Path, meta: StoreMeta) -> list[int]:
    """Shards with a done marker (their data is complete unless damaged later)."""
    return [s for s in range(meta.num_shards) if marker_path(path, s).exists()]


def size_mismatch(shard_path: Path, marker: ShardMarker) -> tuple[str, int | None, int] | None:
    """The first data file of a shard whose size differs from its marker's record:
    (path relative to the shard directory, its size or None when missing, the recorded size)."""
    for rel, size in marker.files.items():
        try:
            actual = (shard_path / rel).stat().st_size
        except FileNotFoundError:
            return rel, None, size
        if actual != size:
            return rel, actual, size
    return None


def shard_problem(path: Path, meta: StoreMeta, s: int, *, marker_required: bool) -> tuple[str | None, ShardMarker | None]:
    """Presence and size problem of shard ``s`` (no data read): (problem or None, its marker)."""
    try:
        marker = ShardMarker.read(marker_path(path, s))
    except ArtifactError as exc:
        return f"shard {s}: {exc.what}", None
    if marker is None:
        return (f"shard {s}: done marker {MARKERS_DIR}/{shard_name(s)}.json is missing" if marker_required else None), None
    base, where = shard_dir(path, s), f"{SHARDS_DIR}/{shard_name(s)}"
    if not base.is_dir():
        return f"shard {s}: shard directory {where} is missing (its marker exists)", marker
    for rel in ["zarr.json"] + [f"{name}/zarr.json" for name in shard_array_names(meta)]:
        if not (base / rel).is_file():
            return f"shard {s}: {where}/{rel} is missing", marker
    mismatch = size_mismatch(base, marker)
    if mismatch is not None:
        rel, actual, size = mismatch
        if actual is None:
            return f"shard {s}: file {where}/{rel} is missing", marker
        return f"shard {s}: file {where}/{rel} is {actual} bytes, its marker says {size} (truncated or rewritten)", marker
    return None, marker


def store_nbytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def store_fingerprint(path: Path, meta: StoreMeta) -> str:
    """Which scoring of which rollouts a finalized store holds: its provenance, layout and every
    shard's done marker (content digest, file sizes, write time). A rescore, even of the same
    rollouts by the same teacher, changes it; reading the store does not. No data is read."""
    h = hashlib.sha256(json_bytes({"meta": meta.layout_key(), "finalized_at": meta.finalized_at}))
    for s in range(meta.num_shards):
        h.update(marker_path(path, s).read_bytes())
    return "store-" + h.hexdigest()[:32]
