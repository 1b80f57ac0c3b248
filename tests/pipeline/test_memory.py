"""The GPU memory plan (megatron_lopd/pipeline/memory.py, issue 18 item 3) against numbers worked out
by hand here, from the published Qwen3 configs:

    Qwen3-8B       h 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128, FFN 12288, vocab 151936, untied
    Qwen3-32B      h 5120, 64 layers, 64 heads, 8 KV heads, head_dim 128, FFN 25600, vocab 151936, untied
    Qwen3-30B-A3B  h 2048, 48 layers, 32 heads, 4 KV heads, head_dim 128, 128 experts (top 8) of FFN 768

Per-layer parameters: Q and O h x heads*128 each, K and V h x kv_heads*128 each, Q/K norms 2 x 128,
two layer norms 2h, MLP 3 h F (MoE: router 128 h + 128 x 3 h 768); plus the final norm h and two
vocab x h matrices.
"""

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.models.qwen3 import named_config
from megatron_lopd.pipeline.memory import EnginePlan, TrainingPlan, format_plan

GiB = 2**30
QWEN3_8B, QWEN3_32B, QWEN3_30B_A3B = named_config("qwen3_8b"), named_config("qwen3_32b"), named_config("qwen3_30b_a3b")
VLLM_BUDGET = 80 * 0.9  # GiB: 80 GiB at vLLM's default utilisation
LOSS = 2 + 2.25 / 8  # fp32 logits, their gradient, the chunked loss's temporaries (8 chunks)

# Parameters on one GPU, by hand.
P_8B_TP1 = 36 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 256 + 8192 + 3 * 4096 * 12288) + 4096 + 2 * 151936 * 4096
P_8B_TP4 = 36 * (4096 * 1024 * 2 + 4096 * 256 * 2 + 256 + 8192 + 3 * 4096 * 3072) + 4096 + 2 * 37984 * 4096
P_32B_TP1 = 64 * (5120 * 8192 * 2 + 5120 * 1024 * 2 + 256 + 10240 + 3 * 5120 * 25600) + 5120 + 2 * 151936 * 5120
P_32B_TP2 = 64 * (5120 * 4096 * 2 + 5120 * 512 * 2 + 256 + 10240 + 3 * 5120 * 12800) + 5120 + 2 * 75968 * 5120
P_32B_TP4 = 64 * (5120 * 2048 * 2 + 5120 * 256 * 2 + 256 + 10240 + 3 * 5120 * 6400) + 5120 + 2 * 37984 * 5120
# vLLM TP 4: 8 query heads, 1 KV head, every expert's FFN split 768 / 4 = 192.
P_MOE_VLLM_TP4 = 48 * (2048 * 1024 * 2 + 2048 * 128 * 2 + 256 + 4096 + 128 * 2048 + 128 * 3 * 2048 * 192) + 2048 + 2 * 37984 * 2048
# Megatron TP 4, EP 8, ETP 1: the non-expert part by TP, 16 whole experts per GPU.
P_MOE_DENSE = 48 * (2048 * 1024 * 2 + 2048 * 128 * 2 + 256 + 4096 + 128 * 2048) + 2048 + 2 * 37984 * 2048
P_MOE_EXPERTS = 48 * 16 * 3 * 2048 * 768


def reserve(tokens_h_ffn: int) -> float:
    """vLLM's reserve: 1.5 GiB + 16,384 profiled tokens x (2h + FFN intermediate) x 2 B."""
    return 1.5 + 16384 * tokens_h_ffn * 2 / GiB


def test_parameter_counts_agree_with_the_model_configs():
    assert P_8B_TP1 == QWEN3_8B.num_params() == 8_190_735_360
    assert P_32B_TP1 == QWEN3_32B.num_params() == 32_762_123_264
    assert EnginePlan("x", QWEN3_32B, 40960).weights_gib == pytest.approx(61.02, abs=0.01)  # the issue's 61 GiB


@pytest.mark.parametrize(
    "model, tp, params, kv_per_token, reserve_gib",
    [
        (QWEN3_8B, 1, P_8B_TP1, 36 * 8 * 128 * 2 * 2, reserve(2 * 4096 + 3 * 12288)),
        (QWEN3_8B, 4, P_8B_TP4, 36 * 2 * 128 * 2 * 2, reserve(2 * 4096 + 3 * 3072)),
        (QWEN3_32B, 1, P_32B_TP1, 64 * 8 * 128 * 2 * 2, reserve(2 * 5120 + 3 * 25600)),
        (QWEN3_32B, 2, P_32B_TP2, 64 * 4 * 128 * 2 * 2, reserve(2 * 5120 + 3 * 12800)),
        (QWEN3_32B, 4, P_32B_TP4, 64 * 2 * 128 * 2 * 2, reserve(2 * 5120 + 3 * 6400)),
        (QWEN3_30B_A3B, 4, P_MOE_VLLM_TP4, 48 * 1 * 128 * 2 * 2, reserve(2 * 2048 + 8 * (3 * 192 + 2048))),
    ],
)
@pytest.mark.parametrize("max_model_len", [40960, 20480])
def test_engine_weights_kv_and_sequences(model, tp, params, kv_per_token, reserve_gib, max_model_len):
    plan = EnginePlan("teacher", model, max_model_len, tensor_parallel=tp)
    budget = VLLM_BUDGET - params * 2 / GiB - reserve_gib
    assert plan.weights_gib == pytest.approx(params * 2 / GiB)
    assert plan.kv_bytes_per_token == kv_per_token
    assert plan.reserve_gib == pytest.approx(reserve_gib)
    assert plan.kv_budget_gib == pytest.approx(budget)
    assert plan.sequences_fit == int(budget * GiB // (max_model_len * kv_per_token))
    assert plan.fits == (plan.sequences_fit >= 1)


def test_qwen3_32b_numbers_of_the_issue():
    # 64 x 8 x 128 x 2 x 2 B = 256 KiB per token; 40,960 tokens = 10 GiB; ~6-7 GiB left for KV at TP 1.
    tp1, tp2, tp4 = (EnginePlan("score", QWEN3_32B, 40960, tensor_parallel=t) for t in (1, 2, 4))
    assert tp1.kv_bytes_per_token == 256 * 1024 and tp1.sequence_kv_gib == 10.0
    assert 6 < tp1.kv_budget_gib < 7 and not tp1.fits
    assert (tp2.sequences_fit, tp4.sequences_fit) == (7, 21)  # 38.5 GiB / 5 GiB, 54.3 GiB / 2.5 GiB
    half = EnginePlan("score", QWEN3_32B, 20480)
    assert half.fits and half.sequences_fit == 1  # 6.8 GiB / 5 GiB


def test_impossible_teacher_layout_is_refused_with_the_fix():
    plan = EnginePlan("score", QWEN3_32B, 40960, tensor_parallel=1, gpu_memory_gib=80)
    budget_bytes = 72 * GiB - P_32B_TP1 * 2 - 1.5 * GiB - 16384 * (2 * 5120 + 3 * 25600) * 2
    longest = int(budget_bytes // (256 * 1024) // 16 * 16)  # whole 16-token KV blocks
    assert longest == 27920
    with pytest.raises(ConfigError) as err:
        plan.check()
    assert err.value.fix == "raise tensor_parallel to 2 or lower max_model_len to 27,920"  # TP 2: 7 sequences fit
    assert "stage score" in err.value.what and "10.0 GiB" in err.value.what and "6.8 GiB" in err.value.what
    assert "61.0 GiB weights" in err.value.what and "\n" not in str(err.value)
    assert EnginePlan("score", QWEN3_32B, 40960, tensor_parallel=2).check().fits


def test_kv_heads_are_replicated_beyond_their_count():
    # 4 KV heads at TP 8: vLLM keeps one (replicated) KV head per GPU, as at TP 4.
    tp8 = EnginePlan("teacher", QWEN3_30B_A3B, 40960, tensor_parallel=8)
    assert tp8.kv_bytes_per_token == 48 * 1 * 128 * 2 * 2
    with pytest.raises(ConfigError, match="tensor_parallel 3"):
        EnginePlan("teacher", QWEN3_32B, 40960, tensor_parallel=3)


def test_training_qwen3_8b_tp4_sp_on_8_gpus():
    plan = TrainingPlan("train", QWEN3_8B, gpus=8, tensor_parallel=4, sequence_parallel=True, seq_length=8192).check()
    assert plan.data_parallel == 2 and plan.params_per_gpu == P_8B_TP4
    assert plan.weights_gib == pytest.approx(P_8B_TP4 * 2 / GiB)  # bf16
    assert plan.grads_gib == pytest.approx(P_8B_TP4 * 4 / GiB)  # fp32 main grads
    assert plan.optimizer_gib == pytest.approx(P_8B_TP4 * 12 / 2 / GiB)  # 12 B/param over DP 2
    # Per layer and token: 4h/4 + 3(32 + 8)128/4 + 3 x 12288/4 = 4096 + 3840 + 9216 elements of 2 B.
    activations = 36 * 2 * 8192 * (4096 + 3840 + 9216) / GiB
    logits = 8192 * 37984 * 4 * LOSS / GiB
    assert plan.activations_gib == pytest.approx(activations) and activations == pytest.approx(9.42, abs=0.01)
    assert plan.logits_gib == pytest.approx(logits)
    total = (P_8B_TP4 * (2 + 4 + 6)) / GiB + activations + logits + 2.0
    assert plan.total_gib == pytest.approx(total) and total == pytest.approx(36.95, abs=0.01)
    assert "36 layers x 2 B x 8,192 tokens x (4h/4 + 3(heads + kv_heads)d/TP + 3F/TP)" == plan.activation_formula


def test_training_moe_recipe():
    # TP 4 + SP, EP 8, ETP 1, full recompute, the Adam state on the CPU, 12,288-token micro-batches.
    kw = dict(gpus=8, tensor_parallel=4, expert_parallel=8, sequence_parallel=True, recompute="full", micro_batch_tokens=12288)
    plan = TrainingPlan("train", QWEN3_30B_A3B, cpu_offload_fraction=1.0, **kw).check()
    assert plan.params_per_gpu == P_MOE_DENSE + P_MOE_EXPERTS
    assert (plan.weights_gib, plan.grads_gib, plan.optimizer_gib) == pytest.approx(
        ((P_MOE_DENSE + P_MOE_EXPERTS) * 2 / GiB, (P_MOE_DENSE + P_MOE_EXPERTS) * 4 / GiB, 0.0))
    # Full recompute: 48 layer inputs of h/4 per token, plus one layer:
    # 4h/4 + 3(32 + 4)128/4 + 8(2048 + 3 x 768)/4 = 2048 + 3456 + 8704 elements per token.
    activations = (48 * 2 * 12288 * 2048 / 4 + 2 * 12288 * (2048 + 3456 + 8704)) / GiB
    logits = 12288 * 37984 * 4 * LOSS / GiB
    assert plan.activations_gib == pytest.approx(activations) and plan.logits_gib == pytest.approx(logits)
    assert plan.total_gib == pytest.approx((P_MOE_DENSE + P_MOE_EXPERTS) * 6 / GiB + activations + logits + 2.0)
    # Without offload: dense state over DP = 8 / 4 = 2, expert state over expert-DP = 8 / (8 x 1) = 1.
    on_gpu = TrainingPlan("train", QWEN3_30B_A3B, **kw)
    assert on_gpu.optimizer_gib == pytest.approx(12 * (P_MOE_DENSE / 2 + P_MOE_EXPERTS) / GiB)
    half = TrainingPlan("train", QWEN3_30B_A3B, cpu_offload_fraction=0.5, **kw)
    assert half.optimizer_gib == pytest.approx(on_gpu.optimizer_gib / 2)
    # The layout megatron-core rejects (expert TP defaults to TP: EP 8 x ETP 4 = 32 > 8 GPUs).
    with pytest.raises(ConfigError, match="EP x ETP x PP = 32 does not divide 8 GPUs"):
        TrainingPlan("train", QWEN3_30B_A3B, **{**kw, "expert_tensor_parallel": 4})


def test_training_refusal_names_every_single_fix():
    # Qwen3-8B at TP 1 on 8 GPUs: 15.3 weights + 30.5 grads + 11.4 Adam (over DP 8) + 37.7 activations
    # (36 x 2 B x 8192 x (4h + 3 x 40 x 128 + 3F)) + 10.6 logits + 2 = 107.5 GiB.
    plan = TrainingPlan("train", QWEN3_8B, gpus=8, seq_length=8192)
    activations = 36 * 2 * 8192 * (4 * 4096 + 3 * 40 * 128 + 3 * 12288) / GiB
    logits = 8192 * 151936 * 4 * LOSS / GiB
    total = P_8B_TP1 * (2 + 4 + 12 / 8) / GiB + activations + logits + 2
    assert plan.total_gib == pytest.approx(total) and total == pytest.approx(107.5, abs=0.1)
    # Fits after one change: full recompute (73 GiB); TP 2 (65 GiB); not PP 2 (85 GiB: 1F1B keeps all layers'
    # activations on the first stage) but PP 4 (77 GiB); not cpu offload (96 GiB); rows of at most
    # (80 - 59.2) / 48.3 x 8192 = 3,528 tokens -> 3,072.
    with pytest.raises(ConfigError) as err:
        plan.check()
    assert err.value.fix == ("set model.recompute=full or raise parallel.tensor_parallel to 2 or "
                             "raise parallel.pipeline_parallel to 4 or lower data.seq_length to 3,072")
    assert err.value.what.startswith("stage train: needs 107.5 GiB per GPU of 80")


def test_fp32_training_counts_4_byte_weights_and_8_byte_adam():
    plan = TrainingPlan("train", QWEN3_8B, gpus=8, tensor_parallel=4, sequence_parallel=True, precision="fp32")
    assert plan.weights_gib == pytest.approx(P_8B_TP4 * 4 / GiB)
    assert plan.optimizer_gib == pytest.approx(P_8B_TP4 * 8 / 2 / GiB)  # the params are the main params
    assert plan.activations_gib == pytest.approx(36 * 4 * 8192 * (4096 + 3840 + 9216) / GiB)


def test_from_train_config_reads_the_recipe_knobs():
    from megatron_lopd.config import apply_overrides
    from megatron_lopd.training.config import lightning_opd_defaults

    overrides = ["parallel.tensor_parallel=4", "parallel.expert_parallel=8", "parallel.sequence_parallel=true",
                 "optimizer.cpu_offload=true", "model.recompute=full", "data.micro_batch_tokens=12288"]
    config = apply_overrides(lightning_opd_defaults(), overrides)
    plan = TrainingPlan.from_train_config("train", QWEN3_30B_A3B, config, gpus=8)
    assert plan == TrainingPlan("train", QWEN3_30B_A3B, 8, tensor_parallel=4, expert_parallel=8, sequence_parallel=True,
                                cpu_offload_fraction=1.0, recompute="full", micro_batch_tokens=12288)


def test_format_plan_renders_every_stage():
    lines = format_plan([
        EnginePlan("score", QWEN3_32B, 40960, tensor_parallel=2, engines=4),
        EnginePlan("rollouts", QWEN3_8B, 5120, engines=8),
        TrainingPlan("train", QWEN3_8B, gpus=8, tensor_parallel=4, sequence_parallel=True),
    ])
    assert lines[0].split()[:3] == ["stage", "GPUs", "engines"]
    assert lines[1].split()[:5] == ["score", "8", "4", "x", "2"] and "128 KiB" in lines[1] and "7 x 40,960" in lines[1]
    assert "144 KiB" in lines[2] and "76 x 5,120" in lines[2]  # 53.9 GiB / 0.70 GiB
    assert lines[3].startswith("train: 8 GPUs, TP 4 PP 1 EP 1 ETP 1 CP 1 DP 2 SP, 2.05 B params/GPU")
    assert lines[4].endswith("= 37.0 of 80 GiB") and lines[5].startswith("  activations = 36 layers x 2 B")
    assert "DOES NOT FIT" in format_plan([EnginePlan("score", QWEN3_32B, 40960)])[1]


def test_context_parallel_splits_tokens_and_shards_adam_with_dp():
    # Qwen3-8B, TP 4, CP 2 on 8 GPUs: DP 1, but the Adam state is sharded over DP x CP = 2; each GPU
    # keeps activations and logits of 8192 / 2 tokens.
    plan = TrainingPlan("train", QWEN3_8B, gpus=8, tensor_parallel=4, context_parallel=2, sequence_parallel=True)
    assert plan.data_parallel == 1
    assert plan.optimizer_gib == pytest.approx(P_8B_TP4 * 12 / 2 / GiB)
    assert plan.activations_gib == pytest.approx(36 * 2 * 4096 * (4096 + 3840 + 9216) / GiB)
    assert plan.logits_gib == pytest.approx(4096 * 37984 * 4 * LOSS / GiB)
