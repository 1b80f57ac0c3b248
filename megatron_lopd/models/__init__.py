"""Qwen3 (dense and MoE) as megatron-core GPT models, and their Hugging Face mapping."""
