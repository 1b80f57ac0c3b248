"""The pipeline config (megatron_lopd/pipeline/config.py): files, `key=value` overrides, one-line errors."""

from pathlib import Path

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.pipeline import PipelineConfig, StageEnv, build_stages


def test_config_file_roundtrip_and_overrides(config, tmp_path):
    config.envs.train = StageEnv(venv="/v", env={"NCCL_DEBUG": "INFO"})
    path = config.save(tmp_path / "p.json")
    assert PipelineConfig.load(path) == config
    loaded = PipelineConfig.load(path, ["trainer.lr=1e-6", "score.tensor_parallel=4", "eval_data=none", "envs.train.venv=null", "envs.train.python=/p/python"])
    assert loaded.trainer.lr == 1e-6 and loaded.score.tensor_parallel == 4 and loaded.eval_data is None
    assert loaded.envs.train.python == "/p/python" and loaded.envs.train.env == {"NCCL_DEBUG": "INFO"}
    assert [s.name for s in build_stages(loaded)][-1] == "export"  # no eval data: no eval stage
    toml = tmp_path / "p.toml"
    toml.write_text(f'work_dir = "{tmp_path}/w"\nteacher = "/t"\n[trainer]\nlr = 3e-6\nnproc_per_node = 2\n')
    t = PipelineConfig.load(toml)
    assert t.trainer.lr == 3e-6 and t.trainer.nproc_per_node == 2 and t.trainer.config == "lightning_opd"
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.lrr' \(fix: did you mean lr\?\)"):
        PipelineConfig.load(path, ["trainer.lrr=1"])
    with pytest.raises(ConfigError, match="trainer.lr='fast' is not a number"):
        PipelineConfig.load(path, ["trainer.lr=fast"])
    with pytest.raises(ConfigError, match="config file not found"):
        PipelineConfig.load(tmp_path / "missing.json")


def test_an_eval_suite_in_the_config(config, tmp_path):
    """eval.suite + eval.suite_data: the eval stage runs the suite (each benchmark's data an input)."""
    for name in ("aime24.parquet", "lcb"):
        (tmp_path / name).touch() if "." in name else (tmp_path / name).mkdir()
    path = config.save(tmp_path / "p.json")
    loaded = PipelineConfig.load(path, ["eval_data=none", "eval.suite=paper", f"eval.suite_data.aime24={tmp_path / 'aime24.parquet'}",
                                        f"eval.suite_data.lcb_v5={tmp_path / 'lcb'}", "eval.suite_overrides.samples_per_problem=2",
                                        "eval.backend=hf"])
    assert loaded.eval.suite_data == {"aime24": str(tmp_path / "aime24.parquet"), "lcb_v5": str(tmp_path / "lcb")}
    assert PipelineConfig.load(loaded.save(tmp_path / "q.json")) == loaded  # a file round trip keeps the suite
    stage = build_stages(loaded)[-1]
    assert stage.name == "eval" and stage.inputs == {"student_model": tmp_path / "work" / "student_hf",
                                                     "eval.suite_data.aime24": tmp_path / "aime24.parquet",
                                                     "eval.suite_data.lcb_v5": tmp_path / "lcb"}
    (args,) = [args for _step, args in stage.invocations()]
    assert args[:5] == ["eval", "--model", str(tmp_path / "work" / "student_hf"), "--suite", "paper"]
    assert f"--suite-data=aime24={tmp_path / 'aime24.parquet'}" in args and f"--suite-data=lcb_v5={tmp_path / 'lcb'}" in args
    assert args[args.index("--samples-per-problem") + 1] == "2" and "--max-tokens" not in args  # only the overrides given
    assert args[args.index("--backend") + 1] == "hf" and args[-1] == "--shard=0/1"
    relative = PipelineConfig.load(path, ["eval_data=none", "eval.suite=paper", "eval.suite_data.aime24=data/a.parquet"]).absolute()
    assert relative.eval.suite == "paper" and relative.eval.suite_data["aime24"] == str(Path.cwd() / "data/a.parquet")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["eval.suite=paper", "eval.suite_data.aime24=/x"], "both eval_data and eval.suite are set"),
        (["eval_data=none", "eval.suite_data.aime24=/x"], "eval.suite_data without eval.suite"),
        (["eval_data=none", "eval.suite=paper", "eval.suite_data.aime2024=/x"], r"suite 'paper' has no benchmark 'aime2024' \(fix: did you mean aime24"),
        (["eval_data=none", "eval.suite=papers", "eval.suite_data.aime24=/x"], "no suite 'papers'"),
        (["eval_data=none", "eval.suite=paper"], "suite 'paper': no benchmark has data"),
        (["eval_data=none", "eval.suite=paper", "eval.suite_data.aime24=/x", "eval.suite_overrides.samples_per_problem=0"], "K=0 is below 1"),
    ],
)
def test_bad_eval_suites_are_refused_with_the_config(config, tmp_path, overrides, match):
    loaded = PipelineConfig.load(config.save(tmp_path / "p.json"), overrides)
    with pytest.raises(ConfigError, match=match):
        build_stages(loaded)


def test_prompt_formats_reach_the_generate_commands(config, tmp_path):
    """`sft_data.format` / `rollouts.format`: the published layout each prompt file is read in (`lopd generate --format`)."""
    loaded = PipelineConfig.load(config.save(tmp_path / "p.json"), ["sft_data.format=openthoughts3", "rollouts.format=dapo_math_17k_slime"])
    args = {s.name: args for s in build_stages(loaded) for _step, args in s.invocations() if s.name in ("sft_data", "rollouts")}
    assert args["sft_data"][args["sft_data"].index("--format") + 1] == "openthoughts3"
    assert args["rollouts"][args["rollouts"].index("--format") + 1] == "dapo_math_17k_slime"
    assert "--format" not in [a for s in build_stages(config) if s.name == "rollouts" for _step, a in s.invocations()][0]
    with pytest.raises(ConfigError, match=r"unknown data format 'dapo'.*dapo_math_17k"):
        PipelineConfig.load(config.save(tmp_path / "q.json"), ["rollouts.format=dapo"]).validate()
