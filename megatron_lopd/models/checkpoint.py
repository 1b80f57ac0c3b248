"""Megatron checkpoints of Qwen3 models, and streaming conversion from / to Hugging Face.

A "Megatron checkpoint" is a megatron-core dist checkpoint (torch_dist format) whose model
tensors carry the keys of `model.sharded_state_dict()` (saved as `{"model": ...}`), plus
`lopd_checkpoint.json` (the HF config, parallel layout, iteration, kind) and `tokenizer/`
(tokenizer files and generation_config.json of the source model). Dist checkpoints store
global tensors, so one checkpoint loads at any TP / PP / EP.

Conversion never builds a model: `convert_from_hf` writes the dist checkpoint straight
from the safetensors files and `convert_to_hf` reads it back, one layer at a time, so peak
memory stays near one layer's tensors whatever the model size. The checkpoint is written
in the pieces a TP x EP run would save (a layout hint; loading reshards anyway).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError, LopdError
from megatron_lopd.models import hf_mapping as hfm
from megatron_lopd.models.qwen3 import Qwen3Config, check_parallel_layout
from megatron_lopd.runtime.files import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "lopd_checkpoint.json"
TOKENIZER_DIR = "tokenizer"
REQUIRED_METADATA = ("format_version", "hf_config", "tensor_parallel", "pipeline_parallel", "expert_parallel", "iteration", "kind")
# Files of a HF model dir that are not tokenizer / generation files.
_NOT_TOKENIZER = re.compile(r"(config\.json|manifest\.json|.*\.(safetensors|bin|pt|pth|gguf|h5|msgpack|distcp)|.*\.index\.json)$")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---- safetensors, read and written with plain file I/O (no mmap: RSS stays honest) -------
class HFWeights:
    """The tensors of a HF model dir (model.safetensors or sharded with an index), by name."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, "the safetensors index")["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ArtifactError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json",
                "point at a Hugging Face model directory saved with safetensors",
            )
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise ArtifactError(
                    f"{path}: shard listed in {index.name} is missing",
                    "copy the complete model directory (all safetensors shards)",
                )
            for tensor, (dtype, shape, start) in _read_safetensors_header(path).items():
                self.entries[tensor] = (path, dtype, shape, start)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows [start, stop) of its first axis."""
        path, dtype, shape, start = self.entries[name]
        if rows is not None:
            row_bytes = _nbytes(shape[1:], dtype)
            start += rows[0] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ArtifactError(f"{path}: truncated while reading {name}", "re-download or re-export the model")
                done += n
        return out


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ArtifactError(f"{path}: not a safetensors file (too short)", "re-export the model")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            raise ArtifactError(f"{path}: corrupt safetensors header", "re-export the model") from None
    size = path.stat().st_size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if 8 + length + end > size:
            raise ArtifactError(f"{path}: truncated (tensor {name} ends past the file)", "re-download or re-export the model")
        out[name] = (_ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin)
    return out


def _safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = _nbytes(shape, dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw) + (-len(raw) % 8)) + raw + b" " * (-len(raw) % 8)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r} is not understood", "write it like 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def write_hf_weights(
    out_dir: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterator[tuple[str, torch.Tensor]],
    max_shard_size: int,
) -> None:
    """Stream `tensors` (in `entries` order) into model-0000i-of-0000N.safetensors + index.

    Shard boundaries are planned from the known shapes, so each tensor is written as it
    arrives; a large tensor may arrive as consecutive row blocks under the same name.
    Nothing is buffered beyond the piece in hand.
    """
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[2], entry[1])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with open(out_dir / file_name, "wb") as f:
            f.write(_safetensors_header(shard))
            for name, dtype, shape in shard:
                remaining = _nbytes(shape, dtype)
                while remaining > 0:
                    got_name, piece = next(tensors)
                    if got_name != name or piece.dtype != dtype or tuple(piece.shape[1:]) != shape[1:]:
                        raise RuntimeError(f"internal: expected {name} {dtype} {shape}, got {got_name} {piece.dtype} {tuple(piece.shape)}")
                    data = memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
                    remaining -= len(data)
                    f.write(data)
                if remaining:
                    raise RuntimeError(f"internal: {name} received more data than its shape {shape}")
                weight_map[name] = file_name
                total += _nbytes(shape, dtype)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- HF tensors as regions of Megatron's global tensors ----------------------------------
class HFRegionSource:
    """Any region of any Megatron global tensor, computed from the HF safetensors files.

    Keeps one fused instance (e.g. one layer's QKV) cached; plain tensors read only the
    rows a region needs, so a TP slice of the embedding never loads the whole table.
    """

    def __init__(self, weights: HFWeights, config: Qwen3Config):
        self.weights, self.config = weights, config
        self.maps = hfm.maps_by_key(config)
        self._cached: tuple[Any, torch.Tensor] | None = None

    def region(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        m = self.maps[key]
        p = m.prepend_axes
        index, inner_offsets, inner_sizes = tuple(offsets[:p]), offsets[p:], sizes[p:]
        whole_rows = all(o == 0 and s == full for o, s, full in zip(inner_offsets[1:], inner_sizes[1:], m.shape[1:]))
        if m.fuse == "copy" and whole_rows:
            (name,) = hfm.hf_names(m, index)
            tensor = self.weights.read(name, (inner_offsets[0], inner_offsets[0] + inner_sizes[0]))
        else:
            tensor = self._instance(m, index)
            for axis, (start, size) in enumerate(zip(inner_offsets, inner_sizes)):
                tensor = tensor.narrow(axis, start, size)
        return tensor.reshape(sizes)

    def _instance(self, m: hfm.TensorMap, index: tuple[int, ...]) -> torch.Tensor:
        if self._cached is None or self._cached[0] != (m.key, index):
            self._cached = None  # drop the previous instance before reading the next
            parts = [self.weights.read(name) for name in hfm.hf_names(m, index)]
            self._cached = ((m.key, index), hfm.fuse(m, self.config, parts))
        return self._cached[1]


def check_hf_weights(weights: HFWeights, config: Qwen3Config) -> None:
    """Every tensor the config implies is there with the right shape; nothing else is."""
    expected = {}
    for m, index in hfm.iter_instances(config):
        expected.update(zip(hfm.hf_names(m, index), hfm.hf_shapes(m, config)))
    missing = [n for n in expected if n not in weights.entries]
    if missing:
        raise ArtifactError(
            f"{weights.dir}: {len(missing)} tensor(s) that config.json implies are missing, e.g. {missing[0]}",
            "the weights do not match config.json; use the complete, matching model directory",
        )
    for name, shape in expected.items():
        if weights.entries[name][2] != shape:
            raise ArtifactError(
                f"{weights.dir}: {name} has shape {list(weights.entries[name][2])}, config.json implies {list(shape)}",
                "the weights do not match config.json; use a consistent model directory",
            )
    extra = sorted(set(weights.entries) - set(expected))
    if extra:
        raise ArtifactError(
            f"{weights.dir}: {len(extra)} tensor(s) that a Qwen3 model does not have, e.g. {extra[0]}",
            "convert a plain Qwen3ForCausalLM / Qwen3MoeForCausalLM checkpoint",
        )


# ---- torch.distributed.checkpoint planners: lazy writes, region reads --------------------
def _lazy_save_planner(items, resolve: Callable, progress=None):
    """Write items given up front; each tensor is produced only when the writer asks for it
    (torch's single-threaded FileSystemWriter resolves them one at a time, in order)."""
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

    class Planner(SavePlanner):
        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
            pass

        def create_local_plan(self):
            return SavePlan(items)

        def create_global_plan(self, all_plans):
            return create_default_global_save_plan(all_plans)

        def finish_plan(self, new_plan):
            return new_plan

        def resolve_data(self, write_item):
            data = resolve(write_item)
            if progress is not None and isinstance(data, torch.Tensor):
                progress.update(data.numel() * data.element_size())
            return data

    return Planner()


def _region_load_planner(requests: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]], where: str):
    """Reads requested regions of global tensors into given destination tensors."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class Planner(LoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            self.metadata = metadata

        def create_local_plan(self):
            items = []
            for key, wanted in requests.items():
                stored = self.metadata.state_dict_metadata.get(key)
                if stored is None:
                    raise ArtifactError(f"{where}: tensor {key} is not in the checkpoint", "use a complete checkpoint")
                chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(t.shape)) for o, t in wanted]
                found = create_read_items_for_chunk_list(key, stored, chunks)
                covered = [0] * len(chunks)
                for item in found:
                    covered[item.dest_index.index] += math.prod(item.lengths)
                if any(c != t.numel() for c, (_, t) in zip(covered, wanted)):
                    raise ArtifactError(f"{where}: the checkpoint holds only part of {key}", "use a complete checkpoint")
                items += found
            return LoadPlan(items)

        def create_global_plan(self, global_plan):
            return global_plan

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value):
            raise RuntimeError("internal: no byte objects requested")

        def resolve_tensor(self, read_item):
            tensor = requests[read_item.dest_index.fqn][read_item.dest_index.index][1]
            for axis, (start, size) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                tensor = tensor.narrow(axis, start, size)
            return tensor

        def commit_tensor(self, read_item, tensor):
            pass

    return Planner()


def _storage_reader(ckpt_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class CachedReader(FileSystemReader):  # metadata is read once, not per layer
        _metadata = None

        def read_metadata(self, *args, **kwargs):
            if self._metadata is None:
                self._metadata = super().read_metadata(*args, **kwargs)
            return self._metadata

    return CachedReader(str(ckpt_dir))


# ---- metadata ---------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing ({what})", "use a complete directory") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})", f"restore {what}") from None


def read_checkpoint_metadata(ckpt_dir: str | Path) -> dict:
    """`lopd_checkpoint.json` of a Megatron checkpoint, after checking it against the files.

    Raises ArtifactError for a missing file, metadata that disagrees with the stored
    tensors (shapes, layers, experts), or a data file that is missing or truncated.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise ArtifactError(f"{ckpt_dir}: no such checkpoint directory", "pass a directory written by `lopd convert from-hf` or the trainer")
    meta_path = ckpt_dir / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(
            f"{ckpt_dir}: no {METADATA_FILE} (not a megatron-lopd checkpoint, or an unfinished save)",
            "convert with `lopd convert from-hf` or save with megatron_lopd.models.checkpoint.save_checkpoint",
        )
    meta = _read_json(meta_path, "checkpoint metadata")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ArtifactError(f"{meta_path}: missing {', '.join(missing)}", "re-create the checkpoint")
    if meta["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{meta_path}: format_version {meta['format_version']} is not supported (expected {FORMAT_VERSION})",
            "convert the checkpoint with a matching megatron-lopd version",
        )
    for name in ("metadata.json", ".metadata"):
        if not (ckpt_dir / name).is_file():
            raise ArtifactError(f"{ckpt_dir}: {name} is missing (incomplete dist checkpoint)", "re-create the checkpoint")
    config = Qwen3Config.from_hf(meta["hf_config"])
    stored = _storage_reader(ckpt_dir).read_metadata()
    for m in hfm.tensor_maps(config):
        want = hfm.global_shape(m, config)
        have = stored.state_dict_metadata.get(m.key)
        if have is None or tuple(getattr(have, "size", ())) != want:
            found = "absent" if have is None else f"shape {list(have.size)}"
            raise ArtifactError(
                f"{ckpt_dir}: {METADATA_FILE} describes {m.key} with shape {list(want)} but the dist checkpoint has it {found}",
                "the metadata belongs to another model; re-create the checkpoint or restore its lopd_checkpoint.json",
            )
    needed: dict[str, int] = {}
    for info in stored.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        path = ckpt_dir / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: data file of the dist checkpoint is missing", "copy the complete checkpoint directory")
        if path.stat().st_size < end:
            raise ArtifactError(f"{path}: truncated ({path.stat().st_size} < {end} bytes)", "copy the complete checkpoint directory")
    return meta


def _write_metadata(ckpt_dir: Path, hf_config: dict, *, tp: int, pp: int, ep: int, iteration: int, kind: str, extra: dict) -> None:
    import megatron_lopd

    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "iteration": iteration,
        "tensor_parallel": tp,
        "pipeline_parallel": pp,
        "expert_parallel": ep,
        "hf_config": hf_config,
        "producer": f"megatron-lopd {megatron_lopd.__version__}",
        **extra,
    }
    # Written last: its presence marks a complete checkpoint.
    atomic_write(ckpt_dir / METADATA_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def tokenizer_files(src_dir: str | Path) -> list[str]:
    """Names of the tokenizer files and generation_config.json (all but weights and config)."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise ArtifactError(f"{src_dir}: tokenizer directory not found", "pass the HF model dir (or a checkpoint's tokenizer/)")
    names = [p.name for p in sorted(src_dir.iterdir()) if p.is_file() and not _NOT_TOKENIZER.fullmatch(p.name)]
    if not any(n.startswith("tokenizer") for n in names):
        raise ArtifactError(f"{src_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json)", "save the tokenizer next to the model")
    return names


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    names = tokenizer_files(src_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src_dir / name, dst_dir / name)
    return names


def _prepare_empty_dir(path: Path, what: str) -> None:
    """A new or empty, writable output directory, checked before the long part."""
    from megatron_lopd.runtime.files import check_writable_dir

    if path.is_dir() and any(path.iterdir()):
        raise ArtifactError(f"{path}: already exists and is not empty ({what})", "choose a new output directory or remove it")
    check_writable_dir(path, what, "--out")


# ---- single-writer helper for torchrun ---------------------------------------------------
def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on global rank 0 only; other ranks wait and re-raise rank 0's LopdError.

    Without an initialised process group but under a launcher, ranks > 0 do nothing.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if int(os.environ.get("RANK", "0")) != 0:
            log.info("conversion runs on rank 0 only; rank %s has nothing to do", os.environ["RANK"])
            return None
        return fn()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", fn())]
        except LopdError as exc:
            outcome = [("error", exc)]
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise value
    return value


# ---- HF -> Megatron ---------------------------------------------------------------------
def convert_from_hf(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, ep: int = 1) -> Path:
    """HF Qwen3 dir -> Megatron dist checkpoint for TP/PP/EP, streamed (no model is built)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _on_rank0(lambda: _convert_from_hf(hf_dir, out_dir, tp, pp, ep))
    return out_dir


def _convert_from_hf(hf_dir: Path, out_dir: Path, tp: int, pp: int, ep: int) -> None:
    from megatron_lopd.provenance import model_fingerprint

    config = Qwen3Config.from_hf(hf_dir)  # checks the directory, config.json and the architecture
    hf_config = _read_json(hf_dir / "config.json", "the model config")
    check_parallel_layout(config, tp, pp, ep, where=str(hf_dir))
    weights = HFWeights(hf_dir)
    check_hf_weights(weights, config)
    tokenizer_files(hf_dir)  # fail before the long part, not after
    _prepare_empty_dir(out_dir, "checkpoint output")
    write_dist_checkpoint(out_dir, HFRegionSource(weights, config), config, tp=tp)
    copy_tokenizer_files(hf_dir, out_dir / TOKENIZER_DIR)
    _write_metadata(
        out_dir, hf_config, tp=tp, pp=pp, ep=ep, iteration=0, kind="hf_import",
        extra={"source": {"hf_dir": str(hf_dir.resolve()), "model_fingerprint": model_fingerprint(hf_dir)}},
    )


def write_dist_checkpoint(out_dir: Path, source: HFRegionSource, config: Qwen3Config, *, tp: int = 1) -> None:
    """A torch_dist checkpoint with megatron-core's keys, written piece by piece from `source`.

    Pieces are what TP=`tp` ranks would save: per layer, per expert, per TP slice.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
    from tqdm import tqdm

    items: list[WriteItem] = []
    total = 0
    for m, index in hfm.iter_instances(config):
        dtype = source.weights.entries[hfm.hf_names(m, index)[0]][1]
        size = torch.Size(hfm.global_shape(m, config))
        for offsets, sizes in hfm.tp_chunks(m, tp):
            offsets, sizes = torch.Size((*index, *offsets)), torch.Size((1,) * len(index) + sizes)
            items.append(WriteItem(
                index=MetadataIndex(m.key, offsets), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, sizes), TensorProperties(dtype=dtype), size),
            ))
            total += _nbytes(sizes, dtype)
        if m.extra_state:  # megatron-core saves `_extra_state` (None without TE) for each linear
            items.append(WriteItem(index=MetadataIndex(hfm.extra_state_keys(m, config, index)), type=WriteItemType.BYTE_IO))

    def resolve(item):
        if item.type == WriteItemType.BYTE_IO:  # megatron-core stores a list of the objects
            buffer = io.BytesIO()
            torch.save([None], buffer)
            buffer.seek(0)
            return buffer
        chunk = item.tensor_data.chunk
        return source.region(item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes)).contiguous()

    with tqdm(total=total, unit="B", unit_scale=True, desc="hf -> megatron", disable=None) as bar, _single_process():
        dcp.save(
            {},
            storage_writer=FileSystemWriter(str(out_dir), thread_count=1, sync_files=False),
            planner=_lazy_save_planner(items, resolve, bar),
            no_dist=True,
        )
    # megatron-core's markers: the backend of the sharded and the common part.
    (out_dir / "metadata.json").write_text(json.dumps({
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1,
    }))
    torch.save({}, out_dir / "common.pt")


# ---- Megatron -> HF ---------------------------------------------------------------------
EXPORT_DTYPES = ("bfloat16", "float16", "float32")


def convert_to_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_size: str | int = "5GB", dtype: str | None = None) -> Path:
    """Megatron checkpoint (any TP/PP/EP) -> HF dir: config.json, sharded safetensors + index,
    generation_config.json and the tokenizer files. Streams one layer at a time.

    `dtype` (one of EXPORT_DTYPES): the tensors' dtype, written into config.json too so that the
    two agree. None: the dtype the model's config names (the base model's: a run trained in fp32
    on CPU exports the bf16 a Qwen3 base model ships in, not fp32 tensors under a bf16 label)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}", "choose one of them")
    _on_rank0(lambda: _convert_to_hf(ckpt_dir, out_dir, parse_size(max_shard_size), dtype))
    return out_dir


def _convert_to_hf(ckpt_dir: Path, out_dir: Path, max_shard_size: int, dtype: str | None) -> None:
    from tqdm import tqdm

    meta = read_checkpoint_metadata(ckpt_dir)
    config = Qwen3Config.from_hf(meta["hf_config"])
    dtype = dtype or (config.torch_dtype if config.torch_dtype in EXPORT_DTYPES else "bfloat16")
    out_dtype = getattr(torch, dtype)
    # transformers 4.x writes torch_dtype, 5.x dtype: keep the source's style (both when it has neither).
    hf_config = dict(meta["hf_config"])
    hf_config.update({k: dtype for k in ("torch_dtype", "dtype") if k in hf_config} or {"torch_dtype": dtype, "dtype": dtype})
    reader = _storage_reader(ckpt_dir)
    stored = reader.read_metadata().state_dict_metadata
    maps = hfm.tensor_maps(config)
    entries = []
    for m, index in hfm.iter_instances(config):
        entries += [(name, out_dtype, shape) for name, shape in zip(hfm.hf_names(m, index), hfm.hf_shapes(m, config))]
    _prepare_empty_dir(out_dir, "HF export")

    def table_rows(m: hfm.TensorMap) -> Iterator[tuple[str, torch.Tensor]]:
        """A vocabulary table in row blocks, one per stored piece (e.g. per TP rank):
        never the whole table in memory, and each stored piece read once."""
        starts = sorted({chunk.offsets[0] for chunk in stored[m.key].chunks} | {m.shape[0]})
        for start, stop in zip(starts, starts[1:]):
            block = torch.empty((stop - start, *m.shape[1:]), dtype=stored[m.key].properties.dtype)
            dcp_load(reader, {m.key: [((start, *(0,) * (len(m.shape) - 1)), block)]}, str(ckpt_dir))
            yield hfm.hf_names(m, ())[0], block

    def layer(group: list[hfm.TensorMap], index: int) -> Iterator[tuple[str, torch.Tensor]]:
        """All tensors of one layer, read in one pass over the checkpoint."""
        wanted = [(m, i) for m in group for i in hfm.instances(m, config, [index])]
        requests: dict[str, list] = {}
        for m, i in wanted:
            dest = torch.empty((1,) * len(i) + m.shape, dtype=stored[m.key].properties.dtype)
            requests.setdefault(m.key, []).append(((*i, *(0,) * len(m.shape)), dest))
        dcp_load(reader, requests, str(ckpt_dir))
        for m, i in wanted:
            dest = requests[m.key].pop(0)[1]  # requests were appended in `wanted` order
            yield from zip(hfm.hf_names(m, i), hfm.split(m, config, dest.reshape(m.shape)))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        total = sum(_nbytes(s, d) for _, d, s in entries)
        with tqdm(total=total, unit="B", unit_scale=True, desc="megatron -> hf", disable=None) as bar:
            parts = [table_rows(m) if m.tp_axis == 0 else layer([m], 0) for m in maps if m.key.startswith("embedding")]
            parts += [layer([m for m in maps if m.scope != "model"], i) for i in range(config.num_layers)]
            parts += [
                table_rows(m) if m.tp_axis == 0 else layer([m], 0)
                for m in maps if m.scope == "model" and not m.key.startswith("embedding")
            ]
            for part in parts:  # generators: each reads only when its turn comes
                for name, tensor in part:
                    tensor = tensor.to(out_dtype)
                    bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor

    write_hf_weights(out_dir, entries, tensors(), max_shard_size)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    copied = copy_tokenizer_files(ckpt_dir / TOKENIZER_DIR, out_dir)
    if "generation_config.json" not in copied:
        generation = {k: meta["hf_config"].get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@contextlib.contextmanager
def _single_process():
    with warnings.catch_warnings():  # no_dist=True is intended; torch warns about it anyway
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def dcp_load(reader, requests: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]], where: str) -> None:
    """Fill each destination tensor with the region of its key starting at its offsets."""
    import torch.distributed.checkpoint as dcp

    with _single_process():
        dcp.load({}, storage_reader=reader, planner=_region_load_planner(requests, where), no_dist=True)


# ---- the live model ---------------------------------------------------------------------
# Transformer Engine (>= 2.18) unpickles FP8 delayed-scaling extra state only when this is "1".
TE_UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def _te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@contextlib.contextmanager
def trusted_te_extra_state():
    """Allow TE to unpickle FP8 extra state while one of our own checkpoints is loaded.

    A `fp8=delayed` model keeps its scaling state as a pickle in `_extra_state`; TE >= 2.18
    refuses to unpickle it (a pickle can run code) unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1
    when `set_extra_state` runs. Checkpoints our trainer wrote are trusted, so the variable is
    set for the load only and its previous value (or absence) restored after, also on error.
    Without TE installed it changes nothing.
    """
    if not _te_installed():
        yield
        return
    previous = os.environ.get(TE_UNSAFE_PICKLE_ENV)
    os.environ[TE_UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TE_UNSAFE_PICKLE_ENV, None)
        else:
            os.environ[TE_UNSAFE_PICKLE_ENV] = previous


def _unwrap(model):
    """The GPTModel from build_model inside DDP / Float16Module wrappers (they share parameters)."""
    inner = model
    while getattr(inner, "qwen3_config", None) is None and hasattr(inner, "module"):
        inner = inner.module
    if getattr(inner, "qwen3_config", None) is None:
        raise ConfigError("model was not built by megatron_lopd.models.qwen3.build_model", "build it with build_model(config)")
    return inner


def load_hf_weights(model, hf_dir: str | Path) -> None:
    """Fill this rank's shard of `model` (any TP/PP/EP) straight from the HF safetensors.

    Every parameter is first set to NaN; any that no HF tensor reaches is reported, so a
    megatron-core change that adds a parameter cannot go unnoticed.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    model = _unwrap(model)
    config = model.qwen3_config
    hf_config = Qwen3Config.from_hf(hf_dir)
    _check_same_architecture(config, hf_config, str(hf_dir))
    weights = HFWeights(hf_dir)
    check_hf_weights(weights, config)
    source = HFRegionSource(weights, config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        for t in nested_values(sharded):
            if isinstance(t, ShardedTensor):
                sizes = (1,) * t.prepend_axis_num + tuple(t.local_shape)
                t.data.copy_(source.region(t.key, tuple(t.global_offset), sizes).reshape(t.data.shape))
    unset = [name for name, p in model.named_parameters() if torch.isnan(p).any()]
    if unset:
        raise ConsistencyError(f"{len(unset)} Megatron parameter(s) not covered by the HF mapping, e.g. {unset[0]}", "update megatron_lopd.models.hf_mapping for this megatron-core version")


def _check_same_architecture(model_config: Qwen3Config, other: Qwen3Config, where: str) -> None:
    ignore = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "max_position_embeddings")
    diffs = [
        f"{f}={getattr(other, f)} (model has {getattr(model_config, f)})"
        for f in model_config.__dataclass_fields__
        if f not in ignore and getattr(other, f) != getattr(model_config, f)
    ]
    if diffs:
        raise ConsistencyError(f"{where}: architecture differs from the model: {', '.join(diffs[:3])}", "build the model from this checkpoint's config")


def save_checkpoint(
    ckpt_dir: str | Path, model, *, config: Qwen3Config | dict, tokenizer_dir: str | Path,
    iteration: int = 0, kind: str = "model", extra_state: dict | None = None,
) -> Path:
    """Save `model` (all ranks call this) as a Megatron checkpoint: dist checkpoint + metadata.

    `config` may be the HF config dict to keep verbatim (e.g. from the source checkpoint's
    metadata) or a Qwen3Config. `extra_state` entries (optimizer, RNG, ...) are saved next
    to "model" in the same dist checkpoint.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    ckpt_dir, model = Path(ckpt_dir), _unwrap(model)
    hf_config = config if isinstance(config, dict) else config.to_hf_dict()
    _check_same_architecture(model.qwen3_config, Qwen3Config.from_hf(hf_config), "save_checkpoint config")
    tokenizer_files(tokenizer_dir)
    if dist.get_rank() == 0:
        _prepare_empty_dir(ckpt_dir, "checkpoint")
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), **(extra_state or {})}, str(ckpt_dir))
    if dist.get_rank() == 0:
        copy_tokenizer_files(tokenizer_dir, ckpt_dir / TOKENIZER_DIR)
        _write_metadata(
            ckpt_dir, hf_config, iteration=iteration, kind=kind, extra={},
            tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
            ep=ps.get_expert_model_parallel_world_size(),
        )
    dist.barrier()
    return ckpt_dir


def load_checkpoint(ckpt_dir: str | Path, model) -> dict:
    """Load the "model" part of a Megatron checkpoint (ours or a trainer's) into `model`.

    All ranks call this. Other top-level entries (optimizer, RNG state) are left alone;
    `_extra_state` objects absent from the checkpoint (e.g. Transformer Engine's FP8
    metadata in a checkpoint converted on CPU) keep their initial values.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir, model = Path(ckpt_dir), _unwrap(model)
    meta = read_checkpoint_metadata(ckpt_dir)
    _check_same_architecture(model.qwen3_config, Qwen3Config.from_hf(meta["hf_config"]), str(ckpt_dir))
    stored = set(_storage_reader(ckpt_dir).read_metadata().state_dict_metadata)
    sharded = {
        k: v for k, v in model.sharded_state_dict().items()
        if not (isinstance(v, ShardedObject) and v.unique_key not in stored)
    }
    with trusted_te_extra_state():  # a trainer's fp8=delayed checkpoint holds pickled extra state
        loaded = dist_checkpointing.load({"model": sharded}, str(ckpt_dir), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        result = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"{ckpt_dir}: model keys missing {missing[:2]} / unexpected {result.unexpected_keys[:2]}",
            "load the checkpoint into a model built from its own config",
        )
    return meta


def export_model_to_hf(model, config: Qwen3Config | dict, tokenizer_dir: str | Path, out_dir: str | Path,
                       max_shard_size: str | int = "5GB", dtype: str | None = None) -> Path:
    """Write the live `model` (all ranks call this) as a HF dir, via a temporary checkpoint.

    The temporary Megatron checkpoint sits next to `out_dir` and is removed afterwards; the
    HF files are then streamed from it by rank 0 (`convert_to_hf`).
    """
    import torch.distributed as dist

    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.megatron-tmp"
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(tmp, model, config=config, tokenizer_dir=tokenizer_dir, kind="export")
    try:
        convert_to_hf(tmp, out_dir, max_shard_size=max_shard_size, dtype=dtype)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
