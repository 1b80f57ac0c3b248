"""Run megatron-core's hard-coded CUDA calls on CPU.

megatron-core assumes CUDA in a handful of places: `torch.cuda.current_device()` as the
device of buffers, the CUDA RNG state in its tensor-parallel RNG tracker,
`device="cuda"` in pipeline schedules and the default causal mask,
`torch.cuda.current_stream()` in DDP, `param.type() == "torch.cuda.FloatTensor"` in the
optimizers. On a machine without CUDA, `install()` redirects those to the CPU so that
the same training, conversion and test code runs over gloo. It also replaces
megatron-core's apex-less gradient-norm kernel, which is inaccurate on CPU
(`_l2_norm_fp64`).

`install()` is a no-op when CUDA is available: GPU runs see megatron-core untouched.
The private names it replaces are listed in `PATCHED_UPSTREAM_NAMES`; a canary test
fails loudly when an upstream release renames them.
"""

from __future__ import annotations

import importlib

import torch
from torch.overrides import TorchFunctionMode

# (module, attribute) pairs of megatron-core that this layer replaces. If one disappears
# upstream, the CPU path silently stops covering it: tests/runtime/test_cuda_compat.py
# checks that each still exists.
PATCHED_UPSTREAM_NAMES = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    ("megatron.core.optimizer.clip_grads", "l2_norm_impl"),
)

_installed = False


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how torch.cuda.current_device() names a GPU.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda", .cuda(), .to("cuda") and the .type() string checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers compare against "torch.cuda.FloatTensor" and friends.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for a CUDA stream: every method is a no-op, usable as a context manager.

    A class (not a lambda) so that annotations such as `torch.cuda.Stream | None` in
    other libraries keep working.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def record_event(self, event=None):
        # Callers synchronize on the returned event (e.g. the MoE all-to-all dispatcher).
        return event if event is not None else _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent(_NullStream):
    def elapsed_time(self, other) -> float:
        return 0.0


def _l2_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for apex's `multi_tensor_l2norm`, summing the squares in float64.

    Without apex / Transformer Engine, megatron-core's `get_grad_norm_fp32` uses
    `megatron.core.utils.local_multi_tensor_l2_norm`: `torch.norm` of each tensor. On CPU,
    torch's float32 2-norm kernel adds every square into one float32 accumulator
    (pytorch/pytorch#169237), which drops small terms once the sum is large: measured
    -1.8e-4 relative on 6.3M elements, -2 % on 155M (one thread). The logged grad_norm and
    the clip factor were too low, and more so at TP 1 than at TP 2 (half-size shards):
    issue #19. Chunks of 2**20 elements in float64 are exact to ~1e-14.
    """
    norms = []
    for tensor in tensor_lists[0]:
        total = torch.zeros((), dtype=torch.float64, device=tensor.device)
        for piece in tensor.detach().reshape(-1).split(1 << 20):
            piece = piece.double()
            total += torch.dot(piece, piece)
        norms.append(total)
    squares = torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64)
    total_norm = squares.sum().sqrt().float().reshape(1)
    return total_norm, (squares.sqrt().float() if per_tensor else None)


def installed() -> bool:
    return _installed


def install() -> bool:
    """Make megatron-core run on CPU. Returns True if it patched anything."""
    global _installed
    if torch.cuda.is_available() or _installed:
        return False
    for module_name, attr in PATCHED_UPSTREAM_NAMES:
        if not hasattr(importlib.import_module(module_name), attr):
            raise RuntimeError(
                f"megatron-core changed: {module_name}.{attr} is gone; "
                "megatron_lopd.runtime.cuda_compat needs updating for this release"
            )
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.tensor_parallel.random as tp_random
    from megatron.core.utils import local_multi_tensor_l2_norm

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = torch.cuda.manual_seed
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.empty_cache = lambda: None
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The default mask is built on "cuda"; upper triangle = masked out.
    fused_softmax.get_default_causal_mask = lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(1)
    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:  # neither apex nor TE: megatron's fallback
        clip_grads.l2_norm_impl = _l2_norm_fp64
    _CudaToCpu().__enter__()  # stays active for the life of the process
    _installed = True
    return True
