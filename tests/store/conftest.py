"""Helpers for the teacher store tests: small synthetic stores built through the real writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lopd.store import StoreProvenance, StoreWriter, SyntheticSpec, finalize_store, synthetic_records

VOCAB = 3000
PROV = dict(teacher_fingerprint="model-teacher", tokenizer_fingerprint="tok-abc", chat_template="{{x}}",
            rollouts_fingerprint="data-rollouts", rollout_generator_fingerprint="model-sft", engine="synthetic",
            engine_version="0", extra={"scoring_dtype": "float32"})


def spec(k: int = 4, rollout: bool = True, seed: int = 0) -> SyntheticSpec:
    return SyntheticSpec(vocab_size=VOCAB, top_k=k, prompt_len=(0, 24), response_len=(1, 300),
                         response_len_median=60, working_vocab=64, with_rollout_logprobs=rollout, seed=seed)


def make_store(path: Path, *, n: int = 40, k: int = 4, sps: int = 8, rollout: bool = True, chunk_tokens: int = 64,
               finalize: bool = True, seed: int = 0):
    """Write a store of ``n`` synthetic sequences; returns (path, source records)."""
    records = synthetic_records(range(n), spec(k, rollout, seed))
    writer = StoreWriter.create(path, num_sequences=n, top_k=k, vocab_size=VOCAB, provenance=StoreProvenance(**PROV),
                                sequences_per_shard=sps, has_rollout_logprobs=rollout, chunk_tokens=chunk_tokens,
                                fsync=False)
    for s in writer.pending_shards():
        r = writer.shard_range(s)
        writer.write_shard(s, records[r.start:r.stop])
    if finalize:
        finalize_store(path)
    return path, records


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def lopd(*args: str) -> subprocess.CompletedProcess:
    """Run the real `lopd` console entry in a subprocess."""
    exe = Path(sys.executable).with_name("lopd")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=child_env(), timeout=120)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A finalized k=4 store with rollout log-probs, shared by read-only tests."""
    return make_store(tmp_path_factory.mktemp("store") / "s.zarr")
