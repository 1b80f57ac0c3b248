"""vLLM as users run it (engine in its own process): a SIGKILLed `lopd score` / `lopd generate`
leaves no engine or worker process behind, and a NaN generator / teacher is refused naming the model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")

from megatron_lopd.errors import LopdError  # noqa: E402
from megatron_lopd.runtime.lifetime import descendants  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _lopd() -> list[str]:
    script = Path(sys.executable).with_name("lopd")
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead (its new parent may never reap it)
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def _kill_when_engine_runs(cmd: list[str], settle_s: float) -> dict[int, str]:
    """Start `cmd` with vLLM's engine in its own process; SIGKILL it `settle_s` after the engine process
    appears. Returns every descendant seen before the kill, with its command line."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, str] = {}
    engine_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        for p in descendants(proc.pid):
            seen.setdefault(p, _cmdline(p))
        if engine_at is None and any("spawn_main" in c for c in seen.values()):
            engine_at = time.time()
        if engine_at is not None and time.time() - engine_at >= settle_s:
            for p in descendants(proc.pid):
                seen.setdefault(p, _cmdline(p))
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.1)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, f"not killed while the engine ran (rc={rc}): {proc.stderr.read()[-2000:]}"
    return seen


def test_sigkilled_vllm_commands_leave_no_process(hf_rollouts, tiny_teacher_dir, tiny_hf_dir, prompt_file, tmp_path):
    cases = {
        # early: the engine process is still importing vLLM; late: the engine (and its worker) run.
        "score-early": (_lopd() + ["score", "--rollouts", str(hf_rollouts.path), "--teacher", str(tiny_teacher_dir),
                                   "--out", str(tmp_path / "s1"), "--backend", "vllm", "--top-k", "4", "--no-progress"], 1.0),
        "generate-late": (_lopd() + ["generate", "--model", str(tiny_hf_dir), "--prompts", str(prompt_file), "--out",
                                     str(tmp_path / "g"), "--backend", "vllm", "--max-tokens", "2000", "--n", "8",
                                     "--no-progress"], 15.0),
    }
    for name, (cmd, settle_s) in cases.items():
        seen = _kill_when_engine_runs(cmd, settle_s)
        engines = [p for p, c in seen.items() if "spawn_main" in c]
        assert engines, f"{name}: no engine process was seen: {seen}"
        if name == "generate-late":
            assert len(engines) >= 2, f"the engine's worker process had not started yet: {seen}"
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.1)
        survivors = {p: c[:100] for p, c in seen.items() if _alive(p)}
        for p in survivors:
            os.kill(p, signal.SIGKILL)  # do not leave them to the next test
        assert not survivors, f"{name}: processes outlived the killed command: {survivors}"
    # Nothing was published by the killed runs; a rerun resumes normally (checked elsewhere).
    assert not (tmp_path / "g" / "manifest.json").exists()


def test_nan_model_is_refused_by_vllm(tiny_hf_dir, hf_rollouts, prompt_file, tmp_path):
    from safetensors.numpy import load_file, save_file

    from megatron_lopd.generation.backends import load_backend
    from megatron_lopd.generation.base import SamplingParams
    from megatron_lopd.generation.generate import GenerateConfig, generate_artifact
    from megatron_lopd.generation.score import ScoreConfig, score_to_store

    nan_model = tmp_path / "nan_model"
    shutil.copytree(tiny_hf_dir, nan_model)
    weights = load_file(str(nan_model / "model.safetensors"))
    weights["model.norm.weight"][:] = np.nan
    save_file(weights, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    be = load_backend("vllm", nan_model, max_logprobs=4)
    try:
        for record in (False, True):  # the check runs whether or not log-probs are recorded
            out = tmp_path / f"sft-{record}"
            cfg = GenerateConfig(model=nan_model, prompts=prompt_file, out=out, kind="sft_data", backend="vllm",
                                 chunk_size=4, progress=False,
                                 sampling=SamplingParams(max_tokens=8, record_logprobs=record))
            with pytest.raises(LopdError, match=rf"model {nan_model} produced non-finite logits .*--backend vllm \(prompt 0\)"):
                generate_artifact(cfg, backend=be)
            assert not list(out.glob("chunks/*.safetensors")) and not (out / "manifest.json").exists()
        cfg = ScoreConfig(rollouts=hf_rollouts.path, teacher=nan_model, out=tmp_path / "store", top_k=4, backend="vllm",
                          progress=False)
        with pytest.raises(LopdError, match=rf"teacher {nan_model} returned non-finite log-probs .*--backend vllm"):
            score_to_store(cfg, backend=be)
        assert not list((tmp_path / "store" / "markers").glob("*.json"))
    finally:
        be.close()
