"""`lopd generate`: prompts -> a rollout artifact (SFT data from the teacher, rollouts from the SFT student).

Work is cut into chunks of prompts (see `artifact.py`); `--shard I/N` processes the
chunks c with c % N == I, any number of such processes (SLURM array or srun tasks) may
run at once, and a rerun skips chunks already written. Whichever process finds every
chunk written writes the manifest; the result is the same however the work was split,
because each sample's seed comes from (seed, prompt index, sample index).

Refused before the model is loaded: an unwritable ``--out`` (one line naming it), and
with ``--overwrite`` an ``--out`` that is not provably a rollout artifact (nothing is
deleted). A generator whose logits are NaN/inf is refused naming the model, before the
chunk is written (both backends check the sampled tokens' log-probs).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.artifacts import ARTIFACT_KINDS, ArtifactWriter, RolloutArtifact, RolloutRecord
from megatron_lopd.artifacts import FINISH_STOP
from megatron_lopd.generation.backends import engine_context, load_backend
from megatron_lopd.generation.base import SamplingParams, inspect_model_dir
from megatron_lopd.runtime.shards import Shard


@dataclass
class GenerateConfig:
    """What `lopd generate` needs. `shard`: this worker's chunks (`runtime.shards.parse_shard`)."""

    model: Path
    prompts: Path
    out: Path
    kind: str = "rollouts"  # "rollouts" (student on OPD prompts) | "sft_data" (teacher on SFT prompts)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    backend: str = "vllm"
    dtype: str = "float32"
    tensor_parallel: int = 1
    max_model_len: int | None = None
    thinking: bool | None = None  # enable_thinking for the chat template; None: the template's default
    chunk_size: int = 256  # prompts per chunk: the unit of resume and sharding, and one engine batch
    shard: Shard = Shard()
    overwrite: bool = False
    progress: bool = True
    backend_options: dict = field(default_factory=dict)


@dataclass
class GenerateResult:
    out: Path
    chunks_written: int
    chunks_missing: int  # chunks no process has written yet (other shards still running)
    artifact: RolloutArtifact | None  # set once the artifact is complete


def _plan(cfg: GenerateConfig, prompt_set, tokenizer_dir: Path) -> dict:
    from megatron_lopd.provenance import chat_template, model_fingerprint, tokenizer_fingerprint

    return {
        "kind": cfg.kind,
        "producer": {
            "generator_fingerprint": model_fingerprint(cfg.model),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
            "chat_template": chat_template(tokenizer_dir),
            "backend": cfg.backend,
            "dtype": cfg.dtype,
            "model_path": str(Path(cfg.model).resolve()),
        },
        "inputs": {
            "prompts_fingerprint": prompt_set.fingerprint,
            "prompts_path": str(Path(cfg.prompts).resolve()),
            "num_prompts": len(prompt_set),
        },
        # Only what can change the bytes: not max_model_len (one that would cut a response is refused),
        # the memory fraction or the engine layout, so a rerun may change them.
        "params": {**cfg.sampling.to_dict(), "thinking": cfg.thinking},
        "layout": {
            "num_prompts": len(prompt_set),
            "n": cfg.sampling.n,
            "chunk_size": cfg.chunk_size,
            "has_logprobs": cfg.sampling.record_logprobs,
        },
    }


def _records(prompt_set, start: int, samples, tokenizer) -> list[RolloutRecord]:
    """Artifact records of prompts start, start+1, ... from a backend's samples (text without the final EOS)."""
    records = []
    for p, per_prompt in enumerate(samples, start):
        prompt_ids = np.asarray(prompt_set.token_ids[p], np.int32)
        for j, s in enumerate(per_prompt):
            body = s.response_ids[:-1] if s.finish_reason == FINISH_STOP else s.response_ids
            records.append(RolloutRecord(
                prompt_id=prompt_set.ids[p], sample_index=j, prompt_ids=prompt_ids,
                response_ids=np.asarray(s.response_ids, np.int32), finish_reason=s.finish_reason,
                text=tokenizer.decode(body, skip_special_tokens=False),
                logprobs=None if s.logprobs is None else np.asarray(s.logprobs, np.float32), prompt_index=p))
    return records


def generate_artifact(cfg: GenerateConfig, backend=None) -> GenerateResult:
    """Generate this shard's missing chunks; write the manifest when every chunk exists.

    `backend`: an already loaded backend of `cfg.model` to reuse (it stays open), else one is loaded."""
    from tqdm import tqdm

    from megatron_lopd.generation.prompts import load_prompt_set, load_tokenizer
    from megatron_lopd.runtime.files import check_writable_dir

    if cfg.kind not in ARTIFACT_KINDS:
        raise ConfigError(f"unknown artifact kind {cfg.kind!r}", f"use one of {', '.join(ARTIFACT_KINDS)}")
    if cfg.chunk_size < 1:
        raise ConfigError(f"chunk_size={cfg.chunk_size} is below 1", "use a positive --chunk-size")
    shard, num_shards = cfg.shard
    if cfg.overwrite and num_shards > 1:
        raise ConfigError("--overwrite with --shard would let shards delete each other's work", "clear the output once, then start the shards")
    info = inspect_model_dir(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    prompt_set = load_prompt_set(cfg.prompts, tokenizer, thinking=cfg.thinking)
    context = info.max_position_embeddings
    for pid, ids in zip(prompt_set.ids, prompt_set.token_ids):  # refused before anything is written or loaded
        if len(ids) >= context:
            raise ArtifactError(
                f"prompt file {cfg.prompts}: prompt {pid!r} has {len(ids)} tokens, no room to generate within the "
                f"model's context of {context}", "shorten or drop the prompt, or use a model with a longer context")
    needed = max(len(ids) for ids in prompt_set.token_ids) + cfg.sampling.max_tokens
    if cfg.max_model_len is not None and cfg.max_model_len < min(needed, context):
        # It would cut responses (vllm: max_tokens = min(max_tokens, max_model_len - prompt)): the bytes
        # would depend on it. Refused, so that it is no part of the artifact's identity.
        raise ConfigError(
            f"--max-model-len {cfg.max_model_len} would cut responses short of --max-tokens {cfg.sampling.max_tokens}: "
            f"the longest prompt + --max-tokens is {needed} tokens",
            f"raise --max-model-len to {min(needed, context)} or leave it unset (what the work needs), or lower --max-tokens")
    check_writable_dir(cfg.out, "rollout artifact", "--out")  # before the model is loaded
    writer = ArtifactWriter.create(cfg.out, _plan(cfg, prompt_set, cfg.model), overwrite=cfg.overwrite)
    pending = writer.pending_chunks(shard, num_shards)
    written = 0
    if pending:
        own_backend = backend is None
        if own_backend:
            backend = load_backend(cfg.backend, cfg.model, dtype=cfg.dtype, tensor_parallel=cfg.tensor_parallel,
                                   max_model_len=engine_context(info, cfg.max_model_len, needed), seed=cfg.sampling.seed,
                                   **cfg.backend_options)
        total = sum((writer.ranges[c][1] - writer.ranges[c][0]) * cfg.sampling.n for c in pending)
        bar = tqdm(total=total, unit="sample", desc=f"generate {shard}/{num_shards}", disable=not cfg.progress, file=sys.stderr)
        tokens, started = 0, time.time()
        try:
            for c in pending:
                start, stop = writer.ranges[c]
                samples = backend.generate(prompt_set.token_ids[start:stop], cfg.sampling, prompt_indices=range(start, stop))
                records = _records(prompt_set, start, samples, tokenizer)
                tokens += sum(len(r.response_ids) for r in records)
                writer.write_chunk(c, records)
                written += 1
                bar.update(len(records))
                bar.set_postfix_str(f"{tokens / max(time.time() - started, 1e-9):,.0f} tok/s")
        finally:
            bar.close()
            if own_backend:
                backend.close()
    missing = len(writer.ranges) - len(writer.done_chunks())
    artifact = writer.finalize() if missing == 0 else None
    return GenerateResult(out=Path(cfg.out), chunks_written=written, chunks_missing=missing, artifact=artifact)
