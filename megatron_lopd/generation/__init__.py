"""Generation and offline teacher scoring behind one interface (vLLM and transformers backends).

- `base`: `SamplingParams`, `Sample`, `ScoredSequence`, `GenerationBackend` (the interface).
- `backends`: `load_backend` (vLLM or transformers).
- `prompts`: prompt files (JSONL / parquet) -> chat-templated token ids.
- `generate`: `generate_artifact` (what `lopd generate` runs); `score`: `score_to_store` (`lopd score`).

What they write is read through `megatron_lopd.artifacts` (SFT data, rollouts) and
`megatron_lopd.store` (the teacher store). Importing this package never imports vLLM or torch.
"""

from megatron_lopd.generation.backends import load_backend
from megatron_lopd.generation.base import GenerationBackend, Sample, SamplingParams, ScoredSequence

__all__ = ["GenerationBackend", "Sample", "SamplingParams", "ScoredSequence", "load_backend"]
