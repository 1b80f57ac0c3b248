"""Lightning OPD step time vs SFT step time, same model and same batches, one process.

What it measures: the cost of Lightning OPD over plain SFT inside the real trainer
(`megatron_lopd.training.loop.Trainer`): reading the teacher store (teacher log-probs,
top-k, rollout log-probs) instead of the SFT artifact, and the Lightning OPD loss with
its metrics instead of cross-entropy. Model, sequences, packing and optimizer are the
same, so the ratio isolates exactly that (target <= 1.02).

Both trainings run in the same process and are interleaved in blocks (OPD, SFT, OPD,
...), so a machine whose load changes over time affects both alike; the figure is the
ratio of median step times. The first steps of each are warm-up and not timed.

    python benchmarks/bench_train_step.py                       # CPU: a small Qwen3-shaped model
    python benchmarks/bench_train_step.py --shape qwen3_0_6b --seq-length 4096 --global-batch 32   # GPU, bf16
    python benchmarks/bench_train_step.py --shape qwen3_1_7b --fp8 delayed                          # GPU, TE FP8

On GPU it also reports tokens/s and MFU (model FLOPs / (GPUs x peak), peak from the device
name or --peak-tflops). Writes a JSON report with --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Model shapes small enough for a CPU run; named Qwen3 shapes for GPUs.
CPU_SHAPES = {
    "cpu_small": dict(vocab_size=32768, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                      intermediate_size=768, max_position_embeddings=4096),
    "tiny": dict(max_position_embeddings=4096),  # otherwise megatron_lopd.models.tiny defaults
}


def build_inputs(root: Path, args) -> dict:
    """A random HF model, a synthetic teacher store and an SFT artifact holding the same sequences."""
    import torch

    from megatron_lopd.models.tiny import write_random_hf_model
    from megatron_lopd.provenance import model_fingerprint, tokenizer_fingerprint
    from megatron_lopd.store import StoreProvenance, StoreWriter, SyntheticSpec, finalize_store, synthetic_records

    model_dir = root / "model"
    if args.shape in CPU_SHAPES:
        write_random_hf_model(model_dir, seed=0, **CPU_SHAPES[args.shape])
    else:  # a named Qwen3 shape: random weights in bf16 to keep the files small
        from transformers import AutoModelForCausalLM, Qwen3Config

        from megatron_lopd.models.qwen3 import named_config
        from megatron_lopd.models.tokenizer import build_char_tokenizer

        q = named_config(args.shape)
        hf = Qwen3Config(**{k: v for k, v in q.to_hf_dict().items() if k not in ("architectures", "model_type", "dtype", "torch_dtype")})
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        build_char_tokenizer().save_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    fp_model, fp_tok = model_fingerprint(model_dir), tokenizer_fingerprint(model_dir)
    teacher_fp = "model-synthetic-teacher"

    spec = SyntheticSpec(vocab_size=vocab, top_k=args.top_k, prompt_len=(16, 128), response_len=(32, args.seq_length - 128),
                         response_len_median=args.seq_length // 3, with_rollout_logprobs=True, seed=args.seed)
    records = synthetic_records(range(args.num_sequences), spec)
    prov = StoreProvenance(teacher_fingerprint=teacher_fp, tokenizer_fingerprint=fp_tok, rollout_generator_fingerprint=fp_model,
                           rollouts_fingerprint="data-synthetic")
    writer = StoreWriter.create(root / "store", num_sequences=len(records), top_k=args.top_k, vocab_size=vocab, provenance=prov,
                                sequences_per_shard=64, has_rollout_logprobs=True)
    for shard in writer.pending_shards():
        writer.write_shard(shard, [records[i] for i in writer.shard_range(shard)])
    finalize_store(root / "store")

    from megatron_lopd.artifacts import ArtifactWriter, RolloutRecord

    plan = {
        "kind": "sft_data",
        "producer": {"generator_fingerprint": teacher_fp, "tokenizer_fingerprint": fp_tok},
        "inputs": {"prompts_fingerprint": "data-synthetic", "num_prompts": len(records)},
        "params": {},
        "layout": {"num_prompts": len(records), "n": 1, "chunk_size": 64, "has_logprobs": False},
    }
    art = ArtifactWriter.create(root / "sft", plan)
    for c, (start, stop) in enumerate(art.ranges):
        art.write_chunk(c, [RolloutRecord(prompt_id=f"p{i}", sample_index=0, prompt_ids=records[i].prompt_ids,
                                          response_ids=records[i].response_ids, finish_reason="length", text="", prompt_index=i)
                            for i in range(start, stop)])
    art.finalize()
    return {"model": model_dir, "store": root / "store", "sft": root / "sft"}


def overrides(args, paths, loss: str) -> list[str]:
    out = {
        "run_dir": paths["root"] / f"run_{loss}",
        "loss": loss,
        "model.start_from": paths["model"],
        "data.store": paths["store"],
        "data.sft_data": paths["sft"],
        "data.global_batch": args.global_batch,
        "data.seq_length": args.seq_length,
        "data.micro_batch_size": 1,
        "data.prefetch": "true",
        "train_steps": 10**6,
        "optimizer.lr": 1e-7,
        "checkpoint.save_every": 0,
        "checkpoint.export_hf": "false",
        "logging.tensorboard": "false",
        "logging.progress": "false",
        "logging.log_every": 10**6,
        "parallel.tensor_parallel": args.tp,
        "model.precision": args.precision,
        "logging.top1_agreement": str(not args.no_top1).lower(),
    }
    if args.fp8:
        out["model.fp8"] = args.fp8
    if args.peak_tflops:
        out["logging.peak_tflops"] = args.peak_tflops
    return [f"{k}={v}" for k, v in out.items()]


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    from tqdm import tqdm

    from megatron_lopd.runtime import destroy_distributed
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.data import ArtifactSource, TrainData
    from megatron_lopd.training.loop import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        paths = {**build_inputs(root, args), "root": root}
        opd_cfg = resolve_config("lightning_opd", overrides(args, paths, "lightning_opd"))
        sft_cfg = resolve_config("sft", overrides(args, paths, "sft"))
        sft_cfg = dataclasses.replace(sft_cfg, optimizer=opd_cfg.optimizer, schedule=opd_cfg.schedule)  # same optimizer work
        trainer = Trainer(opd_cfg)
        trainer.setup()
        try:
            d = trainer.data
            # The same model, sequences and packing; only the data source and the loss differ.
            sft_data = TrainData(ArtifactSource.open(paths["sft"]), global_batch=d.global_batch, seq_length=d.seq_length,
                                 micro_batch_size=d.micro_batch_size, seed=d.seed, dp_rank=d.dp_rank, dp_size=d.dp_size,
                                 with_teacher=False, vocab_size=d.vocab_size, prefetch=True)
            variants = {"lightning_opd": (opd_cfg, d), "sft": (sft_cfg, sft_data)}
            times: dict[str, list[float]] = {k: [] for k in variants}
            records: dict[str, list[dict]] = {k: [] for k in variants}
            total = args.blocks * args.block_steps * 2
            with tqdm(total=total, desc="bench", unit="step", disable=None) as bar:
                for block in range(args.blocks):
                    for name, (cfg, data) in variants.items():
                        trainer.config, trainer.data = cfg, data
                        data.consumed = block * args.block_steps * args.global_batch  # same batches for both
                        for i in range(args.block_steps):
                            t0 = time.perf_counter()
                            batch = data.next_step()
                            batch.wait_s = time.perf_counter() - t0
                            rec = trainer.train_step(batch)
                            if block > 0 or i >= args.warmup:
                                times[name].append(rec["step_time_s"])
                                records[name].append(rec)
                            bar.update(1)
                            bar.set_postfix_str(f"{name} {rec['tokens_per_s']:.0f} tok/s")
        finally:
            trainer.close()
            sft_data.close()
            destroy_distributed()
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "precision": trainer.precision,
        "fp8": args.fp8 or None,
        "tensor_parallel": args.tp,
        "global_batch": args.global_batch,
        "seq_length": args.seq_length,
        "top_k": args.top_k,
        "top1_agreement_metric": not args.no_top1,
        "steps_timed": {k: len(v) for k, v in times.items()},
        "median_step_s": med,
        "ratio_opd_over_sft": med["lightning_opd"] / med["sft"],
        # Step i of both lists trained on the same batch: per-batch ratios, and total time.
        "median_paired_ratio": statistics.median(a / b for a, b in zip(times["lightning_opd"], times["sft"])),
        "ratio_of_totals": sum(times["lightning_opd"]) / sum(times["sft"]),
        "tokens_per_s": {k: sum(r["tokens"] for r in v) / sum(r["step_time_s"] for r in v) for k, v in records.items()},
        "mfu": {k: (statistics.median(r["mfu"] for r in v) if v and v[0]["mfu"] is not None else None) for k, v in records.items()},
        "tokens_per_step": statistics.median(r["tokens"] for r in records["sft"]),
    }
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="cpu_small", help=f"{', '.join(CPU_SHAPES)} or a named Qwen3 shape (qwen3_0_6b, qwen3_1_7b, ...)")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--num-sequences", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--blocks", type=int, default=4, help="alternating OPD/SFT blocks")
    p.add_argument("--block-steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of the first block")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--fp8", default="", choices=("", "delayed", "current"))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--no-top1", action="store_true", help="do not read the store's top-k for the top-1 agreement metric")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    report = run(args)
    print(json.dumps(report, indent=2))
    print(f"Lightning OPD step / SFT step = {report['ratio_opd_over_sft']:.4f} (target <= 1.02; per-batch median "
          f"{report['median_paired_ratio']:.4f}, totals {report['ratio_of_totals']:.4f}); "
          f"median {report['median_step_s']['lightning_opd']:.4f} s vs {report['median_step_s']['sft']:.4f} s, "
          f"{report['tokens_per_step']:.0f} tokens per step", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
