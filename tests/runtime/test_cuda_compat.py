"""The CPU compatibility layer: canary on upstream names, and what it makes work."""

import importlib
import subprocess
import sys

import pytest
import torch

from megatron_lopd.runtime import cuda_compat


def test_patched_upstream_names_still_exist():
    # Canary: if megatron-core renames one of these, the CPU path silently stops covering it.
    missing = [
        f"{mod}.{attr}"
        for mod, attr in cuda_compat.PATCHED_UPSTREAM_NAMES
        if not hasattr(importlib.import_module(mod), attr)
    ]
    assert not missing, f"megatron-core no longer has {missing}: update runtime/cuda_compat.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_install_redirects_cuda_calls_to_cpu():
    cuda_compat.install()
    assert cuda_compat.installed()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"  # what megatron's optimizer checks
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    # RNG state round trip through the CUDA names
    state = torch.cuda.get_rng_state()
    a = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(4))
    from megatron.core.fusions import fused_softmax

    mask = fused_softmax.get_default_causal_mask(4)
    assert mask.dtype == torch.bool and mask[0, 1] and not mask[1, 0] and not mask.diagonal().any()
    assert cuda_compat.install() is False  # idempotent


def test_install_is_a_noop_when_cuda_is_present():
    # Run in a fresh interpreter where CUDA reports available: nothing may be patched.
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "orig = (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.current_stream)\n"
        "from megatron_lopd.runtime import cuda_compat\n"
        "assert cuda_compat.install() is False\n"
        "assert not cuda_compat.installed()\n"
        "assert (torch.cuda.current_device, torch.cuda.get_rng_state, torch.cuda.current_stream) == orig\n"
        "import megatron.core.tensor_parallel.random as R\n"
        "assert R._get_cuda_rng_state.__module__ == 'megatron.core.tensor_parallel.random'\n"
        "print('untouched')\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout
