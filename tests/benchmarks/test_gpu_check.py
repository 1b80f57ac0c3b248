"""benchmarks/gpu_check.py at toy size on CPU: the CI run of the GPU check.

The same script runs unchanged on a GPU (see benchmarks/README.md); here it runs the tiny
model on CPU over gloo and must write a complete JSON summary with every correctness check
passed. A second, short run with an impossible tolerance checks that a failing check makes
the exit status non-zero and still writes the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--toy", "--workdir", str(tmp_path / "work"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.is_file(), f"no JSON written (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def test_toy_run_on_cpu_passes_and_reports_every_section(tmp_path):
    proc, d = _run(tmp_path)
    failed = {k: c for k, c in d["checks"].items() if c["gating"] and not c["passed"]}
    assert proc.returncode == 0 and d["ok"] and not failed, (failed, proc.stdout[-4000:], proc.stderr[-4000:])

    for section in ("device", "versions", "environment", "shape", "tolerances", "logits", "step_time", "memory", "checkpoint", "checks"):
        assert section in d, section
    assert "gpu_name" in d and d["device"]["kind"] == "cpu" and d["shape"]["name"] == "tiny" and d["shape"]["toy"]
    assert {r["shape"] for r in d["shape"]["table"]} >= {"qwen3_0_6b", "qwen3_1_7b", "qwen3_8b"}

    # Logits: megatron-core's CPU path (fp32, bf16) against the plain-torch fp32 reference.
    for name in ("fp32", "bf16"):
        assert d["checks"][f"logits_{name}_vs_cpu_fp32"]["passed"]
        assert d["logits"][name]["rel_l2"] <= d["tolerances"][f"logits_{name}"]["rel_l2"]
    assert d["logits"]["fp32"]["rel_l2"] < d["logits"]["bf16"]["rel_l2"]
    assert len(d["logits"]["sequences"]) >= 2  # a packed row

    # Step time: both variants timed on the same packed rows of mixed lengths.
    st = d["step_time"]
    assert st["ratio_opd_over_sft"] > 0 and st["timed_steps_each"] >= 1 and st["warmup_steps_each"] >= 1
    assert st["rows"]["rows_with_several_sequences"] > 0
    lo, hi = st["rows"]["sequence_lengths_min_max"]
    assert hi > 2 * lo
    for variant in ("lightning_opd", "sft"):
        v = st["variants"][variant]
        assert v["median_step_s"] > 0 and v["tokens_per_s_per_gpu"] > 0 and v["skipped_steps"] == 0
        assert "mfu" in v and f"{variant}_peak_allocated_gib" in d["memory"]
    assert d["checks"]["packed_rows_mixed_lengths"]["passed"] and d["checks"]["training_steps_finite"]["passed"]
    assert not d["checks"]["step_time_ratio"]["gating"]

    # Checkpoint: save after k steps, resume in a fresh trainer, the next two losses identical.
    ck = d["checkpoint"]
    k = ck["steps_before_save"]
    for i, name in enumerate(("next", "second")):
        assert d["checks"][f"resume_{name}_step_loss"]["passed"]
        step = ck[f"step_{k + 1 + i}"]
        assert step["bitwise"], step  # fp32 on CPU: deterministic
    assert ck["loss_change_between_steps_rel"] > 10 * d["tolerances"]["resume_second_loss_rel"]  # the check can see a lost state


def test_a_failed_check_exits_non_zero_and_still_writes_the_json(tmp_path):
    proc, d = _run(tmp_path, "--skip", "step_time,checkpoint", "--tolerance", "logits_fp32.rel_l2=0")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert d["ok"] is False and d["failed"] == ["logits_fp32_vs_cpu_fp32"]
    assert d["tolerances"]["logits_fp32"]["rel_l2"] == 0.0
    assert "FAIL" in proc.stdout
