"""Fixtures for the pipeline tests: a config over placeholder inputs (nothing runs), and real
outputs of the tiny pipeline's first stages (seconds on CPU)."""

from pathlib import Path

import pytest

from megatron_lopd.pipeline import PipelineConfig, lopd_in_process, run_local


@pytest.fixture
def config(tmp_path) -> PipelineConfig:
    """Every external input exists (empty placeholders); no stage output does."""
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir(exist_ok=True)
    for name in ("sft.jsonl", "opd.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("{}\n")
    return PipelineConfig(
        work_dir=str(tmp_path / "work"),
        teacher=str(tmp_path / "teacher"),
        base_student=str(tmp_path / "student"),
        sft_prompts=str(tmp_path / "sft.jsonl"),
        opd_prompts=str(tmp_path / "opd.jsonl"),
        eval_data=str(tmp_path / "eval.jsonl"),
    )


def tiny_config(tmp_path_factory, name: str) -> PipelineConfig:
    """The `tiny` recipe's pipeline over freshly written tiny models and prompts."""
    from recipes.lightning_opd import pipeline_config, tiny, write_tiny_inputs

    inputs = write_tiny_inputs(str(tmp_path_factory.mktemp("tiny_inputs")))
    config = pipeline_config(tiny())
    config.work_dir = str(tmp_path_factory.mktemp(name) / "work")
    config.teacher, config.base_student = str(inputs / "teacher"), str(inputs / "student")
    config.sft_prompts, config.opd_prompts, config.eval_data = (str(inputs / n) for n in ("sft_prompts.jsonl", "opd_prompts.jsonl", "eval.jsonl"))
    return config


@pytest.fixture(scope="module")
def sft_data_done(tmp_path_factory):
    """Real SFT data written by the tiny teacher (`lopd generate`, HF backend, seconds on CPU);
    the pipeline config that wrote it is saved as <work>/pipeline.json."""
    config = tiny_config(tmp_path_factory, "stale")
    run_local(config, "sft_data", echo=lambda line: None)
    return config, Path(config.teacher).parent


@pytest.fixture(scope="module")
def store_done(tmp_path_factory):
    """The tiny pipeline up to a finished teacher store (SFT data, R, rollouts, store), each
    stage's `lopd` command run in this process (~20 s on CPU): a launch resumes at `train`."""
    config = tiny_config(tmp_path_factory, "resumed")
    run_local(config, "sft_data,sft,rollouts,score", echo=lambda line: None, execute=lopd_in_process)
    return config
