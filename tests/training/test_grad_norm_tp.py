"""The gradient norm at TP=2 is the one of TP=1, at the real hidden width (issue #19 item 8).

One layer with Qwen3-0.6B's layer shape (hidden 1024, 16 query / 8 key-value heads of 128,
FFN 3072, QK-norm, tied embeddings; the vocabulary cut to 4096 to stay fast), the same
weights loaded at TP=1 and TP=2, one forward/backward of the Lightning OPD loss with the
trainer's DDP (`finalize_model_grads`) and distributed-optimizer setup
(`training/loop.py`), then what `TrainStep` logs: `optimizer.prepare_grads()` and
`optimizer.get_grad_norm()`.

What was found (the tiny test model hides it: its tensors are a few thousand elements):
- The gradients agree: every full (gathered) parameter gradient of TP=2 is within ~1e-6
  (relative Frobenius) of TP=1's, QK-norm weights included (finalize_model_grads sums
  their per-rank partial gradients over TP; both ranks hold the same sum), and the float64
  norms of the full gradients agree to ~1e-7. Nothing is counted twice: megatron counts a
  replicated parameter (norms) on TP rank 0 only, a split one on every rank.
- The *reported* norm was low, by more at TP=1: megatron-core's CPU fallback for apex's
  `multi_tensor_l2norm` takes `torch.norm` of each tensor, and torch's CPU float32 norm
  kernel sums all squares in one float32 accumulator (pytorch/pytorch#169237), dropping
  small terms once the sum is large: -1.8e-4 relative at 6.3M elements, -2 % at 155M (one
  thread). TP=2's shards are half the size, so TP=2's norm is less wrong: TP=2 reported
  +4.5e-5 above TP=1 here, +1.0-1.3e-4 at 28 layers. The fix (runtime/cuda_compat.py)
  accumulates in float64.

Tolerances: per-parameter gradients 1e-5 (float32 matmuls split over ranks, measured
<= 1e-6); float64 norms of the same gradients 1e-6 (measured 1.4e-8); a reported norm
against the float64 norm of its own gradients 1e-6 (float32 rounding of the result; it was
-8.7e-5 at TP=1 and -4.3e-5 at TP=2 before the fix); counted squares against the full
gradients 1e-9 (the same float32 values summed in float64).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_utils import run_distributed

LAYER_SHAPE = dict(hidden_size=1024, num_heads=16, num_kv_heads=8, head_dim=128, ffn_hidden_size=3072)
VOCAB = 4096
ROWS, ROW_LEN = 2, 48


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (ROWS, ROW_LEN + 1), generator=g)
    mask = torch.ones(ROWS, ROW_LEN, dtype=torch.bool)
    mask[:, : ROW_LEN // 4] = False  # a prompt
    teacher = -4 * torch.rand(ROWS, ROW_LEN, generator=g) - 6.0  # about log(1 / VOCAB) = -8.3
    return ids, mask, teacher


def _one_step(hf_dir: str, out: str, tp: int) -> dict:
    """One forward/backward at TP=`tp`; rank 0 saves the full gradients to `out`."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lopd.models.checkpoint import load_hf_weights
    from megatron_lopd.models.hf_mapping import gather_hf_state_dict
    from megatron_lopd.models.qwen3 import Qwen3Config, build_model
    from megatron_lopd.runtime.distributed import ParallelConfig, init_distributed
    from megatron_lopd.training.losses import LossInputs, LossOptions, compute_loss

    init_distributed(ParallelConfig(tensor_parallel=tp))
    config = Qwen3Config.from_hf(hf_dir)
    model = build_model(config)
    load_hf_weights(model, hf_dir)
    # As Trainer._build_model / build_optimizer (fp32).
    tconfig = model.config
    tconfig.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True, average_in_collective=False
    )
    ddp = DistributedDataParallel(tconfig, ddp_config, model)
    tconfig.no_sync_func = ddp.no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = None
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-6, clip_grad=1.0, params_dtype=torch.float32, use_distributed_optimizer=True),
        [ddp],
    )

    ids, mask, teacher = _batch()
    inputs = LossInputs(
        target_ids=ids[:, 1:], loss_mask=mask, seq_ids=torch.arange(ROWS).unsqueeze(1).expand(ROWS, ROW_LEN).contiguous(),
        num_sequences=ROWS, teacher_logprobs=teacher,
    )
    tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    losses = []

    def forward_step(data_iterator, m):
        next(data_iterator)
        logits = m(ids[:, :-1], torch.arange(ROW_LEN).expand(ROWS, ROW_LEN), None)

        def loss_func(output):
            loss, _ = compute_loss("lightning_opd", output, inputs, tp_group=tp_group, options=LossOptions(vocab_size=VOCAB))
            losses.append(float(loss))
            return loss, torch.zeros([], dtype=torch.int), {}

        return logits, loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp], num_microbatches=1,
        seq_length=ROW_LEN, micro_batch_size=ROWS, forward_only=False,
    )
    # Replicated parameters (the norms): after finalize_model_grads every TP rank must hold
    # the same full gradient, else the ranks' copies would drift apart.
    replicated = {
        name: p.main_grad.detach().clone()
        for name, p in model.named_parameters()
        if not getattr(p, "tensor_model_parallel", False)
    }
    optimizer.prepare_grads()
    counted_sq = sum(float(g.double().square().sum()) for g in optimizer.get_main_grads_for_grad_norm())
    grad_norm = float(optimizer.get_grad_norm())
    full = gather_hf_state_dict(ddp, config, grads=True)
    if dist.get_rank() == 0:
        torch.save(full, out)
    return {"loss": losses[0], "grad_norm": grad_norm, "counted_sq": counted_sq, "replicated": replicated}


def _write_hf_model(out_dir) -> str:
    """Random float32 weights (std 0.02, norms 1 + 0.1 N(0, 1)) in HF format, without transformers."""
    import json

    from safetensors.torch import save_file

    from megatron_lopd.models.hf_mapping import hf_names, hf_shapes, iter_instances
    from megatron_lopd.models.qwen3 import named_config

    config = named_config("qwen3_0_6b").replace(vocab_size=VOCAB, num_layers=1, torch_dtype="float32")
    assert config.tie_word_embeddings and all(getattr(config, k, v) == v for k, v in LAYER_SHAPE.items())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m, index in iter_instances(config):
        for name, shape in zip(hf_names(m, index), hf_shapes(m, config)):
            noise = torch.randn(shape, generator=g)
            tensors[name] = 1.0 + 0.1 * noise if "norm" in name else 0.02 * noise
    out_dir.mkdir()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return str(out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad_norm_tp")
    hf_dir = _write_hf_model(root / "hf")
    out = {}
    for tp in (1, 2):
        ranks = run_distributed(_one_step, world_size=tp, hf_dir=hf_dir, out=str(root / f"grads_tp{tp}.pt"), tp=tp)
        out[tp] = {"ranks": ranks, "grads": torch.load(root / f"grads_tp{tp}.pt")}
    return out


def _sq(grads: dict[str, torch.Tensor]) -> float:
    return sum(float(g.double().square().sum()) for g in grads.values())


def test_tp2_gradients_match_tp1_per_parameter(runs):
    g1, g2 = runs[1]["grads"], runs[2]["grads"]
    assert g1.keys() == g2.keys()
    assert any("q_norm" in k for k in g1) and any("k_norm" in k for k in g1)  # QK-norm is in the model
    assert all(g1[k].abs().max() > 0 for k in g1), "a parameter got no gradient: the test would prove nothing"
    rel = {k: float((g2[k].double() - g1[k].double()).norm() / g1[k].double().norm()) for k in g1}
    assert max(rel.values()) < 1e-5, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    assert runs[2]["ranks"][0]["loss"] == pytest.approx(runs[1]["ranks"][0]["loss"], rel=1e-5)
    assert math.sqrt(_sq(g2)) == pytest.approx(math.sqrt(_sq(g1)), rel=1e-6)


def test_each_gradient_is_counted_once(runs):
    for tp in (1, 2):
        counted = sum(r["counted_sq"] for r in runs[tp]["ranks"])
        assert counted == pytest.approx(_sq(runs[tp]["grads"]), rel=1e-9), f"TP={tp}"
    rank0, rank1 = (r["replicated"] for r in runs[2]["ranks"])
    assert any("q_layernorm" in k for k in rank0) and any("k_layernorm" in k for k in rank0)
    for name in rank0:  # bitwise: a missing TP all-reduce leaves each rank its partial sum
        assert torch.equal(rank0[name], rank1[name]), name


def test_reported_grad_norm_is_exact_and_the_same_at_tp1_and_tp2(runs):
    exact = {tp: math.sqrt(_sq(runs[tp]["grads"])) for tp in (1, 2)}
    reported = {tp: runs[tp]["ranks"][0]["grad_norm"] for tp in (1, 2)}
    assert runs[2]["ranks"][1]["grad_norm"] == reported[2]
    for tp in (1, 2):  # before the fix: -8.7e-5 (TP=1) and -4.3e-5 (TP=2) relative
        assert reported[tp] == pytest.approx(exact[tp], rel=1e-6), f"TP={tp}: reported {reported[tp]!r}, float64 {exact[tp]!r}"
    assert reported[2] == pytest.approx(reported[1], rel=2e-6)
