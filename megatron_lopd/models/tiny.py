"""Small random Qwen3 / Qwen3-MoE checkpoints in Hugging Face format, built locally.

Used by tests (conversion, scoring, training) and the demo: no hub access anywhere.
head_dim >= 32 so that vLLM's CPU attention accepts the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lopd.models.tokenizer import build_char_tokenizer


def tiny_hf_config(
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    rope_theta: float = 1_000_000.0,
    moe: bool = False,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
):
    """A transformers Qwen3Config (or Qwen3MoeConfig with `moe=True`)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    if moe:
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=moe_intermediate_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
    from transformers import Qwen3Config

    return Qwen3Config(**common)


def write_random_hf_model(out_dir: str | Path, *, seed: int = 0, init_std: float = 0.05, tokenizer=None, **config_kwargs) -> Path:
    """Write a randomly initialised Qwen3(-MoE) model + tokenizer to `out_dir` (float32).

    `init_std` is larger than the usual 0.02 so that tiny models have non-trivial
    distributions (log-probs far from uniform) and comparisons actually test something.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_char_tokenizer()
    config_kwargs.setdefault("eos_token_id", tok.eos_token_id)
    config_kwargs.setdefault("pad_token_id", tok.pad_token_id)
    if len(tok) > config_kwargs.get("vocab_size", 128):
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than vocab_size")
    config = tiny_hf_config(**config_kwargs)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 hide mapping bugs (a swapped norm would go unseen)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))
    return out_dir
