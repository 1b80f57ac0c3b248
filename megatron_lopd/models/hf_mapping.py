"""The Hugging Face <-> Megatron mapping of Qwen3 / Qwen3-MoE tensors.

Megatron's dist checkpoints name every tensor by a parallel-layout-free key, with the layer
(and expert) index as leading axes: `decoder.layers.self_attention.linear_qkv.weight` has
the global shape [layers, (heads + 2 * kv_heads) * head_dim, hidden]. One *instance* of a
key is one layer's (one expert's) slice. Each `TensorMap` says which HF tensors make one
instance and how:

- `copy`: one HF tensor, unchanged;
- `qkv`: q, k, v interleaved per GQA group -> [group0: q heads, k, v | group1: ...], the
  layout of Megatron's fused `linear_qkv` (contiguous groups, so TP splits rows evenly);
- `gate_up`: gate and up projections stacked -> Megatron's SwiGLU `linear_fc1`
  (first half gate: Megatron's glu applies the activation to the first chunk).

Tensor parallelism splits an instance along `tp_axis` (0: column-parallel, 1:
row-parallel, None: replicated); `gate_up` splits each half separately, the way
Megatron's SwiGLU sharded-tensor factory stores it. Pipeline and expert parallelism only
select which instances a rank holds. The keys are those of megatron-core's GPTModel
`sharded_state_dict()` with either layer spec (tests/models check them against the real
model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_lopd.models.qwen3 import Qwen3Config

LAYER = "decoder.layers."
EXPERTS = LAYER + "mlp.experts.experts."


@dataclass(frozen=True)
class TensorMap:
    key: str  # dist-checkpoint key
    hf: tuple[str, ...]  # HF names; "{layer}" / "{expert}" filled per instance
    scope: str  # "model" (one instance) | "layer" | "expert" (per layer and expert)
    shape: tuple[int, ...]  # shape of one instance
    fuse: str = "copy"  # "copy" | "qkv" | "gate_up"
    tp_axis: int | None = None
    extra_state: bool = False  # the Megatron module also saves an `_extra_state` object

    @property
    def prepend_axes(self) -> int:
        return {"model": 0, "layer": 1, "expert": 2}[self.scope]


def tensor_maps(config: Qwen3Config) -> list[TensorMap]:
    """Every Megatron tensor of `config`, in HF file order (embedding, layers, norm, head)."""
    c = config
    h, hd = c.hidden_size, c.head_dim
    hf_layer = "model.layers.{layer}."
    maps = [
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "model", (c.vocab_size, h), tp_axis=0),
        TensorMap(LAYER + "self_attention.linear_qkv.layer_norm_weight", (hf_layer + "input_layernorm.weight",), "layer", (h,)),
        TensorMap(
            LAYER + "self_attention.linear_qkv.weight",
            tuple(hf_layer + f"self_attn.{p}_proj.weight" for p in "qkv"),
            "layer", ((c.num_heads + 2 * c.num_kv_heads) * hd, h), "qkv", 0, True,
        ),
        TensorMap(LAYER + "self_attention.q_layernorm.weight", (hf_layer + "self_attn.q_norm.weight",), "layer", (hd,)),
        TensorMap(LAYER + "self_attention.k_layernorm.weight", (hf_layer + "self_attn.k_norm.weight",), "layer", (hd,)),
        TensorMap(
            LAYER + "self_attention.linear_proj.weight", (hf_layer + "self_attn.o_proj.weight",),
            "layer", (h, c.num_heads * hd), tp_axis=1, extra_state=True,
        ),
    ]
    post_norm = hf_layer + "post_attention_layernorm.weight"
    if c.is_moe:
        f, hf_expert = c.moe_ffn_hidden_size, hf_layer + "mlp.experts.{expert}."
        maps += [
            TensorMap(LAYER + "pre_mlp_layernorm.weight", (post_norm,), "layer", (h,)),
            TensorMap(LAYER + "mlp.router.weight", (hf_layer + "mlp.gate.weight",), "layer", (c.num_experts, h)),
            TensorMap(
                EXPERTS + "linear_fc1.weight", (hf_expert + "gate_proj.weight", hf_expert + "up_proj.weight"),
                "expert", (2 * f, h), "gate_up", 0, True,
            ),
            TensorMap(EXPERTS + "linear_fc2.weight", (hf_expert + "down_proj.weight",), "expert", (h, f), tp_axis=1, extra_state=True),
        ]
    else:
        f = c.ffn_hidden_size
        maps += [
            TensorMap(LAYER + "mlp.linear_fc1.layer_norm_weight", (post_norm,), "layer", (h,)),
            TensorMap(
                LAYER + "mlp.linear_fc1.weight", (hf_layer + "mlp.gate_proj.weight", hf_layer + "mlp.up_proj.weight"),
                "layer", (2 * f, h), "gate_up", 0, True,
            ),
            TensorMap(LAYER + "mlp.linear_fc2.weight", (hf_layer + "mlp.down_proj.weight",), "layer", (h, f), tp_axis=1, extra_state=True),
        ]
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "model", (h,)))
    if not c.tie_word_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), "model", (c.vocab_size, h), tp_axis=0))
    return maps


def maps_by_key(config: Qwen3Config) -> dict[str, TensorMap]:
    return {m.key: m for m in tensor_maps(config)}


def global_shape(m: TensorMap, config: Qwen3Config) -> tuple[int, ...]:
    lead = {"model": (), "layer": (config.num_layers,), "expert": (config.num_layers, config.num_experts)}[m.scope]
    return (*lead, *m.shape)


def instances(m: TensorMap, config: Qwen3Config, layers: Sequence[int] | None = None) -> Iterator[tuple[int, ...]]:
    """Instance indices of `m`: () for model-level tensors, (layer,) or (layer, expert)."""
    if m.scope == "model":
        yield ()
        return
    for layer in range(config.num_layers) if layers is None else layers:
        if m.scope == "layer":
            yield (layer,)
        else:
            for expert in range(config.num_experts):
                yield (layer, expert)


def hf_names(m: TensorMap, index: tuple[int, ...]) -> list[str]:
    fields = dict(zip(("layer", "expert"), index))
    return [name.format(**fields) for name in m.hf]


def hf_shapes(m: TensorMap, config: Qwen3Config) -> list[tuple[int, ...]]:
    """The shape of each HF tensor that makes one instance of `m`."""
    if m.fuse == "qkv":
        h, hd = config.hidden_size, config.head_dim
        return [(config.num_heads * hd, h), (config.num_kv_heads * hd, h), (config.num_kv_heads * hd, h)]
    if m.fuse == "gate_up":
        return [(m.shape[0] // 2, m.shape[1])] * 2
    return [m.shape]


def fuse(m: TensorMap, config: Qwen3Config, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """HF tensors -> one Megatron instance."""
    if m.fuse == "qkv":
        q, k, v = tensors
        groups, h = config.num_kv_heads, config.hidden_size
        return torch.cat([q.reshape(groups, -1, h), k.reshape(groups, -1, h), v.reshape(groups, -1, h)], dim=1).reshape(-1, h)
    if m.fuse == "gate_up":
        return torch.cat(list(tensors), dim=0)
    (only,) = tensors
    return only


def split(m: TensorMap, config: Qwen3Config, tensor: torch.Tensor) -> list[torch.Tensor]:
    """One Megatron instance -> its HF tensors (contiguous copies; inverse of `fuse`)."""
    if m.fuse == "qkv":
        groups, h, hd = config.num_kv_heads, config.hidden_size, config.head_dim
        per_group = config.num_heads // groups * hd
        q, k, v = tensor.reshape(groups, per_group + 2 * hd, h).split([per_group, hd, hd], dim=1)
        return [t.reshape(-1, h).contiguous() for t in (q, k, v)]
    if m.fuse == "gate_up":
        return [t.contiguous() for t in tensor.chunk(2, dim=0)]
    return [tensor.contiguous()]


def tp_chunks(m: TensorMap, tp: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) within one instance of each TP rank's piece, rank-major.

    For `gate_up` a rank holds two pieces (its rows of the gate half and of the up half).
    """
    shape = m.shape
    if m.tp_axis is None or tp == 1:
        return [((0,) * len(shape), shape)]
    axis = m.tp_axis
    halves = 2 if m.fuse == "gate_up" else 1
    step = shape[axis] // halves // tp
    out = []
    for rank in range(tp):
        for half in range(halves):
            offsets = [0] * len(shape)
            offsets[axis] = half * (shape[axis] // halves) + rank * step
            sizes = list(shape)
            sizes[axis] = step
            out.append((tuple(offsets), tuple(sizes)))
    return out


def extra_state_keys(m: TensorMap, config: Qwen3Config, index: tuple[int, ...]) -> str:
    """Key of the `_extra_state` object megatron-core saves for instance `index` of `m`."""
    module = m.key.rsplit(".", 1)[0]
    lead = global_shape(m, config)[: m.prepend_axes]
    return f"{module}._extra_state/shard_{'.'.join(map(str, index))}_{'.'.join(map(str, lead))}"


def hf_tensor_names(config: Qwen3Config) -> list[str]:
    """All HF tensor names of `config`, in file order."""
    return [name for m, index in iter_instances(config) for name in hf_names(m, index)]


def iter_instances(config: Qwen3Config) -> Iterator[tuple[TensorMap, tuple[int, ...]]]:
    """(map, instance index) in HF file order: embedding, layer by layer, final norm, head."""
    maps = tensor_maps(config)
    for m in maps:
        if m.scope == "model" and m.key.startswith("embedding"):
            yield m, ()
    for layer in range(config.num_layers):
        for m in maps:
            if m.scope != "model":
                for index in instances(m, config, [layer]):
                    yield m, index
    for m in maps:
        if m.scope == "model" and not m.key.startswith("embedding"):
            yield m, ()


# ---- the live model: gather full HF tensors from every rank ------------------------------
def gather_hf_state_dict(model, config: Qwen3Config, *, grads: bool = False) -> dict[str, torch.Tensor] | None:
    """Full HF-named tensors (parameters, or their gradients with grads=True) on global rank 0.

    Gradients are read from `main_grad` (Megatron DDP, after `finalize_model_grads`) or
    `.grad`; without DDP the TP-replicated QK-norm gradients are partial sums per rank.

    Every rank contributes its main-replica pieces of `model.sharded_state_dict()`, so it
    works at any TP / PP / EP. Everything goes through rank 0's memory: for tests, small
    models and debugging; `checkpoint.export_model_to_hf` streams instead.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    while getattr(model, "qwen3_config", None) is None and hasattr(model, "module"):
        model = model.module  # DDP / Float16Module wrappers share the parameters
    swapped = []
    if grads:
        for p in model.parameters():
            swapped.append((p, p.data))
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            p.data = grad.detach().to(p.dtype) if grad is not None else torch.zeros_like(p.data)
    try:
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        pieces = [
            (t.key, tuple(t.global_offset), t.data.detach().to("cpu", copy=True))
            for t in nested_values(sharded)
            if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id)
        ]
    finally:
        for p, data in swapped:
            p.data = data
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    maps = maps_by_key(config)
    full: dict[str, torch.Tensor] = {}
    for rank_pieces in gathered:
        for key, offsets, data in rank_pieces:
            m = maps[key]
            region = full.setdefault(key, torch.zeros(global_shape(m, config), dtype=data.dtype))
            local = (1,) * m.prepend_axes + tuple(data.shape)
            for axis, (start, size) in enumerate(zip(offsets, local)):
                region = region.narrow(axis, start, size)
            region.copy_(data.reshape(local))
    out = {}
    for m, index in iter_instances(config):
        instance = full[m.key][index] if index else full[m.key]
        out.update(zip(hf_names(m, index), split(m, config, instance)))
    return out
