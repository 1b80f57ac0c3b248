"""`lopd demo`: the output-directory rules, the CLI's refusals, and a reduced end-to-end run.

The end-to-end test runs every real stage (trainer, generation backends, store, evaluation)
with `DemoSizes.tiny()`: seconds-long training that learns nothing, so it checks plumbing,
consistency of the numbers, determinism and resume, not the method's effect.
"""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_lopd.demo.run import DemoSizes, prepare_out_dir, variant_names
from megatron_lopd.errors import ConfigError


def test_out_dir_rules(tmp_path):
    sizes = DemoSizes.tiny()
    fresh = prepare_out_dir(tmp_path / "new", seed=1, sizes=sizes, overwrite=False, resume=False)
    assert fresh["stages"] == {} and fresh["seed"] == 1
    with pytest.raises(ConfigError, match="nothing to resume"):
        prepare_out_dir(tmp_path / "new", seed=1, sizes=sizes, overwrite=False, resume=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        prepare_out_dir(tmp_path / "new", seed=1, sizes=sizes, overwrite=True, resume=True)

    existing = tmp_path / "existing"
    (existing / "work").mkdir(parents=True)
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists") as err:
        prepare_out_dir(existing, seed=1, sizes=sizes, overwrite=False, resume=False)
    assert "--overwrite" in str(err.value) and "--resume" in str(err.value)
    with pytest.raises(ConfigError, match="does not look like a demo"):  # never deletes a stranger's directory
        prepare_out_dir(existing, seed=1, sizes=sizes, overwrite=True, resume=False)
    assert (existing / "notes.txt").exists()
    with pytest.raises(ConfigError, match="not a demo directory"):
        prepare_out_dir(existing, seed=1, sizes=sizes, overwrite=False, resume=True)

    demo = tmp_path / "demo"
    (demo / "work").mkdir(parents=True)
    (demo / "work" / "state.json").write_text(json.dumps({"version": 1, "seed": 1, "sizes": sizes.to_dict(), "stages": {"task": {"seconds": 1.0}}}))
    assert prepare_out_dir(demo, seed=1, sizes=sizes, overwrite=False, resume=True)["stages"] == {"task": {"seconds": 1.0}}
    with pytest.raises(ConfigError, match="seed 1, not 2"):
        prepare_out_dir(demo, seed=2, sizes=sizes, overwrite=False, resume=True)
    with pytest.raises(ConfigError, match="other demo sizes"):
        prepare_out_dir(demo, seed=1, sizes=DemoSizes(), overwrite=False, resume=True)
    assert prepare_out_dir(demo, seed=2, sizes=sizes, overwrite=True, resume=False)["stages"] == {}
    assert not demo.exists()


def test_cli_refuses_an_existing_directory(tmp_path, capsys):
    from megatron_lopd.cli import main

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    assert main(["demo", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "x"), "--overwrite", "--resume"])  # argparse: mutually exclusive
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "y"), "--comparison-losses", "lightning_opd,sft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sft" in err[0] and "topk_reverse_kl" in err[0] and not (tmp_path / "y").exists()
    assert main(["demo", "--out", str(tmp_path / "z"), "--seeds", "0,1", "--study", "paper-loss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--study runs over one demo" in err[0] and "--seed S" in err[0] and not (tmp_path / "z").exists()
    assert main(["demo", "--out", str(tmp_path / "z"), "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs 0" in err[0] and not (tmp_path / "z").exists()


@pytest.mark.slow
def test_tiny_demo_end_to_end_resume_and_determinism(tmp_path):
    from megatron_lopd.demo.run import run_demo

    sizes = DemoSizes.tiny()
    lines: list[str] = []
    out = tmp_path / "demo"
    summary = run_demo(out, seed=5, sizes=sizes, console=lines.append, progress=False, jobs=2)
    for name in ("report.md", "summary.json", "curves.png"):
        assert (out / name).is_file()
    assert json.loads((out / "summary.json").read_text()) == summary

    # The numbers hang together.
    names = variant_names(sizes)
    assert list(summary["variants"]) == names
    for key, a in summary["accuracy"].items():
        assert 0.0 <= a["pass1"] <= 1.0 and 0.0 <= a["sampled_pass1"] <= 1.0, key
        assert len(summary["paired_correct"].get(key, [0] * sizes.eval_problems)) == sizes.eval_problems
    assert summary["accuracy"]["teacher_a"]["kl_to_teacher_a"] == pytest.approx(0.0, abs=1e-5)  # A against itself
    for name, v in summary["variants"].items():
        steps = [p["step"] for p in v["curve"]]
        assert steps == list(range(0, sizes.opd_steps + 1, sizes.curve_every)), name
        assert v["curve"][0]["pass1"] == summary["accuracy"]["sft_R"]["pass1"]
        assert v["curve"][-1]["kl_to_teacher_a"] == summary["accuracy"][name]["kl_to_teacher_a"]
        assert [m["step"] for m in v["metrics"]] == list(range(1, sizes.opd_steps + 1)), name
    st = summary["store"]
    tokens = summary["teacher_forward_tokens"]
    assert tokens["offline_scoring_teacher_a"] == tokens["offline_scoring_teacher_b"] > st["response_tokens"] > 0
    assert st["bytes_per_token"] == pytest.approx(st["bytes"] / st["response_tokens"], rel=1e-3)
    meter = summary["consistency"]["meter"]  # both stores measured, B's corrected and trained on without the opt-out
    assert meter["teacher_b"]["gap"]["share_over_1nat"] > meter["teacher_a"]["gap"]["share_over_1nat"]
    assert summary["variants"]["offline_teacher_b_residualized"]["data"] == "teacher B store, style-residualized"
    manifest = json.loads((out / "work" / "variants" / "offline_teacher_b_residualized" / "manifest.json").read_text())
    assert manifest["inputs"]["store_teacher_signal"] == "style_residualized" and not manifest["extra"]["consistency_warnings"]
    online = summary["variants"]["online"]["online_stats"]
    assert online["steps"] == sizes.opd_steps and tokens["online:online"] == online["teacher_forward_tokens"] > online["sampled_tokens"]
    wall = summary["wall_clock_s"]
    assert wall["stage_sum"] == pytest.approx(sum(wall["stages"].values()), abs=0.05) and wall["jobs"] == 2
    assert 0 < wall["total"] < wall["stage_sum"]  # two lanes: stages overlapped
    for st in (out / "work" / "logs" / "demo").glob("*.log"):  # each stage's output went to its own log
        assert st.stem in summary["wall_clock_s"]["stages"]
    assert "Lightning OPD" in (out / "report.md").read_text()
    assert any("lightning_topk" in line for line in lines)

    # --resume after a finished demo: every stage is skipped, the numbers stay.
    lines.clear()
    again = run_demo(out, seed=5, sizes=sizes, resume=True, console=lines.append, progress=False)
    assert sum("skipped" in line for line in lines) == len([n for n in summary["wall_clock_s"]["stages"]])
    assert again["accuracy"] == summary["accuracy"]

    # An interrupted demo: the last stage's record and outputs are gone; --resume redoes only that stage, identically.
    state_path = out / "work" / "state.json"
    state = json.loads(state_path.read_text())
    del state["stages"]["continued_sft"]
    state_path.write_text(json.dumps(state))
    shutil.rmtree(out / "work" / "variants" / "continued_sft" / "hf")
    lines.clear()
    resumed = run_demo(out, seed=5, sizes=sizes, resume=True, console=lines.append, progress=False)
    reran = [line for line in lines if line.startswith("[") and "skipped" not in line]
    assert len(reran) == 1 and "continued_sft" in reran[0]
    assert resumed["accuracy"] == summary["accuracy"]

    # Over seeds: a finished seed directory resumes in place (nothing reruns) and the aggregate states its numbers.
    from megatron_lopd.demo.run import run_demo_seeds

    shutil.copytree(out, tmp_path / "multi" / "seed-5")
    lines.clear()
    agg = run_demo_seeds(tmp_path / "multi", [5], sizes=sizes, resume=True, console=lines.append, progress=False)
    assert not [line for line in lines if line.startswith("[") and "skipped" not in line]
    assert agg["accuracy"]["lightning_topk"]["per_seed"] == [100 * summary["accuracy"]["lightning_topk"]["pass1"]]
    assert (tmp_path / "multi" / "aggregate.md").is_file() and (tmp_path / "multi" / "curves.png").is_file()
    with pytest.raises(ConfigError, match="already exists"):  # an existing seed directory without --resume: refused before any work
        run_demo_seeds(tmp_path / "multi", [5, 6], sizes=sizes, console=lines.append, progress=False)
    assert not (tmp_path / "multi" / "seed-6").exists()

    # The paper-loss study over the finished demo: every arm from the right R, the base arm repeats the
    # demo's run problem by problem, the T=0.7 pipeline really samples at 0.7; a second call reruns nothing.
    from megatron_lopd.demo.study import STUDY_NAME, paper_loss_arms, run_paper_loss_study

    study = run_paper_loss_study(out, seed=5, sizes=sizes, jobs=2, console=lines.append, progress=False)
    assert study["base_matches_demo"] and [a["name"] for a in study["arms"]] == [a.name for a in paper_loss_arms()]
    arms = {a["name"]: a for a in study["arms"]}
    assert arms["passes_3"]["steps"] == 3 * sizes.opd_steps and arms["passes_3"]["curve"][-1]["step"] == 3 * sizes.opd_steps
    assert arms["t07"]["start_pass1"] == study["R_t07"]["pass1"] and arms["base"]["start_pass1"] == summary["accuracy"]["sft_R"]["pass1"]
    assert all(m["drift_chi2"] is not None for m in arms["lr_3e-3"]["metrics"])
    for kind in ("sft_data", "rollouts"):
        manifest = json.loads((out / STUDY_NAME / "t07" / "pipeline" / kind / "manifest.json").read_text())
        assert manifest["params"]["temperature"] == 0.7, kind
    run_config = json.loads((out / STUDY_NAME / "runs" / "clip_1" / "config.json").read_text())
    assert run_config["advantage_clip"] == 1.0 and run_config["loss"] == "lightning_opd"
    for name in ("study.md", "study.json", "study.png"):
        assert (out / STUDY_NAME / name).is_file()
    lines.clear()
    run_paper_loss_study(out, seed=5, sizes=sizes, jobs=2, console=lines.append, progress=False)
    assert not [line for line in lines if line.startswith("[") and "skipped" not in line]

    # Deterministic for a seed, whatever the lanes: a second demo from scratch, every stage one after the
    # other in this process, gives the same numbers as two lanes did.
    other = run_demo(tmp_path / "demo2", seed=5, sizes=sizes, console=lambda _: None, progress=False, jobs=1)
    assert other["accuracy"] == summary["accuracy"] and other["wall_clock_s"]["jobs"] == 1
    assert [v["curve"] for v in other["variants"].values()] == [v["curve"] for v in summary["variants"].values()]
    losses = lambda s: {n: [m["loss"] for m in v["metrics"]] for n, v in s["variants"].items()}  # noqa: E731
    assert losses(other) == losses(summary)
