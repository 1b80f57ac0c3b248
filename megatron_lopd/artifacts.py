"""The rollout artifact: sampled responses on disk, one format for SFT data and rollouts.

Layout (documented for users in docs/generation.md, "Rollout artifact format"):

    DIR/plan.json                         what is being generated (fixed at the first start)
    DIR/chunks/chunk-000000.safetensors   prompts [0, chunk_size) with all their n samples
    DIR/chunks/chunk-000001.safetensors   prompts [chunk_size, 2 * chunk_size) ...
    DIR/manifest.json                     written last: its presence means complete

Prompts are cut into fixed chunks by their index. A chunk is the unit of work, of
sharding (`--shard i/n` owns chunks c with c % n == i) and of resume (a chunk file
exists only once fully written: temporary file + atomic rename). A chunk's bytes depend
only on its prompts and the plan, never on which process wrote it, so any split into
shards merges into the same artifact with the same fingerprint.

Sample order (the order of `RolloutArtifact` records, and of teacher-store sequences):
prompt index, then sample index: record i is sample i % n of prompt i // n.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megatron_lopd.errors import ArtifactError
from megatron_lopd.provenance import MANIFEST_NAME, Manifest, files_fingerprint
from megatron_lopd.runtime.files import atomic_write, publish_once, refuse_foreign_dir, remove_owned_dir

FORMAT_VERSION = 1
FINISH_STOP = "stop"  # the response ended with EOS (included in response_ids)
FINISH_LENGTH = "length"  # cut at max_tokens
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH)
ARTIFACT_KINDS = ("sft_data", "rollouts")
PLAN_NAME = "plan.json"
CHUNK_DIR = "chunks"

logger = logging.getLogger(__name__)


@dataclass
class RolloutRecord:
    """One sample: sample `sample_index` of prompt `prompt_id` (the `prompt_index`-th prompt of the set)."""

    prompt_id: str
    sample_index: int
    prompt_ids: np.ndarray  # int32 [P]: the chat-templated prompt, as fed to the generator
    response_ids: np.ndarray  # int32 [R]: includes the EOS token when finish_reason == "stop"
    finish_reason: str  # "stop" | "length"
    text: str  # the decoded response (without the final EOS token)
    logprobs: np.ndarray | None = None  # float32 [R]: the generator's raw log-prob of each response token
    prompt_index: int = 0


def is_rollout_artifact(path: str | Path) -> bool:
    """True only if ``path`` provably holds a rollout artifact: a plan.json or manifest.json of a rollout kind."""
    for name in (PLAN_NAME, MANIFEST_NAME):
        try:
            doc = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("kind") in ARTIFACT_KINDS:
            return True
    return False


def chunk_name(chunk_id: int) -> str:
    return f"chunk-{chunk_id:06d}.safetensors"


def chunk_ranges(num_prompts: int, chunk_size: int) -> list[tuple[int, int]]:
    """Prompt ranges [start, stop) of every chunk."""
    return [(s, min(s + chunk_size, num_prompts)) for s in range(0, num_prompts, chunk_size)]


# ------------------------------------------------------------------------------------
# Chunk files: flat arrays + offsets in safetensors (deterministic bytes, no pickle, mmap-able).


def _ragged(arrays: Sequence[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), offsets


def _strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return _ragged([np.frombuffer(v.encode("utf-8"), dtype=np.uint8) for v in values], np.uint8)


def _encode_chunk(records: Sequence[RolloutRecord], n: int, has_logprobs: bool) -> dict[str, np.ndarray]:
    prompts = records[::n]
    tensors: dict[str, np.ndarray] = {}
    tensors["prompt_index"] = np.array([r.prompt_index for r in prompts], dtype=np.int64)
    tensors["prompt_tokens"], tensors["prompt_offsets"] = _ragged([r.prompt_ids for r in prompts], np.int32)
    tensors["prompt_id_bytes"], tensors["prompt_id_offsets"] = _strings([r.prompt_id for r in prompts])
    tensors["response_tokens"], tensors["response_offsets"] = _ragged([r.response_ids for r in records], np.int32)
    tensors["finish_reason"] = np.array([FINISH_REASONS.index(r.finish_reason) for r in records], dtype=np.uint8)
    tensors["text_bytes"], tensors["text_offsets"] = _strings([r.text for r in records])
    if has_logprobs:
        tensors["logprobs"], _ = _ragged([r.logprobs for r in records], np.float32)
    # safetensors refuses zero-sized tensors in some versions: pad flat byte arrays by one.
    for key in ("prompt_id_bytes", "text_bytes"):
        tensors[key] = np.concatenate([tensors[key], np.zeros(1, np.uint8)])
    return tensors


def _validate_records(records: Sequence[RolloutRecord], start: int, stop: int, n: int, has_logprobs: bool) -> None:
    expected = (stop - start) * n
    if len(records) != expected:
        raise ArtifactError(f"chunk for prompts [{start}, {stop}) got {len(records)} samples, expected {expected}")
    for k, r in enumerate(records):
        p, j = start + k // n, k % n
        if r.prompt_index != p or r.sample_index != j:
            raise ArtifactError(f"record {k} of chunk [{start}, {stop}) is ({r.prompt_index}, {r.sample_index}), expected ({p}, {j})")
        if r.finish_reason not in FINISH_REASONS:
            raise ArtifactError(f"record ({p}, {j}): unknown finish_reason {r.finish_reason!r}")
        if has_logprobs and (r.logprobs is None or len(r.logprobs) != len(r.response_ids)):
            raise ArtifactError(f"record ({p}, {j}): log-probs missing or not one per response token")


class _Chunk:
    """A loaded chunk: arrays, decoded lazily into records."""

    def __init__(self, path: Path, n: int):
        from safetensors.numpy import load_file

        try:
            self.t = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(f"{path}: unreadable chunk ({exc})", "delete the chunk file and rerun `lopd generate` to rewrite it") from exc
        self.n = n
        self.path = path

    def record(self, k: int) -> RolloutRecord:
        t, p = self.t, k // self.n

        def span(flat: str, offsets: str, i: int) -> np.ndarray:
            off = t[offsets]
            return t[flat][off[i] : off[i + 1]]

        logprobs = None
        if "logprobs" in t:
            off = t["response_offsets"]
            logprobs = t["logprobs"][off[k] : off[k + 1]]
        return RolloutRecord(
            prompt_id=bytes(span("prompt_id_bytes", "prompt_id_offsets", p)).decode("utf-8"),
            sample_index=k % self.n,
            prompt_ids=span("prompt_tokens", "prompt_offsets", p),
            response_ids=span("response_tokens", "response_offsets", k),
            finish_reason=FINISH_REASONS[int(t["finish_reason"][k])],
            text=bytes(span("text_bytes", "text_offsets", k)).decode("utf-8"),
            logprobs=logprobs,
            prompt_index=int(t["prompt_index"][p]),
        )


# ------------------------------------------------------------------------------------
# Writer


def _plan_key(plan: dict[str, Any]) -> dict[str, Any]:
    """The part of a plan that must match on resume: the artifact's identity. Not paths (for humans: a
    moved model is the same model), nor the `max_model_len` earlier versions recorded (it never changes
    the bytes: `lopd generate` refuses one that would cut a response)."""
    drop = {"model_path", "prompts_path", "max_model_len"}
    return {k: ({kk: vv for kk, vv in v.items() if kk not in drop} if isinstance(v, dict) else v) for k, v in plan.items()}


class ArtifactWriter:
    """Writes an artifact chunk by chunk; many processes may write disjoint chunks of one artifact.

    `plan`: {"kind", "producer", "inputs", "params", "layout": {"num_prompts", "n",
    "chunk_size", "has_logprobs"}}. The first process writes plan.json; later ones (other
    shards, a resumed run) must bring an identical plan, or replace it while no chunk is
    written yet (a run whose engine could not start is retried with other settings).
    """

    def __init__(self, path: Path, plan: dict[str, Any]):
        self.path = path
        self.plan = plan
        layout = plan["layout"]
        self.num_prompts = int(layout["num_prompts"])
        self.n = int(layout["n"])
        self.chunk_size = int(layout["chunk_size"])
        self.has_logprobs = bool(layout["has_logprobs"])
        self.ranges = chunk_ranges(self.num_prompts, self.chunk_size)

    @classmethod
    def create(cls, path: str | Path, plan: dict[str, Any], *, overwrite: bool = False) -> "ArtifactWriter":
        path = Path(path)
        if plan.get("kind") not in ARTIFACT_KINDS:
            raise ArtifactError(f"unknown artifact kind {plan.get('kind')!r}", f"use one of {', '.join(ARTIFACT_KINDS)}")
        plan = json.loads(json.dumps(plan))  # normalise tuples etc. to what reading back gives
        plan_path = path / PLAN_NAME
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"--out {path} is a file, not a directory", "pass a directory path to --out")
        if overwrite:  # checks before it deletes: only a directory that provably is a rollout artifact
            remove_owned_dir(path, is_rollout_artifact, "rollout artifact", flag="--overwrite")
        if not plan_path.is_file():
            refuse_foreign_dir(path, f"--out {path} exists and is not a rollout artifact", "choose an empty or new --out directory")
        path.mkdir(parents=True, exist_ok=True)
        # Of several shards starting at once exactly one writes the plan; every other one is compared against it.
        text = json.dumps(plan, indent=2, sort_keys=True) + "\n"
        if not publish_once(plan_path, text):
            existing = json.loads(plan_path.read_text())
            if _plan_key(existing) != _plan_key(plan):
                diff = sorted(k for k in set(existing) | set(plan) if _plan_key(existing).get(k) != _plan_key(plan).get(k))
                if any((path / CHUNK_DIR).glob("chunk-*.safetensors")) or (path / MANIFEST_NAME).exists():
                    raise ArtifactError(
                        f"{path}: already holds a generation with different settings ({', '.join(diff)} differ)",
                        "rerun with the original settings to resume, pass --overwrite, or choose another --out",
                    )
                atomic_write(plan_path, text)  # nothing was generated under the old plan: nothing to lose
                logger.warning("%s: no chunk written yet, re-planned with the new settings (%s changed)", path, ", ".join(diff))
        (path / CHUNK_DIR).mkdir(exist_ok=True)
        return cls(path, plan)

    def _check_plan_unchanged(self) -> None:
        """The plan may be replaced while no chunk exists (`create`): a run started under the old one stops."""
        if _plan_key(json.loads((self.path / PLAN_NAME).read_text())) != _plan_key(self.plan):
            raise ArtifactError(f"{self.path}: re-planned with other settings by another `lopd generate` while this one ran",
                                "run one setting per --out; rerun to continue under the current plan")

    def chunk_path(self, chunk_id: int) -> Path:
        return self.path / CHUNK_DIR / chunk_name(chunk_id)

    def done_chunks(self) -> set[int]:
        return {c for c in range(len(self.ranges)) if self.chunk_path(c).is_file()}

    def pending_chunks(self, shard: int = 0, num_shards: int = 1) -> list[int]:
        """Chunks shard `shard` of `num_shards` owns (c % num_shards == shard) that are not written yet."""
        done = self.done_chunks()
        return [c for c in range(shard, len(self.ranges), num_shards) if c not in done]

    def write_chunk(self, chunk_id: int, records: Sequence[RolloutRecord]) -> Path:
        from safetensors.numpy import save

        start, stop = self.ranges[chunk_id]
        _validate_records(records, start, stop, self.n, self.has_logprobs)
        final = self.chunk_path(chunk_id)
        # No safetensors metadata: its key order is not deterministic, and chunk bytes must be.
        # Serialized in memory and written by us (not safetensors' own 0600 temporary file):
        # chunk files get the mode every other file gets (0644 under the usual umask).
        from megatron_lopd.runtime.files import os_error_fix, os_error_reason

        data = save(_encode_chunk(records, self.n, self.has_logprobs))
        self._check_plan_unchanged()
        try:
            atomic_write(final, data)
        except OSError as exc:
            raise ArtifactError(f"rollout artifact {self.path}: cannot write {final.name}: {os_error_reason(exc)}",
                                f"{os_error_fix(exc)} (the --out directory)") from None
        return final

    def finalize(self) -> "RolloutArtifact":
        """Write the manifest once every chunk exists (any process may call it; the result is the same)."""
        missing = sorted(set(range(len(self.ranges))) - self.done_chunks())
        if missing:
            raise ArtifactError(
                f"{self.path}: {len(missing)} of {len(self.ranges)} chunks not generated yet (first: {missing[0]})",
                "run the remaining --shard tasks (or rerun without --shard) before finalizing",
            )
        files = [self.chunk_path(c) for c in range(len(self.ranges))]
        plan = self.plan
        manifest = Manifest(
            kind=plan["kind"],
            fingerprint=files_fingerprint(files),
            producer=plan["producer"],
            inputs=plan["inputs"],
            params=plan["params"],
            extra={
                "format_version": FORMAT_VERSION,
                **plan["layout"],
                "num_samples": self.num_prompts * self.n,
                "chunks": [f.name for f in files],
            },
        )
        manifest.write(self.path)
        return RolloutArtifact.open(self.path)


# ------------------------------------------------------------------------------------
# Reader


class RolloutArtifact:
    """A complete artifact, read-only. Record i is sample i % n of prompt i // n.

    `manifest.producer`: generator_fingerprint, tokenizer_fingerprint, chat_template,
    backend, dtype, model_path. `manifest.params`: the sampling parameters (+ thinking,
    chunk_size). `manifest.inputs`: prompts_fingerprint, num_prompts. `fingerprint`: the
    content fingerprint of the data files (stores record it as rollouts_fingerprint).
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        extra = manifest.extra
        self.fingerprint: str = manifest.fingerprint
        self.kind: str = manifest.kind
        self.n: int = int(extra["n"])
        self.num_prompts: int = int(extra["num_prompts"])
        self.chunk_size: int = int(extra["chunk_size"])
        self.has_logprobs: bool = bool(extra["has_logprobs"])
        self._chunk_files = [path / CHUNK_DIR / name for name in extra["chunks"]]
        self._cache: OrderedDict[int, _Chunk] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> "RolloutArtifact":
        """Open a complete artifact. `verify`: recompute the data fingerprint (cached per file after the first time)."""
        path = Path(path)
        if not path.exists():
            raise ArtifactError(f"{path}: rollout artifact directory does not exist", "check the path or run `lopd generate`")
        if not path.is_dir():
            raise ArtifactError(f"{path}: is a file, not a rollout artifact directory", "pass the directory `lopd generate --out` wrote")
        if not (path / MANIFEST_NAME).is_file():
            hint = "finish it: run the missing --shard tasks or rerun `lopd generate` to resume" if (path / PLAN_NAME).is_file() else "run `lopd generate`"
            raise ArtifactError(f"{path}: incomplete rollout artifact (no {MANIFEST_NAME})", hint)
        manifest = Manifest.read(path)
        if manifest.kind not in ARTIFACT_KINDS:
            raise ArtifactError(f"{path}: is a {manifest.kind!r} artifact, expected one of {ARTIFACT_KINDS}", "check the path")
        version = manifest.extra.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{path}: rollout format version {version!r}, this code reads {FORMAT_VERSION}", "regenerate with this version")
        art = cls(path, manifest)
        missing = [f.name for f in art._chunk_files if not f.is_file()]
        if missing:
            raise ArtifactError(f"{path}: {len(missing)} chunk files missing (first: {missing[0]})", "regenerate the artifact")
        if verify and files_fingerprint(art._chunk_files) != art.fingerprint:
            raise ArtifactError(f"{path}: data files do not match the manifest's fingerprint (modified or corrupted)", "regenerate the artifact")
        return art

    # --- provenance shortcuts
    @property
    def generator_fingerprint(self) -> str:
        return self.manifest.producer["generator_fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest.producer["tokenizer_fingerprint"]

    @property
    def chat_template(self) -> str | None:
        return self.manifest.producer.get("chat_template")

    # --- records
    def __len__(self) -> int:
        return self.num_prompts * self.n

    def _chunk(self, c: int) -> _Chunk:
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        chunk = _Chunk(self._chunk_files[c], self.n)
        self._cache[c] = chunk
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return chunk

    def __getitem__(self, i: int) -> RolloutRecord:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} samples")
        i %= len(self)
        per_chunk = self.chunk_size * self.n
        return self._chunk(i // per_chunk).record(i % per_chunk)

    def __iter__(self) -> Iterator[RolloutRecord]:
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt lengths, response lengths) of every record, int64 [len(self)], from the offsets only."""
        prompt_lens, response_lens = [], []
        for c in range(len(self._chunk_files)):
            t = self._chunk(c).t
            prompt_lens.append(np.repeat(np.diff(t["prompt_offsets"]), self.n))
            response_lens.append(np.diff(t["response_offsets"]))
        return np.concatenate(prompt_lens), np.concatenate(response_lens)

    def __repr__(self) -> str:
        return f"RolloutArtifact({str(self.path)!r}, kind={self.kind}, samples={len(self)}, generator={self.generator_fingerprint})"
