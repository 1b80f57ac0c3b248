"""Peak memory of HF <-> Megatron conversion on a locally generated >= 1 GB Qwen3 model.

Writes a random Qwen3 (float32, several safetensors shards) into a temporary directory,
then runs `lopd convert from-hf` and `lopd convert to-hf` as child processes and takes
each child's peak RSS from the kernel (`os.wait4` rusage: ru_maxrss). The reference,
measured in the same run, is an idle child that imports the same modules (`baseline`).
Reported: peak RSS / model size, peak RSS / largest shard, the conversion's own memory
(peak - baseline) against the bound "2 x largest shard + one layer", and throughput.

    python benchmarks/bench_convert.py [--layers 16] [--hidden 1024] [--shard-mb 300] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def write_model(out: Path, config, shard_bytes: int) -> None:
    """A random Qwen3 HF dir, generated tensor by tensor (never the whole model in memory)."""
    from megatron_lopd.models import hf_mapping as hfm
    from megatron_lopd.models.checkpoint import write_hf_weights
    from megatron_lopd.models.tokenizer import build_char_tokenizer

    out.mkdir(parents=True)
    entries = []
    for m, index in hfm.iter_instances(config):
        entries += [(n, torch.float32, s) for n, s in zip(hfm.hf_names(m, index), hfm.hf_shapes(m, config))]
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, dtype, shape in entries:
            scale = 0.02 if len(shape) > 1 else 0.1
            yield name, (torch.randn(shape, generator=generator) * scale + (1.0 if len(shape) == 1 else 0.0)).to(dtype)

    write_hf_weights(out, entries, tensors(), shard_bytes)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))


def run_measured(args: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss * 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=float, default=300, help="safetensors shard size of the generated model")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--keep", help="generate into this directory and keep it (default: a temp dir, deleted)")
    args = parser.parse_args()

    from megatron_lopd.models.qwen3 import Qwen3Config

    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=16, num_kv_heads=8,
        head_dim=args.hidden // 16, ffn_hidden_size=args.ffn, torch_dtype="float32", eos_token_id=1, pad_token_id=0,
    )
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        hf, ckpt, back = root / "hf", root / "ckpt", root / "back"
        t0 = time.perf_counter()
        write_model(hf, config, int(args.shard_mb * MB))
        shards = sorted(hf.glob("*.safetensors"))
        model_bytes = sum(p.stat().st_size for p in shards)
        largest_shard = max(p.stat().st_size for p in shards)
        layer_bytes = (config.num_params(embeddings=False) - config.hidden_size) // config.num_layers * 4
        print(f"generated {model_bytes / MB:.0f} MB in {len(shards)} shards (largest {largest_shard / MB:.0f} MB, "
              f"one layer {layer_bytes / MB:.0f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
        if model_bytes < 1e9:
            print("warning: model below 1 GB; raise --layers / --hidden", flush=True)

        baseline, _ = run_measured(["-c", "import torch, tqdm, megatron_lopd.cli, megatron_lopd.models.checkpoint, torch.distributed.checkpoint"])
        lopd = [str(REPO / "tools" / "convert_from_hf.py"), "--hf-dir", str(hf), "--out", str(ckpt), "--tp", str(args.tp)]
        from_hf = run_measured(lopd)
        to_hf = run_measured([str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint", str(ckpt), "--out", str(back),
                              "--max-shard-size", f"{int(args.shard_mb)}MB"])
        bound = 2 * largest_shard + layer_bytes
        rows = []
        for name, (peak, seconds) in (("from-hf", from_hf), ("to-hf", to_hf)):
            rows.append({
                "direction": name,
                "peak_rss_mb": round(peak / MB),
                "peak_over_baseline_mb": round((peak - baseline) / MB),
                "peak_rss_per_model_size": round(peak / model_bytes, 3),
                "peak_rss_per_largest_shard": round(peak / largest_shard, 3),
                "conversion_memory_per_bound": round((peak - baseline) / bound, 3),
                "seconds": round(seconds, 1),
                "mb_per_s": round(model_bytes / MB / seconds, 1),
            })
        print(f"baseline (idle child with the same imports): {baseline / MB:.0f} MB RSS; "
              f"bound 2 x largest shard + one layer = {bound / MB:.0f} MB")
        header = list(rows[0])
        print(" | ".join(header))
        for row in rows:
            print(" | ".join(str(row[h]) for h in header))
        print(json.dumps({"model_mb": round(model_bytes / MB), "largest_shard_mb": round(largest_shard / MB),
                          "layer_mb": round(layer_bytes / MB), "baseline_mb": round(baseline / MB), "results": rows}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
