"""Fixtures for the generation tests: prompt files and a small HF-generated rollout artifact."""

from __future__ import annotations

import json

import pytest


def write_prompts(path, n: int = 6, start: int = 0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Add {i} and {2 * i + 1}."}) + "\n")
    return path


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="session")
def hf_rollouts(tmp_path_factory, tiny_hf_dir, prompt_file):
    """Rollouts of the tiny student (hf backend): 6 prompts x 2 samples, raw log-probs recorded.

    max_tokens=100 at temperature 1: with these seeds some responses end with EOS and
    some are cut at max_tokens (the tests check both kinds are present).
    """
    from megatron_lopd.generation.base import SamplingParams
    from megatron_lopd.generation.generate import GenerateConfig, generate_artifact

    out = tmp_path_factory.mktemp("rollouts") / "ro"
    cfg = GenerateConfig(model=tiny_hf_dir, prompts=prompt_file, out=out, backend="hf", chunk_size=4, progress=False,
                         sampling=SamplingParams(temperature=1.0, top_p=0.95, max_tokens=100, n=2, seed=7, record_logprobs=True))
    return generate_artifact(cfg).artifact
