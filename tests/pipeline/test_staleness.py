"""Stale outputs (megatron_lopd/pipeline/staleness.py, issue 12 item 4): finished outputs made from another
teacher, other settings or other prompts than the config asks are refused, or set aside and remade."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lopd.pipeline import StaleError, run_local, status

LOPD = str(Path(sys.executable).parent / "lopd")


def _states(config) -> dict[str, tuple[str, str]]:
    return {r.name: (r.status, r.detail) for r in status(config)}


def test_changed_teacher_or_settings_make_finished_outputs_stale(sft_data_done, tmp_path):
    import dataclasses

    from megatron_lopd.provenance import model_fingerprint

    config, inputs = sft_data_done
    work = Path(config.work_dir)
    record = (work / "pipeline.json").read_bytes()
    assert _states(config)["sft_data"][0] == "done"
    old_fp, new_fp = model_fingerprint(inputs / "teacher"), model_fingerprint(inputs / "student")
    # 1. another teacher: the SFT data records the old one -> stale, with both fingerprints
    changed = dataclasses.replace(config, teacher=str(inputs / "student"))
    status_, detail = _states(changed)["sft_data"]
    assert status_ == "stale" and f"teacher: recorded {old_fp}, now {new_fp} ({inputs / 'student'})" in detail
    with pytest.raises(StaleError, match=r"stage\(s\) are stale \(sft_data\).*teacher: recorded model-"):
        run_local(changed, "sft_data", echo=lambda line: None)
    with pytest.raises(StaleError, match="needs sft_data .* from stage sft_data, which is stale: teacher"):
        run_local(changed, "sft", echo=lambda line: None)
    assert (work / "pipeline.json").read_bytes() == record  # the record still names the teacher that wrote the data
    # 2. a sampling setting, and 3. the prompts' content (same file name, other text)
    hotter = dataclasses.replace(config, sft_data=dataclasses.replace(config.sft_data, temperature=0.5))
    assert "sft_data.temperature: recorded 1.0, now 0.5" in _states(hotter)["sft_data"][1]
    prompts = tmp_path / "sft_prompts.jsonl"
    prompts.write_text(Path(config.sft_prompts).read_text().replace("Add 0", "Add 9"))
    assert _states(dataclasses.replace(config, sft_prompts=str(prompts)))["sft_data"][1].startswith("prompts: recorded prompts-")
    # 4. the same file read in another data format (`sft_data.format`): other prompts, stale; naming its own format is not
    def with_format(name):
        return dataclasses.replace(config, sft_data=dataclasses.replace(config.sft_data, format=name))
    assert _states(with_format("prompts"))["sft_data"][0] == "done"
    assert _states(with_format("dapo_math_17k_processed"))["sft_data"][1].startswith("prompts: recorded prompts-")
    # the CLI: one line per stage, exit 3; run refuses in one line, exit 2, and rewrites nothing
    path = changed.save(tmp_path / "changed.json")
    out = subprocess.run([LOPD, "pipeline", "status", "--config", str(path)], capture_output=True, text=True)
    assert out.returncode == 3, out.stderr
    lines = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.strip().splitlines()}
    assert lines["sft_data"][0] == "stale" and f"recorded {old_fp}, now {new_fp}" in lines["sft_data"][1]
    out = subprocess.run([LOPD, "pipeline", "run", "--config", str(path), "--stages", "sft_data"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "are stale (sft_data)" in out.stderr, out.stderr
    assert "sft_data: teacher: recorded" in out.stdout
    assert (work / "pipeline.json").read_bytes() == record and not list(work.glob("sft_data.stale-*"))


def test_rerun_stale_sets_the_old_output_aside_and_remakes_it(sft_data_done):
    import dataclasses

    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.provenance import model_fingerprint

    config, inputs = sft_data_done
    work = Path(config.work_dir)
    changed = dataclasses.replace(config, teacher=str(inputs / "student"))
    lines: list[str] = []
    run_local(changed, "sft_data", echo=lines.append, rerun_stale=True)
    (aside,) = work.glob("sft_data.stale-*")  # nothing deleted: the old data is kept beside
    assert RolloutArtifact.open(aside).generator_fingerprint == model_fingerprint(inputs / "teacher")
    assert RolloutArtifact.open(work / "sft_data").generator_fingerprint == model_fingerprint(inputs / "student")
    assert any("stale output moved to" in line for line in lines)
    assert json.loads((work / "pipeline.json").read_text())["teacher"] == changed.teacher  # written after the check passed
    assert _states(changed)["sft_data"][0] == "done"
    assert _states(config)["sft_data"][0] == "stale"  # and the old config now sees the new teacher
