"""MFU's denominator per exact device, and its numerator per packed sequence."""

from __future__ import annotations

import logging

import pytest

from megatron_lopd.models.qwen3 import named_config
from megatron_lopd.training.metrics_log import mfu, peak_tflops


@pytest.mark.parametrize(
    "device, bf16, fp8",
    [  # torch.cuda.get_device_name() strings; dense spec-sheet TFLOP/s
        ("NVIDIA H100 80GB HBM3", 989.0, 1979.0),
        ("NVIDIA H100 PCIe", 756.0, 1513.0),
        ("NVIDIA H100 NVL", 835.0, 1671.0),
        ("NVIDIA H200", 989.0, 1979.0),
        ("NVIDIA H200 NVL", 835.0, 1671.0),
        ("NVIDIA GH200 480GB", 989.0, 1979.0),
        ("NVIDIA B200", 2250.0, 4500.0),
        ("NVIDIA A100-SXM4-80GB", 312.0, None),
        ("NVIDIA A100 80GB PCIe", 312.0, None),
    ],
)
def test_peak_per_exact_device(device, bf16, fp8):
    assert (peak_tflops(device, "bf16"), peak_tflops(device, "fp8")) == (bf16, fp8)
    assert peak_tflops(device, "bf16", override=500.0) == 500.0


def test_unknown_device_gives_no_mfu_and_a_hint(caplog):
    with caplog.at_level(logging.WARNING):
        assert peak_tflops("NVIDIA L40S", "bf16") is None
    assert "set logging.peak_tflops" in caplog.text
    assert mfu(1e15, 8, None) is None


def test_packed_attention_flops_count_each_sequence_not_the_row():
    """Two 2,048-token sequences packed in a 4,096-token row cost the dense FLOPs of 4,096 tokens
    but the attention of two 2,048-token sequences (what TrainStep sums), less than one 4,096-token
    sequence; MFU is that total over time and peak."""
    q = named_config("qwen3_8b")
    packed = 2 * 2048 * q.flops_per_token(2048)
    single = 4096 * q.flops_per_token(4096)
    attention_per_token_per_position = 3 * 2 * 2 * q.num_layers * q.num_heads * q.head_dim / 2
    assert single - packed == pytest.approx(4096 * attention_per_token_per_position * (4096 - 2048), rel=1e-12)
    assert mfu(packed, 8, 989.0) == pytest.approx(packed / (8 * 989e12), rel=1e-12)
