"""One interface for generation and scoring, two backends (vLLM for production, transformers as reference).

Both operations work on token ids: chat templates and tokenization happen before, in
`generation.prompts`, so a backend never guesses at text.

Conventions shared by every backend:
- A response ends either with the end-of-sequence token, which is then part of
  `response_ids` and gets scored like any other token (finish_reason "stop"), or at
  `max_tokens` (finish_reason "length", truncated, no EOS).
- Log-probs are raw: temperature 1, full vocabulary, before top-p. The sampler's
  log-prob of each sampled token is recorded this way even when sampling used another
  temperature (DESIGN: the drift monitor compares raw log-probs of S and R).
- `score` entry t is log p(response[t] | prompt, response[:t]); top-k is sorted by
  log-prob descending.
- Sampling is deterministic for a seed: the sample j of prompt i uses a seed derived
  from (params.seed, the prompt's index in the call, j) through `sample_seed`, so a
  caller that passes global prompt indices gets the same samples however the prompts are
  split into calls, shards or processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from megatron_lopd.errors import ArtifactError, ConfigError, LopdError



@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature=0` means greedy. `record_logprobs`: keep the sampler's raw log-prob of each token."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int = 0
    record_logprobs: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        checks = (
            (self.temperature >= 0, f"temperature={self.temperature} is negative", "use a temperature >= 0"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} is outside (0, 1]", "use 0 < top_p <= 1"),
            (self.max_tokens >= 1, f"max_tokens={self.max_tokens} is below 1", "use max_tokens >= 1"),
            (self.n >= 1, f"n={self.n} is below 1", "use n >= 1 samples per prompt"),
        )
        for ok, what, fix in checks:
            if not ok:
                raise ConfigError(what, fix)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d


@dataclass
class Sample:
    """One sampled response. `logprobs[t]`: the sampler's raw log-prob of `response_ids[t]` (when recorded)."""

    response_ids: list[int]
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    logprobs: list[float] | None = None


@dataclass
class ScoredSequence:
    """A model's view of one response: per-token log-probs and the top-k at each response position."""

    token_logprobs: np.ndarray  # float32 [R]: log p(response[t] | prompt, response[:t])
    topk_ids: np.ndarray | None = None  # int32 [R, k], sorted by log-prob descending
    topk_logprobs: np.ndarray | None = None  # float32 [R, k]

    def __len__(self) -> int:
        return int(self.token_logprobs.shape[0])


class GenerationBackend(Protocol):
    """What every backend provides. `prompt_indices` (optional) are the prompts' global
    indices used to derive per-sample seeds; by default 0..len(prompts)-1."""

    name: str
    max_model_len: int

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, prompt_indices: Sequence[int] | None = None
    ) -> list[list[Sample]]: ...

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[ScoredSequence]: ...

    def close(self) -> None: ...


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Per-sample seed from (run seed, global prompt index, sample index): independent of batching and sharding."""
    digest = hashlib.sha256(f"lopd-sample|{seed}|{prompt_index}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class ModelInfo:
    """What the backends and the tools need to know about a Hugging Face model directory."""

    path: Path
    max_position_embeddings: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = field(default=())


_WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def inspect_model_dir(model_dir: str | Path) -> ModelInfo:
    """Check that `model_dir` is a loadable HF model directory (config + weights) and read its limits."""
    import json

    path = Path(model_dir)
    if not path.exists():
        raise ArtifactError(f"{path}: model directory does not exist", "pass a Hugging Face model directory")
    if not path.is_dir():
        raise ArtifactError(f"{path}: is a file, not a model directory", "pass a Hugging Face model directory (config.json + weights)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{path}: no config.json", "point at a directory written by save_pretrained or `lopd convert to-hf`")
    if not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
        raise ArtifactError(
            f"{path}: no weight files (*.safetensors or *.bin)",
            "point at a directory written by save_pretrained or `lopd convert to-hf`",
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config_path}: not valid JSON ({exc})", "re-export the model") from exc
    config = config.get("text_config", config)
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():  # generation_config's EOS list wins, like in transformers and vLLM
        geos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if geos is not None:
            eos_ids = tuple(geos) if isinstance(geos, list) else (int(geos),)
    return ModelInfo(
        path=path,
        max_position_embeddings=int(config.get("max_position_embeddings", 1 << 30)),
        vocab_size=int(config["vocab_size"]),
        eos_token_ids=eos_ids,
    )


def check_lengths(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]] | None, max_model_len: int, what: str = "sequence") -> None:
    """Refuse sequences a model cannot take: empty responses or prompt+response over its context."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ArtifactError(f"{what} {i}: empty prompt", "every prompt needs at least one token")
        resp_len = 0 if responses is None else len(responses[i])
        if responses is not None and resp_len == 0:
            raise ArtifactError(f"{what} {i}: empty response, nothing to score", "drop the empty sample or regenerate it")
        total = len(prompt) + resp_len + (1 if responses is None else 0)
        if total > max_model_len:
            raise ArtifactError(
                f"{what} {i}: {len(prompt)} prompt + {resp_len} response tokens exceed the model's context of {max_model_len}",
                "shorten or drop the prompt, lower --max-tokens, or use a model with a longer context",
            )


def raise_non_finite(info: ModelInfo, backend: str, prompt_index: int | None = None) -> None:
    """Refuse a generator whose logits are NaN/inf (NaN weights, an overflow): its samples are garbage."""
    where = f" (prompt {prompt_index})" if prompt_index is not None else ""
    raise LopdError(
        f"model {info.path} produced non-finite logits (NaN or inf) while generating with --backend {backend}{where}: "
        "its samples would be garbage, nothing was written for them",
        "check the model's weights (a diverged or corrupted checkpoint/export?); with bfloat16/float16 try --dtype float32")
