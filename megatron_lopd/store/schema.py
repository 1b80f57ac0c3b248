"""Teacher store schema: what one sequence holds, how it is validated and encoded on disk.

A teacher store is a zarr v3 hierarchy (a directory) holding, for every scored rollout
(sequence ``i`` of the store is record ``i`` of the rollout artifact):

===================  ===================  ====================================================
field                dtype (in memory)    meaning
===================  ===================  ====================================================
prompt_ids           int32 (P,)           prompt token ids
response_ids         int32 (R,)           sampled response token ids
teacher_logprobs     float32 (R,)         log T(a_t | prompt, a_<t) of each sampled token
topk_ids             int32 (R, k)         the teacher's top-k ids at each response position
topk_logprobs        float16 (R, k)       their log-probs, sorted descending per position
rollout_logprobs     float32 (R,)         the rollout policy's log-prob of each sampled token
                                          (optional; feeds the drift monitor and the
                                          cross-teacher correction, `store.style`)
prompt_id            str                  the prompt's id in its source dataset
sample_index         int                  which of the n samples of that prompt
content_hash         str (16 hex)         blake2b-64 of (prompt ids, response ids); derived
===================  ===================  ====================================================

``k = 0`` stores the sampled-token log-prob only (what the paper stores); then
``topk_ids``/``topk_logprobs`` are None. All log-probs are at temperature 1. A store
whose ``teacher_signal`` is ``style_residualized`` (written by `store.style`) holds
corrected scores instead; see TEACHER_SIGNALS.

Layout on disk (schema version 2)::

    STORE/zarr.json                  root group; attributes["lopd_teacher_store"] = StoreMeta
    STORE/shards/NNNNNN/             one zarr group per store shard (a contiguous range of
                                     sequence indices), written whole by exactly one writer
        prompt_ids        int32 (P_s,)     all prompts of the shard, concatenated
        response_ids      int32 (R_s,)     all responses, each starting on a chunk boundary
        teacher_logprobs  float32 (R_s,)
        rollout_logprobs  float32 (R_s,)   only if has_rollout_logprobs
        topk_ids          int32 (k, R_s)   rank-major; row 0 stored as topk_ids[:, 0] - response_ids,
                                           rows 1..k-1 as indices into topk_vocabulary
        topk_vocabulary   int32 (V_s,)     distinct ids of ranks 2..k in the shard, most frequent first
        topk_logprobs     uint16 (k, R_s)  rank-major float16 bit patterns of -logprob,
                                           delta-coded along the rank axis; row 0 stored
                                           minus the code of -teacher_logprobs
        prompt_lens, response_lens, sample_index (int32), content_hash (uint64),
        prompt_id (str): one entry per sequence of the shard
    STORE/markers/NNNNNN.json        per-shard done marker (written last, atomically)
    STORE/sequences/*                per-sequence arrays of the whole store, gathered by
                                     the finalizer so a reader opens in one read per array

Ragged token arrays: each store shard has its own arrays, sized exactly to the tokens of
its sequences at write time, so a writer owns every storage object it writes and there
is no token capacity to overflow: a sequence of any length fits (no spill policy needed).
Token arrays use the zarr sharding codec with one zarr shard (one file) per array per
store shard, inner chunks of ``chunk_tokens`` positions, each compressed with
Blosc(zstd, byte-shuffle) and followed by a crc32c; the shard index has its own crc32c.
On the response axis each sequence starts on a multiple of ``chunk_tokens`` (zero
padding between sequences, nearly free after compression and cheap to decode): a
random read decodes ceil(R / chunk_tokens) chunks that hold only that sequence instead
of up to one extra chunk shared with its neighbours. ``R_s`` is therefore the sum of the
padded lengths (`aligned_starts`). ``chunk_tokens`` = 2048 measured best for random
32-sequence batches of ~1.5k-token responses (1024: more per-chunk overhead; 8192: more
padding decoded); it hardly changes the size (50.5 / 50.1 / 49.7 B/token at 1024 / 2048
/ 8192, k = 16). Blosc ``clevel`` 3 by default: clevel 5 is 1.6 % smaller at k = 16 but
compresses 3x slower, and the writer runs inline in the scoring process.

Encodings (why): top-k ids are stored rank-major so row 0 (mostly the sampled token)
becomes a near-zero residual against ``response_ids``. The other ranks are spread over
the vocabulary; what makes them compressible is that a few thousand tokens dominate
them, but Blosc-zstd codes each byte plane separately, so an id's low byte is nearly
incompressible unless the frequent ids are small numbers. The per-shard vocabulary makes
them small whatever order the tokenizer gives its ids: rank-2..k ids become their index
in the shard's own frequency order (building it is one ``bincount``, reading it one
``take``). Top-k log-probs are kept exactly at
float16 precision (max probability error 1.8e-4): the float16 bit pattern of ``-logprob``
is a non-negative float, whose bit patterns are ordered like the values, so the
descending log-probs become ascending uint16 codes whose rank-to-rank differences are small
and compress better than the raw halves; row 0 is stored against the code of the sampled
token's own log-prob (zero wherever the sampled token is the teacher's top-1). Decoding is
one subtraction, a running sum over the k rows (vectorised over positions) and one sign
bit, so it costs little when reading. Measured with benchmarks/bench_store.py at k = 16
against plain Blosc-zstd: ids 24.6 -> 23.2 B/token (22.3 + 0.8 for the vocabulary) when the
tokenizer's ids follow token frequency, 34.0 -> 23.4 when they do not (``--permute-ids``);
log-probs 21.2 -> 17.0. The order-0 entropy of the encoded symbols is 19.1 (ids) and 15.2
(log-probs) B/token: what is left over is Blosc-zstd coding byte planes separately.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from megatron_lopd.errors import ArtifactError, ConfigError

SCHEMA_VERSION = 2  # 2: top-k ids of ranks 2..k through a per-shard vocabulary
ROOT_ATTR = "lopd_teacher_store"
SHARDS_DIR = "shards"
MARKERS_DIR = "markers"
SEQUENCES_DIR = "sequences"

# Per-token arrays (prompt axis or response axis), sharded. Name -> stored dtype.
PROMPT_ARRAYS = {"prompt_ids": "int32"}
RESPONSE_ARRAYS = {"response_ids": "int32", "teacher_logprobs": "float32", "rollout_logprobs": "float32"}
TOPK_ARRAYS = {"topk_ids": "int32", "topk_logprobs": "uint16"}
TOPK_VOCABULARY = "topk_vocabulary"  # per shard, int32: the ids that rows 1..k-1 of topk_ids index
# Per-sequence arrays (one entry per sequence), in each shard and, after finalize, store-wide.
SEQUENCE_ARRAYS = {
    "prompt_lens": "int32",
    "response_lens": "int32",
    "sample_index": "int32",
    "content_hash": "uint64",
    "prompt_id": "str",
}
ENCODINGS = {
    "topk_ids": "rank-major (k, R); row 0 stored as topk_ids[:, 0] - response_ids; rows 1..k-1 as indices into "
                "the shard's topk_vocabulary (its distinct ids, most frequent first)",
    "topk_logprobs": "rank-major (k, R) uint16: float16 bit patterns of -logprob, delta-coded along rank; "
                     "row 0 minus the float16 bit pattern of -teacher_logprobs",
}

# Log-probs a little above 0 come from rounding in a log-softmax; they are clamped to 0.
# Anything larger is a bug upstream (not a log-probability) and is rejected.
LOGPROB_POSITIVE_TOLERANCE = 1e-4
# The sampled token's log-prob must equal its top-k entry (where it is in the top-k) up to
# float16 rounding of the top-k value plus bf16-level slack: catches off-by-one alignment.
SAMPLED_VS_TOPK_RTOL = 4e-3
SAMPLED_VS_TOPK_ATOL = 1e-3

# What `teacher_logprobs` holds. A style-residualized store (`store.style`) holds the teacher's
# log-prob minus an estimated style offset: a corrected score that may be above 0 and that
# its (separately corrected, renormalised) top-k entries need not equal.
TEACHER_LOGPROBS = "logprob"
STYLE_RESIDUALIZED = "style_residualized"
TEACHER_SIGNALS = (TEACHER_LOGPROBS, STYLE_RESIDUALIZED)


class RecordError(ArtifactError):
    """A record handed to the writer is invalid; the message names the sequence index."""


# ---------------------------------------------------------------------------------------
# Records and provenance


def content_hash(prompt_ids: np.ndarray, response_ids: np.ndarray) -> str:
    """blake2b-64 (hex) of the token ids; lengths are hashed so the split point counts."""
    h = hashlib.blake2b(digest_size=8)
    for ids in (prompt_ids, response_ids):
        ids = np.ascontiguousarray(ids, dtype="<i4")
        h.update(np.int64(ids.size).tobytes())
        h.update(ids.tobytes())
    return h.hexdigest()


def hash_to_uint64(hex_hash: str) -> int:
    return int(hex_hash, 16)


def uint64_to_hash(value: int) -> str:
    return f"{int(value):016x}"


@dataclass(eq=False)  # arrays: compare fields explicitly
class SequenceRecord:
    """One scored rollout. Arrays as in the module docstring; ``index`` is set by the reader.

    The reader returns ``topk_ids``/``topk_logprobs`` as (R, k) views of rank-major
    buffers (not C-contiguous; ``np.ascontiguousarray`` or ``torch.from_numpy`` handle it).
    """

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    teacher_logprobs: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    rollout_logprobs: np.ndarray | None = None
    prompt_id: str = ""
    sample_index: int = 0
    index: int | None = None

    @property
    def content_hash(self) -> str:
        return content_hash(self.prompt_ids, self.response_ids)

    @property
    def num_tokens(self) -> int:
        return int(len(self.response_ids))


# Fields that may differ between two writers of one store (a resumed run on a later commit).
_VOLATILE_PROVENANCE = ("code_version", "created_at")


def _default_code_version() -> str:
    from megatron_lopd.provenance import code_version

    return code_version()


@dataclass
class StoreProvenance:
    """Where the scores come from. ``extra``: free-form (e.g. {"scoring_dtype": "bf16"})."""

    teacher_fingerprint: str
    tokenizer_fingerprint: str
    chat_template: str | None = None
    rollouts_fingerprint: str = ""
    rollout_generator_fingerprint: str = ""
    engine: str = ""
    engine_version: str = ""
    code_version: str = field(default_factory=_default_code_version)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreProvenance":
        """Known keys become fields; unknown keys go to ``extra``."""
        d = dict(d)
        extra = dict(d.pop("extra", None) or {})
        known = {k: d.pop(k) for k in list(d) if k in _PROVENANCE_FIELDS}
        extra.update(d)
        return cls(**known, extra=extra)

    @classmethod
    def coerce(cls, value: "StoreProvenance | dict[str, Any]") -> "StoreProvenance":
        prov = value if isinstance(value, cls) else cls.from_dict(value)
        for name in ("teacher_fingerprint", "tokenizer_fingerprint"):
            if not getattr(prov, name):
                raise ConfigError(
                    f"teacher store provenance: {name} is empty",
                    "pass the fingerprint from megatron_lopd.provenance (model_fingerprint / tokenizer_fingerprint)",
                )
        return prov

    def comparable(self) -> dict[str, Any]:
        """The fields two writers of one store must agree on."""
        return {k: v for k, v in self.to_dict().items() if k not in _VOLATILE_PROVENANCE}

    def get(self, key: str) -> Any:
        if key in _PROVENANCE_FIELDS:
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise ConfigError(
            f"teacher store provenance has no field {key!r}",
            f"require one of {', '.join(_PROVENANCE_FIELDS)} or a key of provenance.extra",
        )


_PROVENANCE_FIELDS = tuple(f.name for f in fields(StoreProvenance) if f.name != "extra")


@dataclass
class StoreMeta:
    """The root attributes. Written by the creator (complete=False) and by the finalizer."""

    num_sequences: int
    top_k: int
    vocab_size: int
    sequences_per_shard: int
    has_rollout_logprobs: bool
    provenance: StoreProvenance
    chunk_tokens: int = 2048
    clevel: int = 3
    teacher_signal: str = TEACHER_LOGPROBS  # one of TEACHER_SIGNALS
    schema_version: int = SCHEMA_VERSION
    complete: bool = False
    # Filled by the finalizer.
    prompt_tokens: int | None = None
    response_tokens: int | None = None
    nbytes: int | None = None
    finalized_at: str | None = None

    @property
    def num_shards(self) -> int:
        return -(-self.num_sequences // self.sequences_per_shard)

    @property
    def residualized(self) -> bool:
        return self.teacher_signal == STYLE_RESIDUALIZED

    def dtypes(self) -> dict[str, str]:
        out = {**PROMPT_ARRAYS, **RESPONSE_ARRAYS, **SEQUENCE_ARRAYS}
        if not self.has_rollout_logprobs:
            out.pop("rollout_logprobs")
        if self.top_k:
            out.update({"topk_ids": "int32", "topk_logprobs": "float16 (stored as uint16 codes)"})
        return out

    def to_attrs(self) -> dict[str, Any]:
        d = asdict(self)
        d["provenance"] = self.provenance.to_dict()
        d["dtypes"] = self.dtypes()
        d["encodings"] = ENCODINGS if self.top_k else {}
        return d

    @classmethod
    def from_attrs(cls, d: dict[str, Any], where: str) -> "StoreMeta":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}: unknown teacher store schema version {version!r} (this code reads {SCHEMA_VERSION})",
                "read it with the megatron-lopd version that wrote it, or rescore with this one",
            )
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        try:
            known["provenance"] = StoreProvenance.from_dict(known["provenance"])
            meta = cls(**known)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{where}: malformed teacher store attributes ({exc})", "rescore the store") from exc
        if meta.teacher_signal not in TEACHER_SIGNALS:
            raise ArtifactError(f"{where}: unknown teacher signal {meta.teacher_signal!r} (this code reads {', '.join(TEACHER_SIGNALS)})",
                                "read it with the megatron-lopd version that wrote it")
        return meta

    def layout_key(self) -> dict[str, Any]:
        """What a second `create` must match to reuse the store."""
        return {
            "schema_version": self.schema_version,
            "num_sequences": self.num_sequences,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "sequences_per_shard": self.sequences_per_shard,
            "has_rollout_logprobs": self.has_rollout_logprobs,
            "chunk_tokens": self.chunk_tokens,
            "clevel": self.clevel,
            "teacher_signal": self.teacher_signal,
            "provenance": self.provenance.comparable(),
        }


# ---------------------------------------------------------------------------------------
# Validation (writer side): every problem names the sequence index.


def _fail(index: int, record: SequenceRecord, what: str, fix: str) -> RecordError:
    return RecordError(f"teacher store record for sequence {index} (prompt_id {record.prompt_id!r}): {what}", fix)


def _int_ids(index: int, rec: SequenceRecord, name: str, ids: Any, vocab_size: int, ndim: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != ndim or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise _fail(index, rec, f"{name} must be a {ndim}-D integer array, got {arr.dtype} {arr.shape}",
                    "pass token ids as np.int32 arrays")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(np.flatnonzero((arr.reshape(-1) < 0) | (arr.reshape(-1) >= vocab_size))[0])
        raise _fail(index, rec, f"{name} has token id {int(arr.reshape(-1)[bad])} outside the vocabulary [0, {vocab_size})",
                    "check the tokenizer / vocab_size the store was created with")
    return arr.astype(np.int32, copy=False)


def _logprobs(index: int, rec: SequenceRecord, name: str, values: Any, shape: tuple[int, ...], *, score: bool = False) -> np.ndarray:
    """Finite log-probs <= 0 (rounding above 0 clamped); ``score``: any finite value (a corrected score)."""
    arr = np.asarray(values)
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
        raise _fail(index, rec, f"{name} must be a float array of shape {shape}, got {arr.dtype} {arr.shape}",
                    "one log-prob per response position (top-k: R x k)")
    bad = ~np.isfinite(arr) | (False if score else arr > LOGPROB_POSITIVE_TOLERANCE)
    if bad.any():
        pos = np.argwhere(bad)[0]
        raise _fail(index, rec, f"{name} has an invalid log-prob {float(arr[tuple(pos)])} at position {tuple(int(p) for p in pos)}",
                    "log-probs must be finite and <= 0 (temperature-1 log-softmax); check the scorer")
    return arr if score else np.minimum(arr, 0)


def validate_record(rec: SequenceRecord, index: int, *, top_k: int, vocab_size: int, has_rollout_logprobs: bool,
                    teacher_signal: str = TEACHER_LOGPROBS) -> SequenceRecord:
    """Checked, normalised copy of ``rec`` (int32 ids, float32 / float16 log-probs).

    Rejects: ids outside [0, vocab_size), non-finite or positive log-probs, wrong shapes,
    top-k rows not sorted descending or with repeated ids, a sampled token whose log-prob
    disagrees with its own top-k entry (an alignment bug in the scorer), a missing or
    unexpected rollout_logprobs. A style-residualized store's `teacher_logprobs` are
    corrected scores: only finiteness is checked (see TEACHER_SIGNALS).
    """
    residualized = teacher_signal == STYLE_RESIDUALIZED
    if not isinstance(rec, SequenceRecord):
        raise RecordError(f"teacher store record for sequence {index}: expected a SequenceRecord, got {type(rec).__name__}",
                          "build records with megatron_lopd.store.SequenceRecord")
    prompt = _int_ids(index, rec, "prompt_ids", rec.prompt_ids, vocab_size, 1)
    response = _int_ids(index, rec, "response_ids", rec.response_ids, vocab_size, 1)
    n = len(response)
    teacher = _logprobs(index, rec, "teacher_logprobs", rec.teacher_logprobs, (n,), score=residualized).astype(np.float32)
    rollout = None
    if has_rollout_logprobs:
        if rec.rollout_logprobs is None:
            raise _fail(index, rec, "rollout_logprobs is missing but the store was created with has_rollout_logprobs=True",
                        "pass the rollout policy's log-probs, or create the store with has_rollout_logprobs=False")
        rollout = _logprobs(index, rec, "rollout_logprobs", rec.rollout_logprobs, (n,)).astype(np.float32)
    elif rec.rollout_logprobs is not None:
        raise _fail(index, rec, "rollout_logprobs given but the store was created with has_rollout_logprobs=False",
                    "create the store with has_rollout_logprobs=True or drop them")
    topk_ids = topk_lp = None
    if top_k == 0:
        for name in ("topk_ids", "topk_logprobs"):
            value = getattr(rec, name)
            if value is not None and np.asarray(value).size:
                raise _fail(index, rec, f"{name} given but the store has top_k=0", "create the store with top_k=k")
    else:
        if rec.topk_ids is None or rec.topk_logprobs is None:
            raise _fail(index, rec, f"topk_ids/topk_logprobs missing but the store has top_k={top_k}",
                        "pass the teacher's top-k, or create the store with top_k=0")
        topk_ids = _int_ids(index, rec, "topk_ids", rec.topk_ids, vocab_size, 2)
        if topk_ids.shape != (n, top_k):
            raise _fail(index, rec, f"topk_ids has shape {topk_ids.shape}, expected {(n, top_k)}",
                        "one row of k ids per response position")
        lp = _logprobs(index, rec, "topk_logprobs", rec.topk_logprobs, (n, top_k))
        unsorted = lp[:, 1:] > lp[:, :-1]
        if unsorted.any():
            t, j = (int(v) for v in np.argwhere(unsorted)[0])
            raise _fail(index, rec, f"topk_logprobs not sorted descending at position {t} (rank {j}: {lp[t, j]} < rank {j + 1}: {lp[t, j + 1]})",
                        "sort each position's top-k by log-prob, descending (ids in the same order)")
        if top_k > 1:
            s = np.sort(topk_ids, axis=1)
            dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if dup.any():
                t = int(np.flatnonzero(dup)[0])
                raise _fail(index, rec, f"topk_ids repeat a token at position {t}: {topk_ids[t].tolist()}",
                            "top-k ids must be distinct per position")
        if not residualized:
            _check_sampled_against_topk(index, rec, response, teacher, topk_ids, lp)
        topk_lp = lp.astype(np.float16)
    return SequenceRecord(prompt, response, teacher, topk_ids, topk_lp, rollout, str(rec.prompt_id),
                          int(rec.sample_index), index)


def _check_sampled_against_topk(index, rec, response, teacher, topk_ids, topk_lp) -> None:
    if not len(response):
        return
    hit = topk_ids == response[:, None]
    in_topk = hit.any(axis=1)
    lp_f = topk_lp.astype(np.float32)
    tol = SAMPLED_VS_TOPK_ATOL + SAMPLED_VS_TOPK_RTOL * np.abs(teacher)
    own = np.where(in_topk, (lp_f * hit).sum(axis=1), teacher)
    bad = np.abs(own - teacher) > tol
    # A sampled token outside the top-k cannot be more likely than the k-th candidate.
    bad |= ~in_topk & (teacher > lp_f[:, -1] + tol)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        where = f"its top-k entry is {own[t]}" if in_topk[t] else f"it is not in the top-k whose last log-prob is {lp_f[t, -1]}"
        raise _fail(index, rec, f"teacher_logprobs[{t}] = {teacher[t]} for sampled token {int(response[t])} but {where}",
                    "score position t with log p(a_t | prompt, a_<t) for both fields (check the one-position shift)")


def aligned_starts(lens: np.ndarray, align: int) -> np.ndarray:
    """Start of each sequence when every sequence starts on a multiple of ``align``."""
    padded = -(-np.asarray(lens, dtype=np.int64) // align) * align
    return np.cumsum(padded) - padded


def aligned_positions(lens: np.ndarray, align: int) -> tuple[np.ndarray, int]:
    """(index of every real position in the aligned layout, in sequence order; its length).

    ``aligned[..., positions] = concatenated`` lays sequences out; ``aligned[..., positions]``
    drops the padding again.
    """
    lens = np.asarray(lens, dtype=np.int64)
    padded = -(-lens // align) * align
    shift = np.cumsum(padded - lens) - (padded - lens)  # padding before each sequence
    return np.repeat(shift, lens) + np.arange(int(lens.sum()), dtype=np.int64), int(padded.sum())


# ---------------------------------------------------------------------------------------
# Encodings of the top-k arrays (see the module docstring).


def _neg_half_code(logprobs: np.ndarray) -> np.ndarray:
    """uint16 bit pattern of float16(-logprob); ordered like the values (+ 0 turns -0.0 into +0.0)."""
    return (np.negative(logprobs.astype(np.float16)) + np.float16(0)).view(np.uint16)


def encode_topk(response_ids: np.ndarray, teacher_logprobs: np.ndarray, topk_ids: np.ndarray,
                topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R, k) ids and float16 log-probs -> rank-major stored (int32 ids, uint16 codes, int32 vocabulary).

    The vocabulary lists the distinct ids of ranks 2..k, most frequent first (ties: smaller
    id first); those rows store each id's index in it.
    """
    ids = np.ascontiguousarray(topk_ids.T, dtype=np.int32)
    codes = np.ascontiguousarray(_neg_half_code(topk_logprobs).T)
    vocabulary = np.empty(0, dtype=np.int32)
    if ids.size:
        ids[0] -= response_ids
        if len(ids) > 1:
            counts = np.bincount(ids[1:].ravel())  # O(n + vocab): much cheaper than np.unique
            vocabulary = np.argsort(-counts, kind="stable")[:np.count_nonzero(counts)].astype(np.int32)
            index = np.empty(len(counts), dtype=np.int32)
            index[vocabulary] = np.arange(len(vocabulary), dtype=np.int32)
            ids[1:] = index[ids[1:]]
        if len(codes) > 1:
            codes[1:] = np.diff(codes, axis=0)  # >= 0: sorted log-probs give ascending codes
        codes[0] -= _neg_half_code(teacher_logprobs)  # uint16 wrap-around is undone on decode
    return ids, codes, vocabulary


def decode_topk_inplace(response_ids: np.ndarray, teacher_logprobs: np.ndarray, ids: np.ndarray,
                        codes: np.ndarray, vocabulary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_topk` on rank-major (k, R) buffers; returns (R, k) views.

    An index outside ``vocabulary`` raises IndexError (a store that passed its checksums
    cannot hold one unless it was written by other code; callers name the shard).
    """
    if ids.size:
        ids[0] += response_ids
        if len(ids) > 1:
            np.take(vocabulary, ids[1:], out=ids[1:])
        codes[0] += _neg_half_code(teacher_logprobs)
    for j in range(1, len(codes)):
        np.add(codes[j], codes[j - 1], out=codes[j])
    codes |= np.uint16(0x8000)  # sign bit: -x for the stored x >= 0
    return ids.T, codes.view(np.float16).T
