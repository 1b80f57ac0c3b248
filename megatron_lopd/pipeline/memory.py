"""The GPU memory plan: what each stage needs per GPU, refused before anything is submitted.

Pure arithmetic on a `Qwen3Config` and a stage's layout, so `lopd plan` runs on a laptop. Sizes
are GiB (2**30 B) of what CUDA reports per GPU (an "80 GB" H100: 79.2 GiB). `EnginePlan` (a vLLM
stage) and `TrainingPlan` (Megatron) compute their numbers on construction (a layout that does not
divide is a ConfigError there); `check()` raises a one-line ConfigError naming the stage, the
numbers and the fix; `format_plan` renders what `lopd plan` prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

from megatron_lopd.errors import ConfigError
from megatron_lopd.models.qwen3 import Qwen3Config, check_parallel_layout
from megatron_lopd.training.vocab_parallel import LOGIT_CHUNKS

GiB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_BLOCK = 16  # vLLM's default block size: a sequence's KV cache is whole blocks of 16 tokens
MAX_TENSOR_PARALLEL = 8  # one node: the largest TP a fix proposes
# vLLM memory beyond weights, KV cache and the profiled forward's activations: CUDA graphs, the
# sampler's warm-up on max_num_seqs rows, NCCL/cuBLAS buffers. Calibrated on two startup logs:
# Qwen3-32B TP1 on an H100 at 0.9, 8,192 batched tokens (vLLM 0.26: KV 8.52 GiB, ~0.4 GiB left
# beyond our activation term) and Qwen3-8B on a 32 GB RTX 5090 at 2,048 tokens (~1.5 GiB in all).
ENGINE_OVERHEAD_GIB = 1.5
# Training memory outside the tensors counted: CUDA context, NCCL communicators, TE/cuBLAS workspaces.
TRAIN_OVERHEAD_GIB = 2.0
LOSS_TEMPORARIES = 2.25 / LOGIT_CHUNKS  # training/vocab_parallel.py: 2.25 fp32 chunk temporaries
RECOMPUTE = ("", "selective", "full")


def _layer_params(m: Qwen3Config, tp: int, kv_heads: int, experts_split: int, expert_ffn_split: int) -> tuple[int, int]:
    """(non-expert, expert) parameters of one layer on one GPU; `kv_heads`: the K/V heads it holds."""
    h, d = m.hidden_size, m.head_dim
    attention = h * d * (2 * m.num_heads // tp + 2 * kv_heads)  # Q and O split by TP, K and V per held head
    norms = 2 * h + 2 * d  # the two layer norms and the Q/K norms: replicated on every rank
    if not m.is_moe:
        return attention + norms + 3 * h * m.ffn_hidden_size // tp, 0
    router = m.num_experts * h  # replicated (Megatron's router, vLLM's ReplicatedLinear gate)
    return attention + norms + router, m.num_experts // experts_split * 3 * h * (m.moe_ffn_hidden_size // expert_ffn_split)


def _vocab_params(m: Qwen3Config, tp: int) -> int:
    return -(-m.vocab_size // tp) * m.hidden_size  # one embedding or LM-head shard


@dataclass
class EnginePlan:
    """One vLLM engine stage: `engines` engines of `tensor_parallel` GPUs each.

    Mirrors vLLM 0.32 `v1/worker/gpu_worker.py` determine_available_memory (`utils/mem_utils.py`
    memory_profiling): KV budget per GPU = gpu_memory x gpu_memory_utilization - weights - reserve,
        reserve = ENGINE_OVERHEAD_GIB + max_num_batched_tokens x (2 h + ffn) x dtype bytes,
    the second term the peak of profile_run's dummy forward: hidden state and residual, the MLP's
    gate/up output and SiLU product, ffn = 3 F / TP (MoE: top_k x (3 F_e / TP + h), vLLM's fused-MoE
    caches). It computes logits only for max_num_seqs rows (the sampler warm-up, in the overhead).
    vLLM refuses to start when one max_model_len sequence's KV cache exceeds the budget
    (`v1/core/kv_cache_utils.py` _check_enough_kv_cache_memory). max_num_batched_tokens: vLLM's
    offline (`LLM`) default on GPUs of >= 70 GiB (`engine/arg_utils.py`).
    """

    stage: str
    model: Qwen3Config
    max_model_len: int
    tensor_parallel: int = 1
    engines: int = 1
    gpu_memory_gib: float = 80.0
    gpu_memory_utilization: float = 0.9
    dtype_bytes: int = 2  # weights and KV cache: bf16 2, fp32 4
    max_num_batched_tokens: int = 16384
    weights_gib: float = field(init=False)
    kv_bytes_per_token: int = field(init=False)  # per GPU
    reserve_gib: float = field(init=False)
    kv_budget_gib: float = field(init=False)
    sequence_kv_gib: float = field(init=False)  # one max_model_len sequence, whole blocks
    sequences_fit: int = field(init=False)
    fits: bool = field(init=False)

    def __post_init__(self) -> None:
        m, tp = self.model, self.tensor_parallel
        ffn = m.moe_ffn_hidden_size if m.is_moe else m.ffn_hidden_size
        if tp < 1 or m.num_heads % tp or ffn % tp or (m.num_kv_heads % tp and tp % m.num_kv_heads):
            raise ConfigError(f"stage {self.stage}: tensor_parallel {tp} does not divide {m.num_heads} heads, "
                              f"{m.num_kv_heads} KV heads and FFN {ffn}", "choose a tensor_parallel that divides the attention heads")
        if self.max_model_len < 1:
            raise ConfigError(f"stage {self.stage}: max_model_len={self.max_model_len}", "set max_model_len to the longest prompt + response")
        kv_heads = max(1, m.num_kv_heads // tp)  # vLLM replicates KV heads when TP > kv_heads
        dense, experts = _layer_params(m, tp, kv_heads, 1, tp)  # vLLM splits every expert by TP
        params = m.num_layers * (dense + experts) + _vocab_params(m, tp) * (1 if m.tie_word_embeddings else 2) + m.hidden_size
        self.weights_gib = params * self.dtype_bytes / GiB
        self.kv_bytes_per_token = m.num_layers * kv_heads * m.head_dim * 2 * self.dtype_bytes  # K and V
        intermediate = m.moe_top_k * (3 * ffn // tp + m.hidden_size) if m.is_moe else 3 * ffn // tp
        self.reserve_gib = ENGINE_OVERHEAD_GIB + self.max_num_batched_tokens * (2 * m.hidden_size + intermediate) * self.dtype_bytes / GiB
        self.kv_budget_gib = self.gpu_memory_gib * self.gpu_memory_utilization - self.weights_gib - self.reserve_gib
        self.sequence_kv_gib = math.ceil(self.max_model_len / KV_BLOCK) * KV_BLOCK * self.kv_bytes_per_token / GiB
        self.sequences_fit = max(0, math.floor(self.kv_budget_gib / self.sequence_kv_gib))
        self.fits = self.sequences_fit >= 1

    @property
    def longest_fitting_len(self) -> int:
        """The largest max_model_len (whole KV blocks) whose one sequence fits the budget."""
        return max(0, math.floor(self.kv_budget_gib * GiB / self.kv_bytes_per_token / KV_BLOCK) * KV_BLOCK)

    def check(self) -> EnginePlan:
        if self.fits:
            return self
        tp = next((t for t in range(self.tensor_parallel + 1, MAX_TENSOR_PARALLEL + 1) if _fits(self, tensor_parallel=t)), None)
        fixes = [f"raise tensor_parallel to {tp}"] if tp else []
        fixes += [f"lower max_model_len to {self.longest_fitting_len:,}"] if self.longest_fitting_len else []
        raise ConfigError(
            f"stage {self.stage}: one {self.max_model_len:,}-token sequence needs {self.sequence_kv_gib:.1f} GiB of KV cache per GPU, "
            f"but TP {self.tensor_parallel} leaves {self.kv_budget_gib:.1f} GiB ({self.gpu_memory_gib:g} GiB x {self.gpu_memory_utilization:g} "
            f"- {self.weights_gib:.1f} GiB weights - {self.reserve_gib:.1f} GiB activations and overhead)",
            " or ".join(fixes) or "use GPUs with more memory",
        )


@dataclass
class TrainingPlan:
    """A Megatron training stage on `gpus` GPUs: bytes per GPU of the most loaded rank.

    Parameters: attention, dense MLP and vocabulary split by TP, experts by EP x ETP, norms and the
    router replicated; PP splits the layers, the worst stage keeping one embedding/LM-head shard
    (both when PP = 1 and untied). bf16: weights 2 B/param, gradients 4 (grad_reduce_in_fp32,
    training/loop.py), Adam 12 (fp32 main params + two moments) sharded by the distributed optimizer
    over DP x CP = gpus / (TP x PP), expert params over gpus / (EP x ETP x PP); fp32: 4, 4 and 8 (the
    params are the main params). `cpu_offload_fraction` f keeps (1 - f) of the Adam state on the GPU.
    Activations, in the weights' dtype (a bytes), for the micro-batch's T tokens (micro_batch_size x
    seq_length; with micro_batch_tokens, up to max(micro_batch_tokens, seq_length)), per layer:
        a x T/CP x (4h/s + 3 (heads + kv_heads) head_dim / TP + mlp),  s = TP with SP, else 1,
        mlp = 3 F / TP, or MoE top_k (ETP h + 3 F_e) / TP (balanced routing):
    norm inputs and outputs; Q, K before and after QK-norm/RoPE, V, attention output; gate/up and the
    SiLU product. Times the layers: 1F1B keeps PP micro-batches of layers/PP in flight on the first
    stage. FlashAttention keeps no s x s scores, so selective recompute counts as none; full keeps
    each layer's input (a x T/CP x h/s) plus one layer. Logits and loss: fp32 [T/CP, vocab/TP], their
    gradient and 2.25 / LOGIT_CHUNKS temporaries (training/vocab_parallel.py).
    """

    stage: str
    model: Qwen3Config
    gpus: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    cpu_offload_fraction: float = 0.0
    recompute: str = ""
    seq_length: int = 8192
    micro_batch_size: int = 1
    micro_batch_tokens: int = 0
    precision: str = "bf16"  # or "fp32"
    gpu_memory_gib: float = 80.0
    data_parallel: int = field(init=False)
    params_per_gpu: int = field(init=False)
    weights_gib: float = field(init=False)
    grads_gib: float = field(init=False)
    optimizer_gib: float = field(init=False)
    tokens: int = field(init=False)  # of the largest micro-batch
    activations_gib: float = field(init=False)
    activation_formula: str = field(init=False)
    logits_gib: float = field(init=False)
    total_gib: float = field(init=False)
    fits: bool = field(init=False)

    @classmethod
    def from_train_config(cls, stage: str, model: Qwen3Config, config, gpus: int, gpu_memory_gib: float = 80.0) -> TrainingPlan:
        """From a `training.config.TrainConfig` (precision auto plans bf16: the GPU case)."""
        p, o, d = config.parallel, config.optimizer, config.data
        same = ("tensor_parallel", "pipeline_parallel", "expert_parallel", "expert_tensor_parallel", "context_parallel", "sequence_parallel")
        return cls(
            stage, model, gpus, **{name: getattr(p, name) for name in same}, distributed_optimizer=p.use_distributed_optimizer,
            cpu_offload_fraction=o.cpu_offload_fraction if o.cpu_offload else 0.0, recompute=config.model.recompute,
            seq_length=d.seq_length, micro_batch_size=d.micro_batch_size, micro_batch_tokens=d.micro_batch_tokens,
            precision="fp32" if config.model.precision == "fp32" else "bf16", gpu_memory_gib=gpu_memory_gib,
        )

    def __post_init__(self) -> None:
        m, tp, pp = self.model, self.tensor_parallel, self.pipeline_parallel
        expert_group = self.expert_parallel * self.expert_tensor_parallel * pp
        self._check_layout(expert_group)
        a = 4 if self.precision == "fp32" else 2  # bytes of weights and activations
        dense, experts = _layer_params(m, tp, m.num_kv_heads // tp, self.expert_parallel, self.expert_tensor_parallel)
        vocab_copies = 2 if pp == 1 and not m.tie_word_embeddings else 1
        dense, experts = m.num_layers // pp * dense + vocab_copies * _vocab_params(m, tp) + m.hidden_size, m.num_layers // pp * experts
        self.data_parallel = self.gpus // (tp * pp * self.context_parallel)
        self.params_per_gpu = dense + experts
        self.weights_gib = self.params_per_gpu * a / GiB
        self.grads_gib = self.params_per_gpu * 4 / GiB
        # megatron-core shards the state over its data-parallel group with CP, and the expert-DP group.
        dp, edp = (self.gpus // (tp * pp), self.gpus // expert_group) if self.distributed_optimizer else (1, 1)
        self.optimizer_gib = (8 if a == 4 else 12) * (dense / dp + experts / edp) * (1 - self.cpu_offload_fraction) / GiB
        self.tokens = max(self.micro_batch_tokens, self.seq_length) if self.micro_batch_tokens else self.micro_batch_size * self.seq_length
        self.activations_gib, self.activation_formula = self._activations(a)
        self.logits_gib = self.tokens / self.context_parallel * -(-m.vocab_size // tp) * 4 * (2 + LOSS_TEMPORARIES) / GiB
        self.total_gib = sum((self.weights_gib, self.grads_gib, self.optimizer_gib, self.activations_gib, self.logits_gib, TRAIN_OVERHEAD_GIB))
        self.fits = self.total_gib <= self.gpu_memory_gib

    def _check_layout(self, expert_group: int) -> None:
        where, tp, pp = f"stage {self.stage}", self.tensor_parallel, self.pipeline_parallel
        check_parallel_layout(self.model, tp, pp, self.expert_parallel, etp=self.expert_tensor_parallel, where=where)
        if self.context_parallel < 1 or self.recompute not in RECOMPUTE:
            raise ConfigError(f"{where}: context_parallel={self.context_parallel}, recompute={self.recompute!r}", f"use CP >= 1, recompute in {RECOMPUTE}")
        for name, group in (("TP x PP x CP", tp * pp * self.context_parallel), ("EP x ETP x PP", expert_group)):
            if self.gpus % group:
                raise ConfigError(f"{where}: {name} = {group} does not divide {self.gpus} GPUs", "choose parallel sizes that divide the GPUs")

    def _activations(self, a: int) -> tuple[float, str]:
        """(GiB, formula) of the activations a micro-batch keeps for backward (class docstring)."""
        m, tp = self.model, self.tensor_parallel
        t, s = self.tokens / self.context_parallel, tp if self.sequence_parallel else 1
        mlp = m.moe_top_k * (self.expert_tensor_parallel * m.hidden_size + 3 * m.moe_ffn_hidden_size) if m.is_moe else 3 * m.ffn_hidden_size
        layer = a * t * (4 * m.hidden_size / s + 3 * (m.num_heads + m.num_kv_heads) * m.head_dim / tp + mlp / tp)
        tokens = f"{a} B x {self.tokens:,} tokens" + (f"/CP {self.context_parallel}" if self.context_parallel > 1 else "")
        terms = f"(4h/{s} + 3(heads + kv_heads)d/TP + {'top_k(ETP h + 3F_e)' if m.is_moe else '3F'}/TP)"
        if self.recompute == "full":
            return (m.num_layers * a * t * m.hidden_size / s + layer) / GiB, f"{m.num_layers} layers x {tokens} x h/{s} + one layer x {terms}"
        return m.num_layers * layer / GiB, f"{m.num_layers} layers x {tokens} x {terms}"

    def check(self) -> TrainingPlan:
        if self.fits:
            return self
        raise ConfigError(
            f"stage {self.stage}: needs {self.total_gib:.1f} GiB per GPU of {self.gpu_memory_gib:g} (weights {self.weights_gib:.1f}, "
            f"grads {self.grads_gib:.1f}, optimizer {self.optimizer_gib:.1f}, activations {self.activations_gib:.1f}, "
            f"logits {self.logits_gib:.1f}, overhead {TRAIN_OVERHEAD_GIB:g})",
            " or ".join(self._fixes()) or "combine model.recompute=full, optimizer.cpu_offload=true and more GPUs",
        )

    def _fixes(self) -> list[str]:
        """Each kind of single change that makes the plan fit, at its smallest."""
        tokens = "micro_batch_tokens" if self.micro_batch_tokens else "seq_length"
        shorter = [{tokens: n, "seq_length": min(n, self.seq_length)} for n in range((getattr(self, tokens) - 1) // 1024 * 1024, 0, -1024)]
        kinds = [
            [("set model.recompute=full", {"recompute": "full"})] if self.recompute != "full" else [],
            [("set optimizer.cpu_offload=true", {"cpu_offload_fraction": 1.0})] if self.distributed_optimizer and self.cpu_offload_fraction < 1 else [],
            [(f"raise parallel.tensor_parallel to {t}", {"tensor_parallel": t}) for t in range(self.tensor_parallel + 1, MAX_TENSOR_PARALLEL + 1)],
            [(f"raise parallel.pipeline_parallel to {p}", {"pipeline_parallel": p}) for p in range(self.pipeline_parallel + 1, self.gpus + 1)],
            [(f"lower data.{tokens} to {c[tokens]:,}", c) for c in shorter],  # rows never longer than the token budget
        ]
        found = (next((text for text, changes in kind if _fits(self, **changes)), None) for kind in kinds)
        return [text for text in found if text]


def _fits(plan: EnginePlan | TrainingPlan, **changes) -> bool:
    """Whether the plan with these changes is a valid layout that fits."""
    try:
        return dataclasses.replace(plan, **changes).fits
    except ConfigError:
        return False


def format_plan(plans: Sequence[EnginePlan | TrainingPlan]) -> list[str]:
    """The lines `lopd plan` prints: a table of the engine stages, then each training stage."""
    engines = [p for p in plans if isinstance(p, EnginePlan)]
    header = f"{'stage':<12} {'GPUs':>4}  {'engines x TP':>12}  {'weights/GPU':>11}  {'KV/token':>9}  {'KV budget':>9}  max-length sequences"
    lines = [header] if engines else []
    for p in engines:
        lines.append(
            f"{p.stage:<12} {p.engines * p.tensor_parallel:>4}  {f'{p.engines} x {p.tensor_parallel}':>12}  {p.weights_gib:>7.1f} GiB  "
            f"{p.kv_bytes_per_token / 1024:>5.0f} KiB  {p.kv_budget_gib:>5.1f} GiB  {p.sequences_fit} x {p.max_model_len:,}"
            + ("" if p.fits else "  DOES NOT FIT")
        )
    for p in (p for p in plans if isinstance(p, TrainingPlan)):
        offload = f" ({p.cpu_offload_fraction:.0%} of it on CPU)" if p.cpu_offload_fraction else ""
        lines += [
            f"{p.stage}: {p.gpus} GPUs, TP {p.tensor_parallel} PP {p.pipeline_parallel} EP {p.expert_parallel} ETP {p.expert_tensor_parallel} "
            f"CP {p.context_parallel} DP {p.data_parallel}{' SP' if p.sequence_parallel else ''}, {p.params_per_gpu / 1e9:.2f} B params/GPU",
            f"  weights {p.weights_gib:.1f} + grads {p.grads_gib:.1f} + optimizer {p.optimizer_gib:.1f}{offload} + activations "
            f"{p.activations_gib:.1f} + logits/loss {p.logits_gib:.1f} + overhead {TRAIN_OVERHEAD_GIB:g} = {p.total_gib:.1f} of "
            f"{p.gpu_memory_gib:g} GiB" + ("" if p.fits else "  DOES NOT FIT"),
            f"  activations = {p.activation_formula}",
        ]
    return lines


# ---- a pipeline's plan ------------------------------------------------------------------------
PROMPT_ALLOWANCE = 1024  # tokens of prompt the plan assumes (it reads no prompt file)


def model_of(path: str) -> Qwen3Config | None:
    """The architecture at `path`: its config.json, else the named Qwen3 config its directory name
    spells (`/models/Qwen3-32B` -> qwen3_32b, for a dry run on a machine without the models)."""
    from pathlib import Path

    from megatron_lopd.models.qwen3 import NAMED_CONFIGS, named_config

    if (Path(path) / "config.json").is_file():
        return Qwen3Config.from_hf(path)
    name = Path(path).name.lower().replace("-", "_").replace(".", "_")
    name = next((n for n in sorted(NAMED_CONFIGS, key=len, reverse=True) if name == n or name.startswith(n + "_")), None)
    return named_config(name) if name else None


def pipeline_plans(config, gpus_per_node: int, gpu_memory_gib: float) -> list[EnginePlan | TrainingPlan]:
    """Every stage's plan for a PipelineConfig on nodes of `gpus_per_node` GPUs of `gpu_memory_gib`.
    Engine lengths: max_model_len when set, else max_tokens + PROMPT_ALLOWANCE (scoring: the
    rollouts' max_tokens + the allowance + 1). A stage whose model is unknown is left out."""
    from megatron_lopd.pipeline.stages import train_overrides
    from megatron_lopd.training.config import resolve_config

    teacher, student = model_of(config.teacher), model_of(config.base_student)
    engine_stages = (("sft_data", teacher, config.sft_data.max_tokens), ("rollouts", student, config.rollouts.max_tokens),
                     ("score", teacher, config.rollouts.max_tokens + 1), ("eval", student, _eval_max_tokens(config)))
    plans: list[EnginePlan | TrainingPlan] = []
    for stage, model, tokens in engine_stages:
        s = getattr(config, stage)
        if model is None or (stage == "eval" and not (config.eval_data or config.eval.suite)):
            continue
        per_node = s.engines_per_node or max(1, gpus_per_node // s.tensor_parallel)
        plans.append(EnginePlan(stage, model, s.max_model_len or tokens + PROMPT_ALLOWANCE, s.tensor_parallel, per_node * s.nodes,
                                gpu_memory_gib, s.gpu_memory_utilization or 0.9, DTYPE_BYTES[s.dtype]))
    paths = {"model.start_from": "/m", "data.store": "/s", "data.sft_data": "/d"}  # placeholders: layout only
    for stage, s in (("sft", config.sft), ("train", config.trainer)):
        if student is not None:
            train = resolve_config(s.config, train_overrides(s, paths))
            plans.append(TrainingPlan.from_train_config(stage, student, train, s.nproc_per_node * s.nnodes, gpu_memory_gib))
    return plans


def _eval_max_tokens(config) -> int:
    """The eval stage's longest response: a suite's longest benchmark budget (overrides applied)."""
    if not config.eval.suite:
        return config.eval.max_tokens
    run = config.eval.suite_run()
    return max(run.config(b).max_tokens for b in run.selected())


def check_plans(plans: Sequence[EnginePlan | TrainingPlan]) -> None:
    """Raise the first stage's one-line ConfigError that cannot fit."""
    for p in plans:
        p.check()
