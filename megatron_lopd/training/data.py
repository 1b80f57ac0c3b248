"""Micro-batches for the trainer, from the teacher store or the SFT artifact.

The data stream is the concatenation of epochs; epoch e is a permutation of all
sequences drawn from (seed, e). Step s consumes the next `global_batch` sequences of the
stream, so the data position is one integer (sequences consumed) and does not depend on
how many data-parallel ranks read it: a run resumed with another DP size sees the same
global batches.

Within a step the sequences are split across DP ranks (equal counts, balanced tokens),
and on each rank packed whole into rows of `seq_length` positions (first-fit decreasing;
a sequence is never split across rows or micro-batches), `micro_batch_size` rows per
micro-batch.

Alignment, per sequence of prompt P and response R (L = |P| + |R| tokens) occupying
L - 1 row positions: position j holds input token full[j] and target full[j + 1]; the
target is response token t = j + 1 - |P| when j + 1 >= |P| (loss mask 1), and the
teacher log-prob stored for response[t] sits at that position: the logits at row
offset |P| + t - 1 predict response[t].
"""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from megatron_lopd.errors import ArtifactError, ConfigError


@dataclass
class TrainSequence:
    """One training sequence, whatever its source. Arrays are per response token."""

    index: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    teacher_logprobs: np.ndarray | None = None  # [R]
    topk_ids: np.ndarray | None = None  # [R, k]
    topk_logprobs: np.ndarray | None = None  # [R, k]
    rollout_logprobs: np.ndarray | None = None  # [R]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


class SequenceSource(ABC):
    """Random access to training sequences plus what the trainer must check at start."""

    path: str = ""
    fingerprint: str = ""
    vocab_size: int | None = None  # the vocabulary the data was scored with, when known
    top_k: int = 0
    has_teacher: bool = False
    has_rollout_logprobs: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def lengths(self) -> np.ndarray:
        """Total tokens (prompt + response) of every sequence, int64 [N]."""

    @abstractmethod
    def fetch(self, indices: Sequence[int]) -> list[TrainSequence]: ...


class InMemorySource(SequenceSource):
    """Sequences held in memory (tests, benchmarks with synthetic data)."""

    def __init__(self, sequences: list[TrainSequence], *, path: str = "<memory>"):
        self.sequences = sequences
        self.path = path
        first = sequences[0] if sequences else None
        self.has_teacher = first is not None and first.teacher_logprobs is not None
        self.top_k = int(first.topk_ids.shape[1]) if first is not None and first.topk_ids is not None else 0
        self.has_rollout_logprobs = first is not None and first.rollout_logprobs is not None

    def __len__(self) -> int:
        return len(self.sequences)

    def lengths(self) -> np.ndarray:
        return np.array([s.num_tokens for s in self.sequences], dtype=np.int64)

    def fetch(self, indices: Sequence[int]) -> list[TrainSequence]:
        return [self.sequences[int(i)] for i in indices]


class StoreSource(SequenceSource):
    """The teacher store (zarr): prompts, responses, teacher log-probs, top-k, rollout log-probs."""

    def __init__(self, store, path: str):
        self.store = store
        self.path = path
        self.top_k = int(store.top_k) if store.load_topk else 0
        self.has_teacher = True
        self.has_rollout_logprobs = bool(store.has_rollout_logprobs)
        self.vocab_size = int(store.vocab_size)  # the scorer's vocabulary
        self._lengths: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path, *, load_topk: bool = True) -> "StoreSource":
        """`load_topk=False` skips the top-k arrays (most of the bytes) when nothing uses them."""
        from megatron_lopd.store import TeacherStore

        return cls(TeacherStore.open(path, load_topk=load_topk), str(path))

    @property
    def provenance(self):
        return self.store.provenance

    def __len__(self) -> int:
        return len(self.store)

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            prompt, response = self.store.lengths()
            self._lengths = prompt.astype(np.int64) + response.astype(np.int64)
        return self._lengths

    def fetch(self, indices: Sequence[int]) -> list[TrainSequence]:
        records = self.store.get_batch([int(i) for i in indices])
        return [
            TrainSequence(
                index=int(i),
                prompt_ids=r.prompt_ids,
                response_ids=r.response_ids,
                teacher_logprobs=r.teacher_logprobs,
                topk_ids=r.topk_ids,
                topk_logprobs=r.topk_logprobs,
                rollout_logprobs=r.rollout_logprobs,
            )
            for i, r in zip(indices, records)
        ]


class ArtifactSource(SequenceSource):
    """The SFT artifact (teacher-written responses): cross-entropy targets only."""

    def __init__(self, artifact, path: str):
        self.artifact = artifact
        self.path = path
        self.fingerprint = artifact.fingerprint
        self._lengths: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> "ArtifactSource":
        from megatron_lopd.artifacts import RolloutArtifact

        return cls(RolloutArtifact.open(path), str(path))

    def __len__(self) -> int:
        return len(self.artifact)

    def lengths(self) -> np.ndarray:
        if self._lengths is None:  # one pass over the chunks (memory-mapped arrays, cheap)
            self._lengths = np.array([len(r.prompt_ids) + len(r.response_ids) for r in self.artifact], dtype=np.int64)
        return self._lengths

    def fetch(self, indices: Sequence[int]) -> list[TrainSequence]:
        records = ((int(i), self.artifact[int(i)]) for i in indices)
        return [TrainSequence(index=i, prompt_ids=np.asarray(r.prompt_ids), response_ids=np.asarray(r.response_ids))
                for i, r in records]


# --------------------------------------------------------------------------------------
# Planning: which sequences each step, each rank, each row.


def epoch_order(num_sequences: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The permutation of epoch `epoch`: a pure function of (seed, epoch)."""
    if not shuffle:
        return np.arange(num_sequences, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_sequences).astype(np.int64)


def step_indices(num_sequences: int, consumed: int, global_batch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The `global_batch` sequence indices at stream position `consumed` (may span two epochs)."""
    out, pos = [], consumed
    while len(out) < global_batch:
        epoch, offset = divmod(pos, num_sequences)
        take = epoch_order(num_sequences, seed, epoch, shuffle)[offset : offset + global_batch - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.asarray(out, dtype=np.int64)


def split_across_ranks(indices: np.ndarray, lengths: np.ndarray, dp_size: int) -> list[np.ndarray]:
    """Equal sequence counts per DP rank, token counts balanced (longest first, to the lightest rank)."""
    if len(indices) % dp_size:
        raise ConfigError(
            f"global batch of {len(indices)} sequences does not divide across {dp_size} data-parallel ranks",
            "set data.global_batch to a multiple of the data-parallel size",
        )
    per_rank = len(indices) // dp_size
    order = sorted(range(len(indices)), key=lambda i: (-int(lengths[indices[i]]), i))
    load = [0] * dp_size
    members: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        rank = min((r for r in range(dp_size) if len(members[r]) < per_rank), key=lambda r: (load[r], r))
        members[rank].append(int(indices[i]))
        load[rank] += int(lengths[indices[i]])
    return [np.asarray(m, dtype=np.int64) for m in members]


def pack_rows(indices: np.ndarray, lengths: np.ndarray, seq_length: int, pack: bool = True) -> list[list[int]]:
    """Rows of whole sequences, each using <= seq_length positions (a sequence of L tokens uses L - 1)."""
    positions = {int(i): max(int(lengths[i]) - 1, 1) for i in indices}
    order = sorted((int(i) for i in indices), key=lambda i: (-positions[i], i))
    if not pack:
        return [[i] for i in order]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        need = positions[i]
        for r, room in enumerate(free):
            if room >= need:
                rows[r].append(i)
                free[r] -= need
                break
        else:
            rows.append([i])
            free.append(seq_length - need)
    return rows


# --------------------------------------------------------------------------------------
# Collation.


@dataclass
class MicroBatch:
    """One micro-batch, [B, T] tensors (B rows of T positions). seq_ids: the sequence of each
    position (numbered within the micro-batch, -1 = padding); also the attention segments."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    target_ids: torch.Tensor
    loss_mask: torch.Tensor
    seq_ids: torch.Tensor
    num_sequences: int  # the step's global batch: the loss divides by it
    teacher_logprobs: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    teacher_top1_ids: torch.Tensor | None = None  # [B, T] the teacher's most likely id (metric only)
    sequence_indices: list[int] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, **{k: move(getattr(self, k)) for k in _TENSOR_FIELDS})

    def loss_inputs(self):
        from megatron_lopd.training.losses import LossInputs

        shared = [f.name for f in fields(LossInputs) if f.name in _MICROBATCH_FIELDS]
        return LossInputs(**{k: getattr(self, k) for k in shared})


_MICROBATCH_FIELDS = {f.name for f in fields(MicroBatch)}
_TENSOR_FIELDS = tuple(f.name for f in fields(MicroBatch) if f.name not in ("num_sequences", "sequence_indices"))


def collate(
    rows: list[list[TrainSequence]],
    *,
    row_length: int,
    num_sequences: int,
    with_teacher: bool,
    top_k: int,
    with_rollout: bool,
    with_top1: bool = False,
    pad_id: int = 0,
) -> MicroBatch:
    """Lay sequences out in rows of `row_length` positions (see the module doc for the alignment)."""
    B, T = len(rows), row_length
    input_ids = np.full((B, T), pad_id, np.int64)
    target_ids = np.full((B, T), pad_id, np.int64)
    position_ids = np.zeros((B, T), np.int64)
    loss_mask = np.zeros((B, T), np.float32)
    seq_ids = np.full((B, T), -1, np.int64)
    teacher = np.zeros((B, T), np.float32) if with_teacher else None
    rollout = np.zeros((B, T), np.float32) if with_rollout else None
    topk_ids = np.zeros((B, T, top_k), np.int64) if top_k else None
    topk_lp = np.zeros((B, T, top_k), np.float32) if top_k else None
    top1 = np.zeros((B, T), np.int64) if with_top1 else None
    sid = 0
    indices = []
    for b, row in enumerate(rows):
        offset = 0
        for seq in row:
            P, R = len(seq.prompt_ids), len(seq.response_ids)
            full = np.concatenate([np.asarray(seq.prompt_ids, np.int64), np.asarray(seq.response_ids, np.int64)])
            n = len(full) - 1
            if n < 1:  # a one-token sequence predicts nothing; keep it for the per-sequence mean
                n, full = 1, np.concatenate([full, [pad_id]])
            span = slice(offset, offset + n)
            input_ids[b, span] = full[:-1]
            target_ids[b, span] = full[1:]
            position_ids[b, span] = np.arange(n)
            seq_ids[b, span] = sid
            # Targets that are response tokens: response t at position P + t - 1 (t >= 1 if P == 0).
            first_t = 0 if P > 0 else 1
            if R > first_t:
                resp = slice(offset + P + first_t - 1, offset + P + R - 1)
                loss_mask[b, resp] = 1.0
                if teacher is not None:
                    teacher[b, resp] = seq.teacher_logprobs[first_t:R]
                if rollout is not None:
                    rollout[b, resp] = seq.rollout_logprobs[first_t:R]
                if topk_ids is not None:
                    topk_ids[b, resp] = seq.topk_ids[first_t:R, :top_k]
                    topk_lp[b, resp] = seq.topk_logprobs[first_t:R, :top_k]
                if top1 is not None:  # the stored candidate with the highest log-prob
                    lp = np.asarray(seq.topk_logprobs[first_t:R])
                    top1[b, resp] = np.take_along_axis(np.asarray(seq.topk_ids[first_t:R]), lp.argmax(-1)[:, None], -1)[:, 0]
            offset += n
            sid += 1
            indices.append(seq.index)

    def t(a):
        return None if a is None else torch.from_numpy(a)

    return MicroBatch(
        input_ids=t(input_ids),
        position_ids=t(position_ids),
        target_ids=t(target_ids),
        loss_mask=t(loss_mask),
        seq_ids=t(seq_ids),
        num_sequences=num_sequences,
        teacher_logprobs=t(teacher),
        teacher_topk_ids=t(topk_ids),
        teacher_topk_logprobs=t(topk_lp),
        rollout_logprobs=t(rollout),
        teacher_top1_ids=t(top1),
        sequence_indices=indices,
    )


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True = masked: causal within a sequence, nothing across sequences.

    For the local (non-TE) attention, which takes an explicit mask. Padding (-1) attends
    causally among itself, so no softmax row is empty.
    """
    T = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def packed_seq_params(seq_ids: torch.Tensor):
    """Transformer Engine THD layout for one packed row: cu_seqlens over its sequences (+ padding)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if seq_ids.shape[0] != 1:
        raise ConfigError("packed sequences on Transformer Engine need micro_batch_size=1", "set data.micro_batch_size=1")
    ids = seq_ids[0]
    change = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    bounds = torch.cat([ids.new_zeros(1), change, ids.new_tensor([ids.numel()])]).to(torch.int32)
    max_len = int((bounds[1:] - bounds[:-1]).max().item())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=bounds,
        cu_seqlens_kv=bounds,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


# --------------------------------------------------------------------------------------
# The per-rank step iterator with an exact, DP-size-independent position.


@dataclass
class StepBatch:
    """What one DP rank trains on in one optimizer step."""

    consumed_before: int  # stream position at the start of the step
    global_indices: np.ndarray  # all DP ranks
    rank_indices: np.ndarray
    micro_batches: list[MicroBatch]
    row_length: int  # the longest micro-batch's row (all of them without dynamic batching)
    tokens: int  # real (non-padding) positions on this rank
    loss_tokens: int  # response-token targets on this rank
    sequence_tokens: tuple[int, ...] = ()  # positions of each sequence on this rank (attention FLOPs)


class TrainData:
    """Step batches for one DP rank; `consumed` (sequences, all ranks together) is the position."""

    def __init__(
        self,
        source: SequenceSource,
        *,
        global_batch: int,
        seq_length: int,
        micro_batch_size: int,
        seed: int,
        micro_batch_tokens: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        pack: bool = True,
        trim_padding: bool = True,
        pad_to_multiple: int = 8,
        with_teacher: bool = True,
        top_k: int = 0,
        with_top1: bool = False,
        with_rollout: bool = False,
        vocab_size: int | None = None,
        pad_id: int = 0,
        prefetch: bool = False,
    ):
        self.source = source
        self.global_batch = global_batch
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens  # > 0: dynamic batching (config.DataConfig)
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.pack = shuffle, pack
        self.trim_padding, self.pad_to_multiple = trim_padding, pad_to_multiple
        self.with_teacher, self.top_k, self.with_rollout = with_teacher, top_k, with_rollout
        self.with_top1 = with_top1  # only the teacher's top-1 id per position (a metric), not the top-k
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self.consumed = 0
        self._lengths = source.lengths()
        self._validate()
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
        self._pending: tuple[int, concurrent.futures.Future] | None = None

    def _validate(self) -> None:
        n = len(self._lengths)
        if n == 0:
            raise ArtifactError(f"{self.source.path}: holds no sequences", "check the data path")
        if self.global_batch % self.dp_size:
            raise ConfigError(
                f"data.global_batch={self.global_batch} is not divisible by the data-parallel size {self.dp_size}",
                "set data.global_batch to a multiple of the data-parallel size",
            )
        too_long = np.flatnonzero(self._lengths > self.seq_length)
        if len(too_long):
            i = int(too_long[0])
            raise ConfigError(
                f"{self.source.path}: sequence {i} has {int(self._lengths[i])} tokens, more than data.seq_length="
                f"{self.seq_length} ({len(too_long)} sequences too long)",
                "raise data.seq_length (up to the model's context) or cut the responses shorter when generating",
            )
        if self.with_teacher and not self.source.has_teacher:
            raise ArtifactError(f"{self.source.path}: has no teacher log-probs", "use the teacher store (data.store) for this loss")
        if self.with_top1 and not self.source.top_k:
            raise ArtifactError(f"{self.source.path}: holds no teacher top-k (needed for the top-1 agreement metric)", "turn the metric off or rescore with --top-k")
        if self.top_k and self.source.top_k < self.top_k:
            raise ArtifactError(f"{self.source.path}: stores top-{self.source.top_k}, the loss needs top-{self.top_k}", "rescore with a larger --top-k")
        if self.with_rollout and not self.source.has_rollout_logprobs:
            raise ArtifactError(f"{self.source.path}: has no rollout log-probs (drift monitor)", "regenerate the rollouts with log-probs recorded")

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def epoch(self) -> int:
        return self.consumed // len(self._lengths)

    # --- state for exact resume
    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "global_batch": self.global_batch, "num_sequences": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_sequences"]) != len(self):
            raise ArtifactError(
                f"{self.source.path}: holds {len(self)} sequences, the checkpoint was trained on {state['num_sequences']}",
                "resume with the same data (or start a new run dir)",
            )
        self.consumed = int(state["consumed"])  # a prefetched step for another position is dropped in next_step

    # --- building
    def build_step(self, consumed: int) -> StepBatch:
        """The step starting at stream position `consumed` for this rank (a pure function of it)."""
        global_idx = step_indices(len(self._lengths), consumed, self.global_batch, self.seed, self.shuffle)
        mine = split_across_ranks(global_idx, self._lengths, self.dp_size)[self.dp_rank]
        budget = self.micro_batch_tokens
        rows = pack_rows(mine, self._lengths, budget or self.seq_length, self.pack)
        fetched = {s.index: s for s in self.source.fetch(sorted(int(i) for i in mine))}
        if self.vocab_size is not None:
            self._check_vocab(fetched.values())
        positions = {int(i): max(int(self._lengths[i]) - 1, 1) for i in mine}
        used = [sum(positions[i] for i in row) for row in rows]
        m = self.pad_to_multiple
        if budget:  # dynamic batching: one row per micro-batch, each trimmed to what it holds
            groups = [[row] for row in rows]
            lengths = [-(-u // m) * m for u in used]
        else:  # fixed micro-batches of micro_batch_size rows, all of one length
            groups = [rows[start : start + self.micro_batch_size] for start in range(0, len(rows), self.micro_batch_size)]
            row_length = min(self.seq_length, -(-max(used) // m) * m) if self.trim_padding else self.seq_length
            lengths = [row_length] * len(groups)
        rows_per_micro_batch = 1 if budget else self.micro_batch_size
        micro_batches = []
        for rows_of_mb, row_length in zip(groups, lengths):
            group = [[fetched[i] for i in row] for row in rows_of_mb]
            group += [[] for _ in range(rows_per_micro_batch - len(group))]  # fixed B: empty rows are padding
            micro_batches.append(
                collate(
                    group,
                    row_length=row_length,
                    num_sequences=self.global_batch,
                    with_teacher=self.with_teacher,
                    top_k=self.top_k,
                    with_top1=self.with_top1,
                    with_rollout=self.with_rollout,
                    pad_id=self.pad_id,
                )
            )
        return StepBatch(
            consumed_before=consumed,
            global_indices=global_idx,
            rank_indices=mine,
            micro_batches=micro_batches,
            row_length=max(lengths),
            tokens=int(sum(used)),
            loss_tokens=int(sum(mb.num_loss_tokens for mb in micro_batches)),
            sequence_tokens=tuple(positions[int(i)] for i in mine),
        )

    def _check_vocab(self, sequences) -> None:
        for s in sequences:
            top = max(int(np.max(s.prompt_ids, initial=0)), int(np.max(s.response_ids, initial=0)))
            if top >= self.vocab_size:
                raise ArtifactError(
                    f"{self.source.path}: sequence {s.index} has token id {top}, outside the model's vocabulary of {self.vocab_size}",
                    "use data produced with the student's tokenizer",
                )

    def next_step(self) -> StepBatch:
        """The step at the current position; advances it. Prefetches the following step."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == self.consumed:
            batch = pending[1].result()
        else:
            if pending is not None:  # the position moved (resume): let the stale read finish, one reader at a time
                pending[1].exception()
            batch = self.build_step(self.consumed)
        self.consumed += self.global_batch
        if self._pool is not None:
            self._pending = (self.consumed, self._pool.submit(self.build_step, self.consumed))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --------------------------------------------------------------------------------------
# What the trainer iterates, and where it comes from.


class DataStream(Protocol):
    """One `StepBatch` per optimizer step with a resumable position: `TrainData` (store or SFT
    artifact) and the demo's online OPD stream (`demo/online.py`) implement it."""

    consumed: int  # sequences consumed so far (the data position, all DP ranks together)

    def __len__(self) -> int: ...  # sequences per epoch
    def next_step(self) -> StepBatch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


class DataProvider(Protocol):
    """Where a run's data comes from. `open` runs on rank 0 in preflight (the source, the inputs'
    `Lineage`, the provenance record); `reopen` on the other ranks; `stream` on every rank once
    the model exists (it may read `trainer.start`, `.source`, `.dp_rank`, `.use_te`, ...)."""

    def requires_lineage(self, config) -> bool: ...  # the SFT data's writer and the start must be known (Lineage.check)
    def open(self, config, start) -> tuple[SequenceSource, Any, dict[str, Any]]: ...
    def reopen(self, config) -> SequenceSource: ...
    def stream(self, trainer) -> DataStream: ...


class OfflineData:
    """The data of Lightning OPD and SFT, from disk: the teacher store or the SFT artifact."""

    def requires_lineage(self, config) -> bool:
        """Distilling from a store: its teacher must have written the SFT data, its rollouts come from the start."""
        from megatron_lopd.training.losses import loss_spec

        return loss_spec(config.loss).distills

    def reopen(self, config) -> SequenceSource:
        from megatron_lopd.training.losses import loss_spec

        spec = loss_spec(config.loss)
        if not spec.distills:
            return ArtifactSource.open(config.data.sft_data)
        source = StoreSource.open(config.data.store, load_topk=spec.needs_topk or config.logging.top1_agreement)
        if spec.needs_topk and not source.top_k:
            raise ArtifactError(f"{config.data.store}: the store holds no teacher top-k, which loss {config.loss!r} needs",
                                "rescore with `lopd score --top-k K`, or use loss=lightning_opd")
        return source

    def open(self, config, start):
        from megatron_lopd.artifacts import RolloutArtifact
        from megatron_lopd.provenance import Lineage
        from megatron_lopd.store import check_store_files
        from megatron_lopd.store.style import residualized_record

        source = self.reopen(config)
        record: dict[str, Any] = {"start_from": str(start.path) if start.path else config.model.named, "start_fingerprint": start.fingerprint}
        tokenizers = {"student": start.tokenizer_fingerprint}
        if not self.requires_lineage(config):
            art = source.artifact
            record.update(sft_data=str(source.path), sft_data_fingerprint=art.fingerprint, sft_data_generator=art.generator_fingerprint)
            return source, Lineage(tokenizers={**tokenizers, "sft_data": art.tokenizer_fingerprint}), record
        check_store_files(source.path)  # a damaged shard fails here in a second, not hours into the run
        prov = source.provenance
        tokenizers["store"] = prov.tokenizer_fingerprint
        sft_writer = config.teacher_consistency.sft_data_generator or None
        if config.data.sft_data:
            art = RolloutArtifact.open(config.data.sft_data)
            sft_writer, tokenizers["sft_data"] = art.generator_fingerprint, art.tokenizer_fingerprint
            record["sft_data_fingerprint"] = art.fingerprint
        meta = source.store.meta
        lineage = Lineage(teacher=prov.teacher_fingerprint, sft_data_writer=sft_writer,
                          rollout_policy=prov.rollout_generator_fingerprint or None,
                          start=start.fingerprint, start_where=start.where, start_random=start.kind == "named", tokenizers=tokenizers,
                          teacher_residualized=meta.residualized)
        record.update(
            store=str(source.path),
            store_finalized_at=meta.finalized_at,  # which scoring of the rollouts (a rescore changes it)
            store_teacher_signal=meta.teacher_signal,
            **({"style_residualized": residualized_record(prov)} if meta.residualized else {}),
            teacher_fingerprint=prov.teacher_fingerprint,
            store_tokenizer=prov.tokenizer_fingerprint,
            rollouts_fingerprint=prov.rollouts_fingerprint,
            rollout_policy=lineage.rollout_policy,
            sft_data_generator=sft_writer,
        )
        return source, lineage, record

    def stream(self, trainer) -> "TrainData":
        from megatron_lopd.training.losses import loss_spec
        from megatron_lopd.training.preflight import row_multiple

        cfg, d, source, q = trainer.config, trainer.config.data, trainer.source, trainer.start.qwen3
        spec = loss_spec(cfg.loss)
        if trainer.use_te and d.pack and d.micro_batch_size != 1 and not d.micro_batch_tokens:
            raise ConfigError("packed sequences on Transformer Engine need data.micro_batch_size=1", "set data.micro_batch_size=1 (raise seq_length instead)")
        # Top-k losses read the teacher's top-k; otherwise only its top-1 id, for the agreement metric.
        top_k = source.top_k if spec.needs_topk else 0
        return TrainData(
            source, global_batch=d.global_batch, seq_length=d.seq_length, micro_batch_size=d.micro_batch_size, seed=d.seed,
            micro_batch_tokens=d.micro_batch_tokens,
            dp_rank=trainer.dp_rank, dp_size=trainer.dp_size, shuffle=d.shuffle, pack=d.pack,
            trim_padding=d.trim_padding and cfg.parallel.pipeline_parallel == 1,  # pipeline stages exchange fixed shapes
            pad_to_multiple=row_multiple(cfg), with_teacher=spec.distills, top_k=top_k,
            with_top1=not top_k and bool(source.top_k) and cfg.logging.top1_agreement,
            with_rollout=spec.distills and source.has_rollout_logprobs, vocab_size=q.vocab_size,
            pad_id=q.pad_token_id if isinstance(q.pad_token_id, int) else 0, prefetch=d.prefetch,
        )
