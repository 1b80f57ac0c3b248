"""The HF <-> Megatron tensor mapping, checked against plain re-derivations."""

from __future__ import annotations

import pytest
import torch

from megatron_lopd.models import hf_mapping as hfm
from megatron_lopd.models.qwen3 import named_config


def _map(config, key):
    return hfm.maps_by_key(config)[key]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_qkv_rows_follow_megatron_group_layout(heads, kv_heads):
    config = named_config("tiny").replace(num_heads=heads, num_kv_heads=kv_heads)
    m = _map(config, hfm.LAYER + "self_attention.linear_qkv.weight")
    hd, h = config.head_dim, config.hidden_size
    q, k, v = (torch.randn(s) for s in hfm.hf_shapes(m, config))
    fused = hfm.fuse(m, config, [q, k, v])
    assert fused.shape == m.shape
    # Re-derivation: group g holds its query heads, then its key head, then its value head.
    per_group = heads // kv_heads
    row = 0
    for g in range(kv_heads):
        for head in range(g * per_group, (g + 1) * per_group):
            assert torch.equal(fused[row : row + hd], q[head * hd : (head + 1) * hd])
            row += hd
        assert torch.equal(fused[row : row + hd], k[g * hd : (g + 1) * hd])
        assert torch.equal(fused[row + hd : row + 2 * hd], v[g * hd : (g + 1) * hd])
        row += 2 * hd
    assert all(torch.equal(a, b) for a, b in zip(hfm.split(m, config, fused), (q, k, v)))
    assert h == fused.shape[1]


def test_gate_up_is_gate_first():
    config = named_config("tiny")
    m = _map(config, hfm.LAYER + "mlp.linear_fc1.weight")
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fused = hfm.fuse(m, config, [gate, up])
    x = torch.randn(3, 64)
    # Megatron's glu: silu(first half) * second half == HF's silu(gate(x)) * up(x).
    first, second = torch.chunk(x @ fused.T, 2, dim=-1)
    assert torch.allclose(torch.nn.functional.silu(first) * second, torch.nn.functional.silu(x @ gate.T) * (x @ up.T))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_chunks_tile_every_instance_exactly(tp):
    dense = named_config("tiny")
    moe = dense.replace(num_experts=8, moe_top_k=2, moe_ffn_hidden_size=64, tie_word_embeddings=True)
    for m in hfm.tensor_maps(dense) + hfm.tensor_maps(moe):
        covered = torch.zeros(m.shape if len(m.shape) == 1 else m.shape[:2], dtype=torch.int32)
        for offsets, sizes in hfm.tp_chunks(m, tp):
            region = covered
            for axis, (start, size) in enumerate(list(zip(offsets, sizes))[: covered.dim()]):
                region = region.narrow(axis, start, size)
            region += 1
        assert torch.all(covered == 1), m.key
        if m.fuse == "gate_up" and tp > 1:  # rank r holds rows r of the gate half and of the up half
            (o0, s0), (o1, _) = hfm.tp_chunks(m, tp)[:2]
            assert o1[0] - o0[0] == m.shape[0] // 2 and s0[0] == m.shape[0] // 2 // tp


def test_hf_names_cover_a_qwen3_moe_checkpoint():
    config = named_config("qwen3_30b_a3b")
    names = hfm.hf_tensor_names(config)
    assert len(names) == len(set(names))
    assert "model.layers.47.mlp.experts.127.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names
    # 3 per expert + router + 4 attention projections + 2 QK norms + 2 norms per layer; embedding, norm, head.
    assert len(names) == config.num_layers * (3 * config.num_experts + 1 + 4 + 2 + 2) + 3
