"""generation/backends.py: the engine's dtype and context length, and the backend options refused up front."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_lopd.errors import ConfigError
from megatron_lopd.generation.backends import engine_context, load_backend, resolve_dtype


def test_auto_dtype_is_bf16_on_a_cuda_machine_and_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == "float32"
    assert resolve_dtype("float16") == "float16"  # an explicit choice is kept
    from megatron_lopd.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--prompts", "p", "--out", "o"])
    assert args.dtype == "auto" and args.gpu_memory_utilization is None


def test_engine_context_is_what_the_work_needs_up_to_the_model():
    qwen3 = SimpleNamespace(max_position_embeddings=40960)
    assert engine_context(qwen3, None, 1024 + 4096) == 5120  # not the model card's 40,960
    assert engine_context(qwen3, None, 50_000) == 40960  # the model's context bounds it (longer is refused later)
    assert engine_context(qwen3, 8192, 5120) == 8192  # the user's choice wins


def test_bad_engine_options_are_refused_before_the_model_is_read(tmp_path):
    for value in (0.0, 1.5):
        with pytest.raises(ConfigError, match=rf"gpu_memory_utilization={value} is outside \(0, 1\]"):
            load_backend("vllm", tmp_path / "none", gpu_memory_utilization=value)
    with pytest.raises(ConfigError, match="gpu_memory_utilization applies to the vllm backend"):
        load_backend("hf", tmp_path / "none", gpu_memory_utilization=0.5)
