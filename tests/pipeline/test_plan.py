"""The plan of one invocation (megatron_lopd/pipeline/plan.py): inputs checked, stale outputs refused
or taken along, before anything runs. No model runs here."""

from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.pipeline import StaleError, build_stages, plan, run_local, select_stages, stage_states, status


def test_inputs_are_checked_before_anything_runs(config, tmp_path):
    stages = build_stages(config)
    plan(stages, stages)  # every external input exists; produced ones come from this run
    with pytest.raises(ConfigError, match="unknown stage"):
        select_stages(stages, "train,bogus")
    # one stage alone: its inputs from other stages must already verify
    with pytest.raises(ArtifactError, match="stage train needs sft_model .* from stage sft, which is not done"):
        plan(stages, select_stages(stages, "train"))
    config.teacher = str(tmp_path / "no-such-teacher")
    stages = build_stages(config)
    with pytest.raises(ArtifactError, match="input teacher .*no-such-teacher does not exist"):
        plan(stages, stages)
    with pytest.raises(ArtifactError, match="no-such-teacher does not exist"):
        run_local(config)
    assert not Path(config.work_dir).exists()  # nothing ran, nothing was written
    assert {r.status for r in status(config)} == {"pending"}


def test_rerun_of_an_upstream_stage_alone_is_refused_when_it_would_orphan_finished_outputs(config, monkeypatch):
    """Stages downstream of a stale one are stale too; a rerun must take them along."""
    stages = build_stages(config)
    by_name = {s.name: s for s in stages}
    for stage in stages:  # every output "verifies"; only score's recorded settings differ
        object.__setattr__(stage, "verify", lambda path: "ok")
        Path(stage.output).mkdir(parents=True, exist_ok=True)
        object.__setattr__(stage, "provenance", (lambda: ["score.top_k: recorded 4, now 8"]) if stage.name == "score" else (lambda: []))
    states = {r: s.status for r, s in stage_states(stages).items()}
    assert states == {"sft_data": "done", "sft": "done", "rollouts": "done", "score": "stale", "train": "stale", "export": "stale", "eval": "stale"}
    with pytest.raises(StaleError, match=r"4 stage\(s\) are stale \(score, train, export, eval\)"):
        plan(stages, stages)
    with pytest.raises(StaleError, match="makes the finished outputs of train, export, eval stale"):
        plan(stages, [by_name["score"]], rerun_stale=True)
    checked = plan(stages, stages, rerun_stale=True)
    assert [s.name for s in checked.todo] == ["score", "train", "export", "eval"] == [s.name for s in checked.stale]
    assert all(Path(s.output).exists() for s in stages)  # planning moves nothing
