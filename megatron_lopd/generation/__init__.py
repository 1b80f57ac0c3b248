"""Generation and offline teacher scoring behind one interface (vLLM and transformers backends).

- `base`: `SamplingParams`, `Sample`, `ScoredSequence`, `GenerationBackend`, `load_backend`.
- `artifact`: the rollout artifact (SFT data and rollouts): `RolloutArtifact`, `ArtifactWriter`.
- `prompts`: prompt files (JSONL / parquet) -> chat-templated token ids.
- `generate`: `generate_artifact` (what `lopd generate` runs); `score`: `score_to_store` (`lopd score`).

Importing this package never imports vLLM or torch.
"""

from megatron_lopd.generation.artifact import ArtifactWriter, RolloutArtifact, RolloutRecord
from megatron_lopd.generation.base import GenerationBackend, Sample, SamplingParams, ScoredSequence, load_backend

__all__ = [
    "ArtifactWriter",
    "GenerationBackend",
    "RolloutArtifact",
    "RolloutRecord",
    "Sample",
    "SamplingParams",
    "ScoredSequence",
    "load_backend",
]
