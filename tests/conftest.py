"""Shared fixtures: locally built tiny models and tokenizers (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch

# One thread per process: tests launch several processes (gloo ranks, vLLM, writers) on a
# 2-core machine, where oversubscribed thread pools make runs several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def char_tokenizer():
    from megatron_lopd.models.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny Qwen3 (GQA 2, untied) with the char tokenizer, float32, on disk."""
    from megatron_lopd.models.tiny import write_random_hf_model

    return write_random_hf_model(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A second random tiny Qwen3 (different weights, same tokenizer): a 'teacher'."""
    from megatron_lopd.models.tiny import write_random_hf_model

    return write_random_hf_model(tmp_path_factory.mktemp("tiny_teacher"), seed=1, hidden_size=96, num_heads=4, num_kv_heads=4)
