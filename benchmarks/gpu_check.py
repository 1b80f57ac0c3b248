"""GPU check of the training path, in one process: numerics, step time, memory, checkpoints.

What it runs (issue #19), each check printing one line and recording pass/fail and its numbers
in the JSON summary named by --out (always written, also when a check fails or crashes):

1. environment: device name, versions, the layer spec (Transformer Engine or megatron-core's
   local one), the fused-softmax guard, megatron's torch.compile'd fusions (GPU only).
2. logits: one packed row (several sequences, block-diagonal causal mask, --logit-tokens
   tokens) through the library's Megatron model (`models.qwen3.build_model`) in bf16
   (Float16Module, as the trainer runs it) and in fp32 on this device, against an independent
   plain-torch fp32 Qwen3 forward on the CPU fed the same weights (the HF-named tensors the
   library's `hf_mapping.gather_hf_state_dict` gathers from the Megatron model; weights are
   rounded to bf16 first, so bf16 and fp32 models hold identical values). The row is short
   (256 tokens at the real shape) because the CPU reference at Qwen3-1.7B runs on the GPU
   machine's 16 cores. On CPU (the toy run, CI) the same comparison checks megatron-core's CPU
   path against the reference, so CUDA ~ reference ~ megatron-on-CPU.
3. step time: the library's `training.loop.Trainer` (bf16 + distributed optimizer on GPU) on
   synthetic packed rows of mixed lengths, Lightning OPD and SFT steps on the same batches
   (same rows, same model and optimizer; only the loss and what the batch carries differ).
   Both variants are warmed up first (--warmup steps each; at the real shape one warm-up step
   was not enough), then timed alternately (OPD/SFT, SFT/OPD, ...) with the device
   synchronised around each step: median step time, their ratio (target <= 1.05 on GPU),
   tokens/s/GPU, MFU (the library's `metrics_log.peak_tflops` / `mfu`), and the peak GPU
   memory of each variant (`torch.cuda.max_memory_allocated`, reset before every step).
4. checkpoint: a fresh Trainer trains k steps, saves (`Trainer.save_checkpoint`: megatron
   dist-checkpoint with model, distributed-optimizer state and RNG), trains steps k+1 and k+2;
   then it is freed and a new Trainer resumes from the checkpoint (`checkpoint.resume=DIR`, the
   product's resume path in `Trainer.setup`) and trains the same two steps. Step k+1's loss
   (the weights) must be identical, step k+2's (Adam moments, step count, scheduler) too, to
   the tolerances below.

The data is synthetic and in memory (`training.data.InMemorySource` behind an `OfflineData`
provider): no teacher store, so the check needs only torch and megatron-core (no zarr, TE,
vLLM or transformers). Reading the store is not in the step time here; with data.prefetch it
overlaps the step in training (benchmarks/bench_train_step.py measures that path on CPU).

    python benchmarks/gpu_check.py --out gpu_check.json                 # GPU: qwen3_1_7b
    python benchmarks/gpu_check.py --out gpu_check.json --shape auto     # largest that fits
    python benchmarks/gpu_check.py --out toy.json --toy                  # CPU (CI), < 1 min

Exit status: 0 when every correctness check passed, 1 otherwise (the JSON is written either
way); the step-time target and the time budget are reported, not gating. How to run it on the
device tool: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a plain checkout: no `pip install` of the repo needed
    sys.path.insert(0, str(REPO))

SCHEMA = "megatron-lopd/gpu_check/1"

# ---- tolerances (also written to the JSON) -----------------------------------------------
# Logits are compared over every position and the whole vocabulary of the row:
#   rel_l2 = ||got - ref|| / ||ref||; logprob = |log_softmax(got) - log_softmax(ref)| at the
#   row's next-token targets (what the losses read).
TOLERANCES = {
    # fp32 on this device vs the fp32 CPU reference: the same arithmetic up to summation order
    # (TF32 is switched off for this comparison). Measured on CPU (megatron-core's CPU path) at
    # qwen3_0_6b, 256 tokens: rel_l2 8.8e-7, logprob 1.9e-6.
    "logits_fp32": {"rel_l2": 1e-4, "logprob_max_abs": 1e-4},
    # bf16 (Float16Module: bf16 weights and activations, fp32 softmax and logits) vs the fp32 CPU
    # reference on the same (bf16-representable) weights: bf16 rounding of every activation.
    # Measured on CPU at qwen3_0_6b, 256 tokens: rel_l2 1.3e-2, logprob 2.3e-2 (top-1 agreement
    # 0.95: reported only, random weights give nearly flat logits whose argmax bf16 flips).
    "logits_bf16": {"rel_l2": 5e-2, "logprob_max_abs": 0.1},
    # Resume: step k+1's loss is a forward pass of the restored weights (bitwise expected);
    # step k+2's also went through one update with the restored Adam state (kernels that
    # accumulate with atomics on GPU may change the last bits). Relative to max(1, |loss|).
    "resume_next_loss_rel": 1e-6,
    "resume_second_loss_rel": 1e-5,
    # Performance targets (reported, not gating the exit status).
    "step_time_ratio_max_gpu": 1.05,
    "time_budget_s": 480,
}

# Model + optimizer state per parameter with bf16 + the distributed optimizer at DP=1:
# bf16 weights 2, fp32 grad buffer 4 (grad_reduce_in_fp32), fp32 main params 4, Adam m and v 8.
STATE_BYTES_PER_PARAM = {"bf16": 18, "fp32": 16}
# On disk: the model weights (2 or 4) + fp32 main params and Adam m, v (12).
CKPT_BYTES_PER_PARAM = {"bf16": 14, "fp32": 16}
# `--shape auto`: the largest dense shape whose model + optimizer state uses at most this
# fraction of the GPU, leaving the rest for activations (the local spec materialises the
# attention matrix), the 151,936-wide logits and the allocator.
AUTO_STATE_FRACTION = 0.6

GPU_DEFAULTS = dict(shape="qwen3_1_7b", seq_length=2048, global_batch=32, warmup=3, steps=8, logit_tokens=256,
                    ckpt_steps=2, lr=1e-6, ckpt_lr=1e-4, top_k=8, num_sequences=256)
TOY_DEFAULTS = dict(shape="tiny", seq_length=128, global_batch=8, warmup=2, steps=3, logit_tokens=64,
                    ckpt_steps=2, lr=1e-4, ckpt_lr=1e-3, top_k=4, num_sequences=48)

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def gib(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**30, 3)


class Report:
    """The JSON summary: sections of numbers plus named checks (gating or not)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"schema": SCHEMA, "ok": None, "failed": [], "tolerances": TOLERANCES, "checks": {}, "phases_s": {}}

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})

    def check(self, name: str, passed: bool, *, gating: bool = True, detail: str = "", **numbers) -> bool:
        self.data["checks"][name] = {"passed": bool(passed), "gating": gating, "detail": detail, **numbers}
        tag = ("PASS" if passed else "FAIL") if gating else ("ok" if passed else "MISSED")
        shown = " ".join(f"{k}={_short(v)}" for k, v in numbers.items())
        print(f"CHECK {name}: {tag}{' (reported, not gating)' if not gating else ''} {shown}{' - ' + detail if detail else ''}", flush=True)
        return passed

    def write(self) -> None:
        failed = [k for k, c in self.data["checks"].items() if c["gating"] and not c["passed"]]
        self.data["failed"] = failed
        self.data["ok"] = not failed
        self.data["elapsed_s"] = round(time.perf_counter() - T0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default) + "\n")
        os.replace(tmp, self.path)


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return repr(o)


# ---- device, shapes ------------------------------------------------------------------------


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> dict:
    """Collect garbage and return the CUDA cache; what is still allocated afterwards."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {"allocated_gib": gib(torch.cuda.memory_allocated()), "reserved_gib": gib(torch.cuda.memory_reserved())}


def host_peak_rss_gib() -> float | None:
    try:
        import resource

        return gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    except (ImportError, OSError):
        return None


def shape_table(device_bytes: int | None, precision: str) -> list[dict]:
    """Parameters and model + optimizer state of every dense named Qwen3 shape."""
    from megatron_lopd.models.qwen3 import NAMED_CONFIGS, named_config

    rows = []
    for name in NAMED_CONFIGS:
        q = named_config(name)
        if name == "tiny" or q.is_moe:
            continue
        params = q.num_params()
        state = params * STATE_BYTES_PER_PARAM[precision]
        rows.append({"shape": name, "params": params, "state_gib": gib(state),
                     "state_fraction": round(state / device_bytes, 3) if device_bytes else None,
                     "fits": bool(device_bytes) and state <= AUTO_STATE_FRACTION * device_bytes})
    return rows


def choose_shape(requested: str, table: list[dict]) -> tuple[str, str]:
    if requested != "auto":
        return requested, "named on the command line"
    fitting = [r for r in table if r["fits"]]
    if not fitting:
        return "tiny", "no named shape fits this device"
    best = max(fitting, key=lambda r: r["params"])
    return best["shape"], (f"largest dense Qwen3 whose bf16 + distributed-optimizer state ({best['state_gib']} GiB) is at most "
                           f"{AUTO_STATE_FRACTION:.0%} of the GPU's memory")


# ---- synthetic data ----------------------------------------------------------------------------


def synthetic_sequences(num: int, vocab: int, seq_length: int, top_k: int, seed: int):
    """Prompt + response pairs of mixed lengths (log-uniform totals from seq_length/32 to
    seq_length) with teacher log-probs, teacher top-k and rollout log-probs."""
    import numpy as np

    from megatron_lopd.training.data import TrainSequence

    rng = np.random.default_rng(seed)
    low = max(8, seq_length // 32)
    out = []
    for i in range(num):
        total = int(round(math.exp(rng.uniform(math.log(low), math.log(seq_length)))))
        total = min(max(total, 6), seq_length)
        prompt = max(2, int(total * rng.uniform(0.05, 0.3)))
        response = max(2, total - prompt)
        topk_lp = -np.sort(rng.exponential(1.5, (response, top_k)), axis=1).astype(np.float32)
        out.append(TrainSequence(
            index=i,
            prompt_ids=rng.integers(2, vocab, prompt).astype(np.int32),
            response_ids=rng.integers(2, vocab, response).astype(np.int32),
            teacher_logprobs=(-rng.exponential(1.0, response)).astype(np.float32),
            topk_ids=rng.integers(0, vocab, (response, top_k)).astype(np.int32),
            topk_logprobs=topk_lp,
            rollout_logprobs=(-rng.exponential(1.0, response)).astype(np.float32),
        ))
    return out


def synthetic_provider(sequences):
    """A `training.data.DataProvider` over in-memory sequences: `OfflineData`'s stream (the
    trainer's own packing and collation), without a store, SFT artifact or lineage."""
    from megatron_lopd.provenance import Lineage
    from megatron_lopd.training.data import InMemorySource, OfflineData

    class SyntheticData(OfflineData):
        def __init__(self):
            self.source = InMemorySource(sequences, path="synthetic")

        def requires_lineage(self, config) -> bool:
            return False  # random weights, random data: no provenance to check

        def reopen(self, config):
            return self.source

        def open(self, config, start):
            return self.source, Lineage(), {"start_from": config.model.named, "data": "synthetic", "sequences": len(sequences)}

    return SyntheticData()


def sft_view(sequences):
    """The same sequences as the SFT artifact would hold them: prompt and response only."""
    from megatron_lopd.training.data import InMemorySource, TrainSequence

    return InMemorySource([TrainSequence(index=s.index, prompt_ids=s.prompt_ids, response_ids=s.response_ids) for s in sequences],
                          path="synthetic-sft")


def train_config(args, shape: str, run_dir: Path, *, loss: str = "lightning_opd", lr: float, **extra):
    from megatron_lopd.training.config import resolve_config

    overrides = {
        "run_dir": run_dir,
        "loss": loss,
        "model.named": shape,
        "model.precision": args.precision,
        "data.store": "synthetic",  # the data comes from the provider; the key only has to be set
        "data.sft_data": "synthetic",
        "data.global_batch": args.global_batch,
        "data.seq_length": args.seq_length,
        "data.micro_batch_size": 1,
        "data.prefetch": "false",
        "train_steps": 10**6,
        "optimizer.lr": lr,
        "checkpoint.save_every": 0,
        "checkpoint.keep_last": 0,
        "checkpoint.export_hf": "false",
        "logging.tensorboard": "false",
        "logging.progress": "false",
        "parallel.use_distributed_optimizer": "true",
        **extra,
    }
    return resolve_config(loss, [f"{k}={v}" for k, v in overrides.items()])


# ---- phase 1: environment ---------------------------------------------------------------------


def phase_environment(report: Report, args) -> None:
    import torch

    from megatron_lopd.runtime.versions import versions

    env = report.section("environment")
    dev = report.section("device")
    if on_gpu():
        props = torch.cuda.get_device_properties(0)
        dev.update(kind="cuda", name=torch.cuda.get_device_name(0), total_memory_gib=gib(props.total_memory),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    else:
        dev.update(kind="cpu", name=platform.processor() or platform.machine(), total_memory_gib=None)
    dev.update(cpu_threads=torch.get_num_threads(), cpus=os.cpu_count(), python=platform.python_version(), host=platform.node())
    report.data["gpu_name"] = dev["name"] if on_gpu() else None
    report.data["versions"] = versions()
    log(f"device: {dev['name']} ({dev['kind']}); versions {report.data['versions']}")

    from megatron_lopd.models import qwen3 as Q

    reason = Q.te_unavailable_reason()
    env["transformer_engine"] = reason or "usable"
    env["layer_spec"] = "transformer_engine" if reason is None else "local"
    env["tf32_matmul_default"] = bool(torch.backends.cuda.matmul.allow_tf32)
    from megatron_lopd.runtime import ParallelConfig, init_distributed

    t0 = time.perf_counter()
    info = init_distributed(ParallelConfig(), seed=args.seed)  # NCCL on GPU, gloo on CPU; world size 1
    env["distributed"] = {"backend": torch.distributed.get_backend(), "world_size": info.world_size, "launcher": info.launcher,
                          "init_s": round(time.perf_counter() - t0, 2)}
    if on_gpu():
        fused_softmax_guard(report, env)
        torch_compile_smoke(report, env)


def fused_softmax_guard(report: Report, env: dict) -> None:
    """megatron-core's fused masked softmax needs CUDA extensions that its wheel does not ship
    (ModuleNotFoundError at the first forward of rows of 17-4096 tokens), and its causal
    variant ignores the block-diagonal mask of packed rows. The library must not enable it on
    the local spec."""
    import importlib.util

    import torch

    from megatron_lopd.models import qwen3 as Q

    if env["layer_spec"] != "local":
        return
    kernels = {m: importlib.util.find_spec(m) is not None
               for m in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_softmax_cuda")}
    enabled = bool(Q.transformer_config(Q.named_config("tiny"), params_dtype=torch.bfloat16, bf16=True).masked_softmax_fusion)
    env["fused_softmax"] = {"library_enables": enabled, "kernels_importable": kernels}
    report.check("fused_softmax_off_on_local_spec", not enabled, library_enables=enabled, kernels=all(kernels.values()),
                 detail="" if not enabled else "masked_softmax_fusion=True: crashes without the kernels, ignores packed masks with them")


def torch_compile_smoke(report: Report, env: dict) -> None:
    """megatron-core torch.compile's its bias-dropout-add fusion on GPU (jit_fuser): Triton and a
    C compiler must work. On failure the rest runs eagerly (dynamo's suppress_errors)."""
    import torch

    from megatron.core.fusions.fused_bias_dropout import bias_dropout_add_fused_train

    t0 = time.perf_counter()
    try:
        x = torch.randn(64, 2, 128, device="cuda", dtype=torch.bfloat16)
        out = bias_dropout_add_fused_train((x, None), x, 0.0)
        torch.cuda.synchronize()
        ok, detail = bool(torch.allclose(out.float(), 2 * x.float())), ""
    except Exception as exc:  # noqa: BLE001 - reported, then worked around
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        env.setdefault("workarounds", []).append("torch._dynamo.config.suppress_errors=True (compiled fusions run eagerly)")
    env["torch_compile_s"] = round(time.perf_counter() - t0, 2)
    report.check("torch_compile_fusion", ok, seconds=env["torch_compile_s"], detail=detail)


# ---- phase 2: logits ---------------------------------------------------------------------------


def logits_row(q, tokens: int, seed: int):
    """One packed row: three sequences of mixed lengths, as TrainData lays them out."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    cuts = sorted({max(2, int(tokens * f)) for f in (0.45, 0.8)})
    lengths = [cuts[0], cuts[1] - cuts[0], tokens - cuts[1]]
    lengths = [n for n in lengths if n >= 2]
    ids = torch.from_numpy(rng.integers(2, q.vocab_size, sum(lengths))).long()
    seq_ids = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    # Next-token targets inside each sequence (the last position of a sequence has none).
    targets = torch.full_like(ids, -1)
    same = seq_ids[1:] == seq_ids[:-1]
    targets[:-1] = torch.where(same, ids[1:], torch.full_like(ids[1:], -1))
    return ids, position_ids, seq_ids, targets, lengths


def _rms(x, weight, eps):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_logits(hf: dict, q, ids, position_ids, seq_ids):
    """Qwen3 forward in plain torch on the CPU (fp32), from Hugging Face-named tensors:
    RMSNorm, GQA attention with per-head QK RMSNorm and RoPE (rotate-half), SwiGLU, block-diagonal
    causal attention over the packed sequences, positions restarting per sequence."""
    import torch

    T, nh, nkv, hd, eps = len(ids), q.num_heads, q.num_kv_heads, q.head_dim, q.rms_norm_eps
    with torch.no_grad():
        x = hf["model.embed_tokens.weight"][ids]
        inv_freq = 1.0 / (q.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        freqs = position_ids.float()[:, None] * inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]

        def rope(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        allowed = (seq_ids[:, None] == seq_ids[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
        for layer in range(q.num_layers):
            p = f"model.layers.{layer}."
            h = _rms(x, hf[p + "input_layernorm.weight"], eps)
            qh = (h @ hf[p + "self_attn.q_proj.weight"].T).view(T, nh, hd)
            kh = (h @ hf[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd)
            vh = (h @ hf[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd)
            qh = rope(_rms(qh, hf[p + "self_attn.q_norm.weight"], eps))
            kh = rope(_rms(kh, hf[p + "self_attn.k_norm.weight"], eps))
            kh, vh = kh.repeat_interleave(nh // nkv, dim=1), vh.repeat_interleave(nh // nkv, dim=1)
            scores = torch.einsum("thd,shd->hts", qh, kh) / math.sqrt(hd)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            ctx = torch.einsum("hts,shd->thd", probs, vh).reshape(T, nh * hd)
            x = x + ctx @ hf[p + "self_attn.o_proj.weight"].T
            h = _rms(x, hf[p + "post_attention_layernorm.weight"], eps)
            gate, up = h @ hf[p + "mlp.gate_proj.weight"].T, h @ hf[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ hf[p + "mlp.down_proj.weight"].T
        x = _rms(x, hf["model.norm.weight"], eps)
        head = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
        return x @ head.T


def compare_logits(got, ref, targets) -> dict:
    import torch

    got, ref = got.double(), ref.double()
    diff = got - ref
    valid = targets >= 0
    lp_got = torch.log_softmax(got, -1)[valid].gather(-1, targets[valid, None])[:, 0]
    lp_ref = torch.log_softmax(ref, -1)[valid].gather(-1, targets[valid, None])[:, 0]
    lp = (lp_got - lp_ref).abs()
    return {
        "rel_l2": float(diff.norm() / ref.norm()),
        "max_abs": float(diff.abs().max()),
        "ref_abs_max": float(ref.abs().max()),
        "ref_std": float(ref.std()),
        "logprob_max_abs": float(lp.max()),
        "logprob_mean_abs": float(lp.mean()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
    }


def megatron_forward(model, ids, position_ids, seq_ids, use_te: bool, device):
    """The trainer's forward (TrainStep.forward_step): block-diagonal mask on the local spec,
    THD packed sequences on TE."""
    import torch

    from megatron_lopd.training.data import block_causal_mask, packed_seq_params

    sid = seq_ids[None].to(device)
    packed, mask = (packed_seq_params(sid), None) if use_te else (None, block_causal_mask(sid))
    model.eval()
    with torch.no_grad():
        out = model(ids[None].to(device), position_ids[None].to(device), mask, packed_seq_params=packed)
    return out[0].float().cpu()


def phase_logits(report: Report, args, shape: str) -> None:
    import torch

    from megatron.core.transformer.module import Float16Module

    from megatron_lopd.models.hf_mapping import gather_hf_state_dict
    from megatron_lopd.models.qwen3 import build_model, named_config, te_available
    from megatron_lopd.runtime import ParallelConfig, device, init_distributed

    sec = report.section("logits")
    q = named_config(shape)
    init_distributed(ParallelConfig(), seed=args.seed)
    dev = device()
    use_te = te_available()
    ids, pos, sids, targets, lengths = logits_row(q, args.logit_tokens, args.seed)
    sec.update(shape=shape, tokens=len(ids), sequences=lengths, device=str(dev), reference="plain-torch Qwen3 forward, fp32, CPU",
               note="weights rounded to bf16 first: the bf16 and fp32 models hold identical values")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        t0 = time.perf_counter()
        m32 = build_model(q, params_dtype=torch.float32, bf16=False)
        with torch.no_grad():
            for p in m32.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        got32 = megatron_forward(m32, ids, pos, sids, use_te, dev)
        m16 = build_model(q, params_dtype=torch.bfloat16, bf16=True, perform_initialization=False)  # weights come from m32
        missing = m16.load_state_dict(m32.state_dict(), strict=False)
        sec["load_state_dict_missing"] = [k for k in missing.missing_keys if not k.endswith("_extra_state")]
        del m32
        got16 = megatron_forward(Float16Module(m16.config, m16), ids, pos, sids, use_te, dev)
        sec["megatron_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        # The weights are bf16-representable: the bf16 model's tensors, upcast, are the fp32 model's.
        hf = {k: v.float() for k, v in gather_hf_state_dict(m16, q).items()}
        sec["gather_s"] = round(time.perf_counter() - t0, 1)
        del m16
        release_memory()
        t0 = time.perf_counter()
        ref = reference_logits(hf, q, ids, pos, sids)
        sec["reference_s"] = round(time.perf_counter() - t0, 1)
        del hf
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32[0]
        torch.set_float32_matmul_precision(tf32[1])
    for name, got in (("fp32", got32), ("bf16", got16)):
        numbers = compare_logits(got, ref, targets)
        sec[name] = numbers
        tol = TOLERANCES[f"logits_{name}"]
        ok = numbers["rel_l2"] <= tol["rel_l2"] and numbers["logprob_max_abs"] <= tol["logprob_max_abs"] and \
            all(map(math.isfinite, numbers.values()))
        report.check(f"logits_{name}_vs_cpu_fp32", ok, device=str(dev), rel_l2=numbers["rel_l2"], logprob_max_abs=numbers["logprob_max_abs"],
                     top1=numbers["top1_agreement"], tol=tol)


# ---- phase 3: step time ------------------------------------------------------------------------


def _row_stats(batch) -> dict:
    rows = [mb.seq_ids[r] for mb in batch.micro_batches for r in range(mb.seq_ids.shape[0])]
    per_row = [int(len(set(r[r >= 0].tolist()))) for r in rows]
    return {"rows": len(rows), "row_length": batch.row_length, "tokens": batch.tokens,
            "sequences_per_row": per_row, "padding_fraction": round(1 - batch.tokens / max(1, len(rows) * batch.row_length), 4)}


def _step_flops(batch, q) -> float:
    """Training FLOPs of the step: attention per packed sequence (the library's convention)."""
    return float(sum(n * q.flops_per_token(n) for n in batch.sequence_tokens))


def _mfu(flops_per_s: float, peak: float | None) -> float | None:
    from megatron_lopd.training.metrics_log import mfu

    return mfu(flops_per_s, 1, peak)


def build_trainer(config, provider):
    from megatron_lopd.training.loop import Trainer

    trainer = Trainer(config, provider)
    trainer.setup()
    return trainer


def timed_step(trainer, config, batch) -> dict:
    import torch

    trainer.config = config  # Trainer.train_step hands it to the TrainStep (the loss, the batch layout)
    batch.wait_s = 0.0
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rec = trainer.train_step(batch)
    sync()
    rec["wall_s"] = time.perf_counter() - t0
    rec["peak_allocated"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return rec


def phase_step_time(report: Report, args, shape: str, sequences, workdir: Path) -> None:
    import torch

    from megatron_lopd.training.metrics_log import peak_tflops

    sec = report.section("step_time")
    mem = report.section("memory")
    provider = synthetic_provider(sequences)
    opd_cfg = train_config(args, shape, workdir / "run_time", lr=args.lr)
    sft_cfg = dataclasses.replace(opd_cfg, loss="sft")
    t0 = time.perf_counter()
    trainer = build_trainer(opd_cfg, provider)
    sec["setup_s"] = round(time.perf_counter() - t0, 1)
    q = trainer.start.qwen3
    mem["after_setup_allocated_gib"] = gib(torch.cuda.memory_allocated()) if on_gpu() else None
    sft_data = None
    try:
        # The SFT stream the trainer would build for loss=sft (the library's own OfflineData.stream).
        saved = trainer.config, trainer.source
        trainer.config, trainer.source = sft_cfg, sft_view(sequences)
        sft_data = provider.stream(trainer)
        trainer.config, trainer.source = saved
        opd_data = trainer.data
        G, W, N = args.global_batch, args.warmup, args.steps
        batches = {"lightning_opd": [opd_data.build_step(s * G) for s in range(W + N)],
                   "sft": [sft_data.build_step(s * G) for s in range(W + N)]}
        same = all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
                   for x, y in zip(batches["lightning_opd"], batches["sft"]) for a, b in zip(x.micro_batches, y.micro_batches))
        stats = [_row_stats(b) for b in batches["sft"]]
        packed = sum(n >= 2 for s in stats for n in s["sequences_per_row"])
        sec["rows"] = {"per_step": [s["rows"] for s in stats], "row_length": [s["row_length"] for s in stats],
                       "tokens_per_step": [s["tokens"] for s in stats], "rows_with_several_sequences": packed,
                       "sequences_per_row_max": max(max(s["sequences_per_row"]) for s in stats),
                       "padding_fraction_mean": round(statistics.mean(s["padding_fraction"] for s in stats), 4),
                       "sequence_lengths_min_max": [int(min(x.num_tokens for x in sequences)), int(max(x.num_tokens for x in sequences))]}
        report.check("packed_rows_mixed_lengths", same and packed > 0, rows_with_several_sequences=packed, same_rows_both_variants=same)
        configs = {"lightning_opd": opd_cfg, "sft": sft_cfg}
        log(f"step time: {shape}, precision {trainer.precision}, {G} sequences/step, rows of <= {args.seq_length} tokens, "
            f"warm-up {W} steps of each variant, then {N} alternating pairs")
        for name in ("lightning_opd", "sft"):  # warm both (compilation, allocator, cuBLAS handles) before timing
            for s in range(W):
                rec = timed_step(trainer, configs[name], batches[name][s])
                log(f"  warm-up {name} step {s + 1}/{W}: {rec['wall_s']:.3f} s, loss {rec['loss']:.4f}")
        recs: dict[str, list] = {"lightning_opd": [], "sft": []}
        for i in range(N):
            order = ("lightning_opd", "sft") if i % 2 == 0 else ("sft", "lightning_opd")
            for name in order:
                rec = timed_step(trainer, configs[name], batches[name][W + i])
                rec["flops"] = _step_flops(batches[name][W + i], q)
                recs[name].append(rec)
            log(f"  pair {i + 1}/{N}: opd {recs['lightning_opd'][-1]['wall_s']:.3f} s, sft {recs['sft'][-1]['wall_s']:.3f} s")
        peak = peak_tflops(torch.cuda.get_device_name(), "bf16") if on_gpu() else None
        out = {}
        for name, rs in recs.items():
            med = statistics.median(r["wall_s"] for r in rs)
            seconds = sum(r["wall_s"] for r in rs)
            out[name] = {
                "median_step_s": med,
                "step_s": [round(r["wall_s"], 5) for r in rs],
                "library_step_time_s_median": statistics.median(r["step_time_s"] for r in rs),
                "tokens_per_step_median": statistics.median(r["tokens"] for r in rs),
                # Over all timed steps (the same batches for both variants): tokens and FLOPs / time.
                "tokens_per_s_per_gpu": sum(r["tokens"] for r in rs) / seconds,
                "mfu": _mfu(sum(r["flops"] for r in rs) / seconds, peak),
                "library_mfu_median": statistics.median(r["mfu"] for r in rs) if rs[0].get("mfu") is not None else None,
                "loss_first_last": [rs[0]["loss"], rs[-1]["loss"]],
                "skipped_steps": sum(bool(r["skipped"]) for r in rs),
            }
            mem[f"{name}_peak_allocated_gib"] = gib(max(r["peak_allocated"] for r in rs)) if on_gpu() else None
        ratio = out["lightning_opd"]["median_step_s"] / out["sft"]["median_step_s"]
        paired = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(recs["lightning_opd"], recs["sft"]))
        sec.update(shape=shape, precision=trainer.precision, distributed_optimizer=opd_cfg.parallel.use_distributed_optimizer,
                   layer_spec="transformer_engine" if trainer.use_te else "local", global_batch=G, seq_length=args.seq_length,
                   warmup_steps_each=W, timed_steps_each=N, peak_tflops=peak, variants=out, ratio_opd_over_sft=ratio,
                   median_paired_ratio=paired, timing="wall clock with the device synchronised before and after each step; batches built beforehand")
        mem["device_total_gib"] = report.section("device").get("total_memory_gib")
        finite = all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and not r["skipped"] for rs in recs.values() for r in rs)
        report.check("training_steps_finite", finite, steps=sum(len(v) for v in recs.values()))
        target = TOLERANCES["step_time_ratio_max_gpu"]
        report.check("step_time_ratio", ratio <= target if on_gpu() else True, gating=False, ratio=ratio, paired=paired,
                     target=target if on_gpu() else None, opd_s=out["lightning_opd"]["median_step_s"], sft_s=out["sft"]["median_step_s"],
                     tokens_per_s=out["lightning_opd"]["tokens_per_s_per_gpu"], mfu=out["lightning_opd"]["mfu"],
                     detail="" if on_gpu() else "CPU: the target applies on GPU only")
        if on_gpu():
            report.check("peak_memory", True, gating=False, opd_gib=mem["lightning_opd_peak_allocated_gib"], sft_gib=mem["sft_peak_allocated_gib"],
                         total_gib=mem["device_total_gib"])
    finally:
        if sft_data is not None:
            sft_data.close()
        trainer.close()


# ---- phase 4: checkpoint -------------------------------------------------------------------


def checkpoint_place(shape: str, precision: str, workdir: Path) -> tuple[str, dict]:
    """The checkpoint's shape: the run's shape if its checkpoint fits the free disk (with 25 % to
    spare), else the largest smaller one that does."""
    from megatron_lopd.models.qwen3 import named_config

    free = shutil.disk_usage(workdir).free
    info = {"dir": str(workdir), "disk_free_gib": gib(free)}
    params = named_config(shape).num_params()
    candidates = [shape] + [c for c in ("qwen3_0_6b", "tiny") if named_config(c).num_params() < params]
    for candidate in candidates:
        need = named_config(candidate).num_params() * CKPT_BYTES_PER_PARAM[precision]
        if need * 1.25 <= free:
            info.update(estimate_gib=gib(need), reason="fits the free disk" if candidate == shape else f"{shape}'s checkpoint does not fit the free disk")
            return candidate, info
    info.update(reason="not even the smallest checkpoint fits the free disk; trying anyway")
    return candidates[-1], info


def phase_checkpoint(report: Report, args, shape: str, sequences, workdir: Path) -> None:
    from megatron_lopd.runtime.lifetime import children_die_with_parent
    from megatron_lopd.training import checkpointing

    sec = report.section("checkpoint")
    precision = "bf16" if (args.precision == "bf16" or (args.precision == "auto" and on_gpu())) else "fp32"
    ckpt_shape, place = checkpoint_place(shape, precision, workdir)
    root = workdir
    seq_length = args.seq_length
    if ckpt_shape != shape:
        from megatron_lopd.models.qwen3 import named_config

        q = named_config(ckpt_shape)
        seq_length = min(seq_length, q.max_position_embeddings)
        sequences = synthetic_sequences(len(sequences), q.vocab_size, seq_length, args.top_k, args.seed)
        log(f"checkpoint: {shape}'s does not fit the free disk ({place['disk_free_gib']} GiB): checking with {ckpt_shape}")
    sec.update(shape=ckpt_shape, place=place, steps_before_save=args.ckpt_steps, lr=args.ckpt_lr, seq_length=seq_length)
    provider = synthetic_provider(sequences)
    cfg_a = train_config(args, ckpt_shape, root / "run_a", lr=args.ckpt_lr, **{"data.seq_length": seq_length})
    k = args.ckpt_steps
    with children_die_with_parent():  # dist_checkpointing's writer processes go with us
        trainer = build_trainer(cfg_a, provider)
        try:
            for rec in _train_steps(trainer, k):
                log(f"  checkpoint run: step {trainer.step} loss {rec['loss']:.6f}")
            sync()
            t0 = time.perf_counter()
            ckpt = trainer.save_checkpoint()
            sync()
            sec["save_s"] = round(time.perf_counter() - t0, 2)
            sec["bytes"] = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())
            sec["size_gib"] = gib(sec["bytes"])
            log(f"  saved {ckpt} ({sec['size_gib']} GiB) in {sec['save_s']} s")
            before = list(_train_steps(trainer, 2))
        finally:
            trainer.close()
            del trainer
        sec["memory_after_free"] = release_memory()
        log(f"  saved run freed: {sec['memory_after_free'] or 'CPU'}; resuming from {ckpt}")
        cfg_b = dataclasses.replace(cfg_a, run_dir=str(root / "run_b"),
                                    checkpoint=dataclasses.replace(cfg_a.checkpoint, resume=str(ckpt)))
        load_s = []
        original_load = checkpointing.load_training_checkpoint

        def timed_load(*a, **kw):  # Trainer._resume calls it through the module: time the load alone
            t = time.perf_counter()
            try:
                return original_load(*a, **kw)
            finally:
                sync()
                load_s.append(time.perf_counter() - t)

        checkpointing.load_training_checkpoint = timed_load
        try:
            t0 = time.perf_counter()
            trainer = build_trainer(cfg_b, provider)
            sec["resume_setup_s"] = round(time.perf_counter() - t0, 2)
        finally:
            checkpointing.load_training_checkpoint = original_load
        sec["load_s"] = round(load_s[0], 2) if load_s else None
        try:
            resumed_at = trainer.step
            after = list(_train_steps(trainer, 2))
        finally:
            trainer.close()
            del trainer
    sec["memory_after_free_b"] = release_memory()
    names = ("next", "second")
    for i, name in enumerate(names):
        a, b = before[i]["loss"], after[i]["loss"]
        rel = abs(a - b) / max(1.0, abs(a))
        tol = TOLERANCES[f"resume_{name}_loss_rel"]
        sec[f"step_{k + 1 + i}"] = {"loss_saved_run": a, "loss_resumed": b, "bitwise": a == b, "rel_diff": rel,
                                    "grad_norm_saved_run": before[i]["grad_norm"], "grad_norm_resumed": after[i]["grad_norm"],
                                    "lr_saved_run": before[i]["lr"], "lr_resumed": after[i]["lr"]}
        report.check(f"resume_{name}_step_loss", rel <= tol and math.isfinite(a) and resumed_at == k, step=k + 1 + i,
                     saved=a, resumed=b, bitwise=a == b, rel_diff=rel, tol=tol, shape=ckpt_shape)
    # Sensitivity: how much one update moves the loss (a resume that lost the state would differ by about that much).
    sec["loss_change_between_steps_rel"] = abs(before[1]["loss"] - before[0]["loss"]) / max(1.0, abs(before[0]["loss"]))


def _train_steps(trainer, n: int):
    """Train `n` steps of the trainer's own data stream; yields each step's record."""
    for _ in range(n):
        batch = trainer.data.next_step()
        batch.wait_s = 0.0
        rec = trainer.train_step(batch)
        trainer.step += 1
        yield rec


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON summary to write")
    p.add_argument("--shape", help="a named Qwen3 shape (qwen3_0_6b, qwen3_1_7b, ...), 'tiny', or 'auto' "
                   "(the largest dense shape whose state fits the GPU); default qwen3_1_7b on GPU, tiny with --toy")
    p.add_argument("--toy", action="store_true", help="the tiny model, small batches (CPU, CI); automatic without CUDA")
    p.add_argument("--steps", type=int, help="timed steps of each variant (alternating pairs)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps of each variant, before any timing")
    p.add_argument("--seq-length", type=int, help="packed row length (default 2048 on GPU: the local spec's attention matrix)")
    p.add_argument("--global-batch", type=int, help="sequences per step")
    p.add_argument("--num-sequences", type=int, help="synthetic sequences (steps cycle through them)")
    p.add_argument("--top-k", type=int, help="teacher top-k stored per position (the top-1 agreement metric)")
    p.add_argument("--logit-tokens", type=int, help="tokens of the packed row in the logits comparison")
    p.add_argument("--ckpt-steps", type=int, help="steps before the checkpoint is saved")
    p.add_argument("--lr", type=float, help="learning rate of the timing run")
    p.add_argument("--ckpt-lr", type=float, help="learning rate of the checkpoint runs (large enough that updates move the loss)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="training precision (auto: bf16 on GPU)")
    p.add_argument("--workdir", type=Path, help="the directory in which a new scratch directory for the run dirs and the checkpoint "
                   "is made (default: the system's temp dir); the scratch directory is removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: logits,step_time,checkpoint")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tolerance", action="append", default=[], metavar="KEY=VALUE",
                   help="override a tolerance, e.g. logits_fp32.rel_l2=1e-5 (repeatable; recorded in the JSON)")
    args = p.parse_args(argv)
    for item in args.tolerance:
        key, _, value = item.partition("=")
        *path, leaf = key.split(".")
        table = TOLERANCES
        for part in path:
            table = table[part]
        if leaf not in table:
            p.error(f"--tolerance {item}: unknown key {key!r}")
        table[leaf] = float(value)
    return args


def resolve_defaults(args) -> None:
    import torch

    args.toy = args.toy or not torch.cuda.is_available()
    defaults = TOY_DEFAULTS if args.toy else GPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def run_phase(report: Report, name: str, fn, *a) -> None:
    log(f"== {name}")
    t0 = time.perf_counter()
    try:
        fn(report, *a)
    except Exception as exc:  # noqa: BLE001 - recorded as a failed check; the next phase still runs
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(text, file=sys.stderr, flush=True)
        report.section(name)["error"] = text[-4000:]
        report.check(f"{name}_ran", False, detail=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500])
        del exc  # the traceback holds the phase's frames (and a trainer's GPU memory)
    finally:
        report.data["phases_s"][name] = round(time.perf_counter() - t0, 1)
        after = release_memory()
        after["host_peak_rss_gib"] = host_peak_rss_gib()
        report.section("memory")[f"after_{name}"] = after
        report.write()
        log(f"== {name} done in {report.data['phases_s'][name]} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_defaults(args)
    report = Report(args.out)
    report.data["command"] = " ".join(sys.argv)
    report.write()  # something is there even if the process dies
    run_phase(report, "environment", phase_environment, args)
    dev_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    table = shape_table(dev_bytes, "bf16")
    shape, why = choose_shape(args.shape, table)
    from megatron_lopd.models.qwen3 import named_config

    q = named_config(shape)
    report.data["shape"] = {"name": shape, "why": why, "toy": args.toy, "params": q.num_params(),
                            "state_gib_bf16_distopt": gib(q.num_params() * STATE_BYTES_PER_PARAM["bf16"]),
                            "auto_rule": f"state <= {AUTO_STATE_FRACTION:.0%} of GPU memory",
                            "auto_would_pick": choose_shape("auto", table)[0] if dev_bytes else None, "table": table}
    report.data["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    log(f"shape {shape} ({q.num_params() / 1e9:.3f} B params): {why}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.workdir))  # only this new directory is removed at the end
    report.data["workdir"] = str(workdir)
    sequences = synthetic_sequences(args.num_sequences, q.vocab_size, args.seq_length, args.top_k, args.seed)
    try:
        if "logits" not in skip:
            run_phase(report, "logits", phase_logits, args, shape)
        if "step_time" not in skip:
            run_phase(report, "step_time", phase_step_time, args, shape, sequences, workdir)
        if "checkpoint" not in skip:
            run_phase(report, "checkpoint", phase_checkpoint, args, shape, sequences, workdir)
    finally:
        from megatron_lopd.runtime import destroy_distributed

        destroy_distributed()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - T0
    budget = TOLERANCES["time_budget_s"]
    report.check("time_budget", elapsed <= budget or args.toy, gating=False, elapsed_s=round(elapsed, 1), budget_s=None if args.toy else budget)
    report.write()
    d = report.data
    st = d.get("step_time", {})
    summary = [f"device {d.get('device', {}).get('name')}", f"shape {shape}"]
    lg = d.get("logits", {})
    if "bf16" in lg:
        summary.append(f"logits rel_l2 fp32 {lg['fp32']['rel_l2']:.2e} bf16 {lg['bf16']['rel_l2']:.2e}")
    mem = d.get("memory", {})
    if mem.get("lightning_opd_peak_allocated_gib") is not None:
        summary.append(f"peak GiB opd {mem['lightning_opd_peak_allocated_gib']} sft {mem['sft_peak_allocated_gib']}")
    ck = d.get("checkpoint", {})
    if "save_s" in ck:
        summary.append(f"checkpoint {ck.get('shape')} {ck.get('size_gib')} GiB save {ck['save_s']} s load {ck.get('load_s')} s")
    if "ratio_opd_over_sft" in st:
        opd = st["variants"]["lightning_opd"]
        summary.append(f"OPD/SFT step time {st['ratio_opd_over_sft']:.4f} ({opd['median_step_s']:.3f} s, {opd['tokens_per_s_per_gpu']:.0f} tok/s/GPU"
                       + (f", MFU {opd['mfu']:.3f}" if opd["mfu"] is not None else "") + ")")
    print("\n".join(["", "checks:"] + [f"  {'PASS' if c['passed'] else ('FAIL' if c['gating'] else 'MISSED')} {name}"
                                          + ("" if c["gating"] else " (reported only)") for name, c in d["checks"].items()]), flush=True)
    log("SUMMARY: " + "; ".join(summary))
    log(f"{'ALL CORRECTNESS CHECKS PASSED' if d['ok'] else 'FAILED: ' + ', '.join(d['failed'])}; JSON: {args.out}")
    return 0 if d["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
