"""Evaluation suites (megatron_lopd/evaluation/suite.py) on the tiny trained adder (conftest.py), hf backend:
each benchmark in its own format and directory, a failing benchmark recorded while the others finish,
the table, reruns, overrides, shards and the paper suite's definition."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_lopd.cli import main
from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.evaluation import GRADERS, EvalConfig, Shard, load_suite, read_results, run_eval, run_suite, suite_run
from megatron_lopd.evaluation.suite import suite_differences, verify_suite

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

SUITE_TOML = r"""
name = "sums"

[[benchmarks]]
name = "sums"
title = "Sums (lopd layout)"
[benchmarks.config]
samples_per_problem = 2
max_tokens = 8
temperature = 0.0
grader = "regex"
answer_pattern = '#(-?\d+)'
backend = "hf"
[benchmarks.paper.qwen3_8b]
sft = 40.0
lightning_opd = 50.0

[[benchmarks]]
name = "sums_hmmt"
format = "hmmt25"
title = "Sums (MathArena layout)"
[benchmarks.config]
samples_per_problem = 2
max_tokens = 8
temperature = 0.0
grader = "regex"
answer_pattern = '#(-?\d+)'
backend = "hf"

[[benchmarks]]
name = "nodata"
[benchmarks.config]
max_tokens = 8
temperature = 0.0
grader = "regex"
answer_pattern = '#(-?\d+)'
backend = "hf"
"""


@pytest.fixture(scope="module")
def suite_inputs(adder_data, tmp_path_factory):
    """The suite file and each benchmark's data: the adder's sums as JSONL and as MathArena parquet, and a
    third benchmark ("nodata") left without data. Even problems carry the true sum: avg@2 is 0.5."""
    path, rows = adder_data
    d = tmp_path_factory.mktemp("suite_inputs")
    (d / "sums.toml").write_text(SUITE_TOML)
    pq.write_table(pa.Table.from_pylist([{"problem_idx": i + 1, "problem": r["problem"], "answer": r["answer"], "problem_type": ["Algebra"]}
                                         for i, r in enumerate(rows)]), d / "hmmt.parquet")
    return d / "sums.toml", {"sums": path, "sums_hmmt": d / "hmmt.parquet"}


def _data(inputs, **extra):
    return [f"{name}={path}" for name, path in {**inputs, **extra}.items()]


def test_a_suite_evaluates_each_benchmark_and_records_a_failure(adder_model_dir, suite_inputs, tmp_path, monkeypatch):
    suite_file, inputs = suite_inputs
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "x", "problem": "1+1", "answer": "2"}) + "\n" + json.dumps({"id": "y", "problem": "2+2"}) + "\n")
    out = tmp_path / "suite"
    # "nodata" gets the broken file: it fails, the two others finish
    report = run_suite(adder_model_dir, suite_run(suite_file, _data(inputs, nodata=broken)), out, progress=False)
    assert [(b.name, b.status) for b in report.benchmarks] == [("sums", "done"), ("sums_hmmt", "done"), ("nodata", "failed")]
    assert "broken.jsonl:2: no 'answer'" in report.benchmarks[2].reason and not report.complete
    # each benchmark's numbers are a plain evaluation's: its own directory, its format, its settings
    single = run_eval(adder_model_dir, inputs["sums"], tmp_path / "single", config=load_suite(suite_file).benchmarks[0].config, progress=False)
    for name in ("sums", "sums_hmmt"):
        records, summary = read_results(out / name)
        assert summary.avg_at_k == 0.5 and summary.num_problems == 20 and summary.samples_per_problem == 2
        assert summary.results()["config"] == single.results()["config"]
    assert [r["id"] for r in read_results(out / "sums_hmmt")[0][::2]] == [str(i + 1) for i in range(20)]  # MathArena's problem_idx
    table = (out / "suite.md").read_text()
    assert "| Sums (lopd layout) (`sums`) | 20 | 50.0 (avg@2) | 11.5 | 0.0% |" in table
    assert "paper 8B: SFT -> Lightning OPD" in table and "| 40.0 -> 50.0 |" in table
    assert "failed: evaluation data " in table and "no 'answer'" in table
    saved = json.loads((out / "suite.json").read_text())
    assert saved["complete"] is False and saved["benchmarks"][0]["results"]["avg_at_k"] == 0.5
    with pytest.raises(ArtifactError, match=r"suite sums: 1 benchmark\(s\) not done \(nodata: failed: "):
        verify_suite(out)

    # Fixed data: only the failed benchmark runs; the finished ones are returned as they are.
    broken.write_text(json.dumps({"id": "x", "problem": "1+1", "answer": "2"}) + "\n")
    kept = (out / "sums" / "samples.jsonl").stat().st_mtime_ns
    report = run_suite(adder_model_dir, suite_run(suite_file, _data(inputs, nodata=broken)), out, progress=False)
    assert report.complete and (out / "sums" / "samples.jsonl").stat().st_mtime_ns == kept
    assert "sums: avg@2 50.0 +- 11.5" in verify_suite(out)
    assert suite_differences(out, suite_run(suite_file, _data(inputs, nodata=broken)), report.model_fingerprint) == []
    changed = suite_differences(out, suite_run(suite_file, _data(inputs), {"max_tokens": 6}), report.model_fingerprint)
    assert changed[:2] == ["sums: max_tokens 8 -> 6", "sums_hmmt: max_tokens 8 -> 6"] and changed[2] == "nodata: evaluated before, no data now"

    # A finished suite is returned without loading the model.
    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was loaded for a finished suite")

    monkeypatch.setattr("megatron_lopd.generation.backends.load_backend", no_engine)
    assert run_suite(adder_model_dir, suite_run(suite_file, _data(inputs, nodata=broken)), out, progress=False).complete


def test_overrides_apply_to_every_benchmark_and_other_settings_are_refused(adder_model_dir, suite_inputs, tmp_path, capsys):
    suite_file, inputs = suite_inputs
    out = tmp_path / "suite"
    args = ["eval", "--model", str(adder_model_dir), "--suite", str(suite_file), "--out", str(out), "--backend", "hf", "--no-progress"]
    data = [f"--suite-data={','.join(_data(inputs))}"]
    assert main([*args, *data, "-k", "1", "--max-tokens", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "suite sums: sums: avg@1 " in stdout and "suite sums: nodata: not run: no data" in stdout
    saved = json.loads((out / "suite.json").read_text())
    assert saved["overrides"]["samples_per_problem"] == 1 and saved["complete"] is True
    assert [b["settings"]["max_tokens"] for b in saved["benchmarks"][:2]] == [3, 3]
    assert read_results(out / "sums")[1].truncation_rate > 0  # 3 tokens cut the two-digit sums
    # another K into the same directory: each benchmark refuses (recorded), the command exits 1
    assert main([*args, *data, "-k", "2", "--max-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert "sums failed: " in err and "holds an evaluation with other settings (samples_per_problem 1 -> 2)" in err
    assert main([*args, *data, "-k", "2", "--max-tokens", "3", "--overwrite"]) == 0
    assert read_results(out / "sums")[1].samples_per_problem == 2
    # flags that describe one data file have no meaning for a suite
    assert main([*args, *data, "--grader", "math"]) == 2
    assert "--grader cannot be used with --suite" in capsys.readouterr().err


def test_shards_of_a_suite_merge_per_benchmark(adder_model_dir, suite_inputs, tmp_path):
    suite_file, inputs = suite_inputs
    run = suite_run(suite_file, _data(inputs))
    whole = run_suite(adder_model_dir, run, tmp_path / "whole", progress=False)
    out = tmp_path / "sharded"
    first = run_suite(adder_model_dir, run, out, shard=Shard(1, 2), progress=False)
    assert [b.status for b in first.benchmarks] == ["incomplete", "incomplete", "not run"]
    with pytest.raises(ArtifactError, match="not done"):
        verify_suite(out)
    last = run_suite(adder_model_dir, run, out, shard=Shard(0, 2), progress=False)
    assert last.complete and [b.results for b in last.benchmarks] == [b.results for b in whole.benchmarks]
    for name in ("sums", "sums_hmmt"):
        assert read_results(out / name)[0] == read_results(tmp_path / "whole" / name)[0]


def test_bad_suites_and_suite_data(suite_inputs, tmp_path):
    suite_file, inputs = suite_inputs
    with pytest.raises(ConfigError, match=r"suite 'sums' has no benchmark 'sum' \(fix: did you mean sums"):
        suite_run(suite_file, ["sum=/x.jsonl"])
    with pytest.raises(ConfigError, match="--suite-data 'sums' is not NAME=PATH"):
        suite_run(suite_file, ["sums"])
    with pytest.raises(ConfigError, match="names benchmark 'sums' twice"):
        suite_run(suite_file, ["sums=/a.jsonl,sums=/b.jsonl"])
    with pytest.raises(ConfigError, match="no benchmark has data"):
        suite_run(suite_file, [])
    with pytest.raises(ConfigError, match="grader cannot be set for every benchmark"):
        suite_run(suite_file, _data(inputs), {"grader": "math"})
    with pytest.raises(ConfigError, match="no suite 'nope'"):
        load_suite("nope")
    (tmp_path / "dup.toml").write_text('[[benchmarks]]\nname = "a"\n[[benchmarks]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="benchmark name 'a' is a duplicate"):
        load_suite(tmp_path / "dup.toml")
    (tmp_path / "fmt.toml").write_text('[[benchmarks]]\nname = "a"\nformat = "aime2024"\n')
    with pytest.raises(ConfigError, match="benchmark 'a' has unknown format 'aime2024'"):
        load_suite(tmp_path / "fmt.toml")
    (tmp_path / "key.toml").write_text('[[benchmarks]]\nname = "a"\n[benchmarks.config]\nsamples = 3\n')
    with pytest.raises(ConfigError, match=r"key\.toml: unknown config key 'benchmarks\[0\]\.config\.samples'"):
        load_suite(tmp_path / "key.toml")
    with pytest.raises(ConfigError, match="K=0 is below 1"):  # a bad override: one error before anything runs
        suite_run(suite_file, _data(inputs), {"samples_per_problem": 0})


def test_the_paper_suite():
    suite = load_suite("paper")
    assert [(b.name, b.format) for b in suite.benchmarks] == [("aime24", "aime24"), ("aime25", "aime25"), ("hmmt25", "hmmt25"),
                                                             ("lcb_v5", "lcb_v5"), ("lcb_v6", "lcb_v6")]
    math, code = suite.benchmarks[0].config, suite.benchmarks[3].config
    assert (math.samples_per_problem, math.max_tokens, math.temperature, math.top_p, math.grader) == (64, 32768, 0.6, 0.95, "math")
    assert "\\boxed{}" in math.prompt_template
    assert (code.samples_per_problem, code.max_tokens, code.temperature, code.top_p, code.grader) == (8, 32768, 0.6, 0.95, "code")
    paper = {b.name: (b.paper["qwen3_30b_a3b"].sft, b.paper["qwen3_30b_a3b"].lightning_opd) for b in suite.benchmarks}
    assert paper == {"aime24": (66.8, 71.0), "aime25": (63.2, 66.3), "hmmt25": (44.6, 48.3), "lcb_v5": (39.4, 60.8), "lcb_v6": (33.0, 54.4)}
    assert (suite.benchmarks[0].paper["qwen3_8b"].sft, suite.benchmarks[0].paper["qwen3_8b"].lightning_opd) == (63.7, 69.9)
    run = suite_run("paper", ["aime24:aime24_maxwell=/data/aime_2024_problems.parquet", "lcb_v5=/data/lcb"], {"samples_per_problem": 2})
    assert run.data["aime24"].format.name == "aime24_maxwell" and run.data["lcb_v5"].format.name == "lcb_v5"
    assert [b.name for b in run.selected()] == ["aime24", "lcb_v5"] and run.config(suite.benchmarks[3]).samples_per_problem == 2
    assert dataclasses.replace(run.config(suite.benchmarks[3]), samples_per_problem=8) == code


@pytest.mark.skipif("code" not in GRADERS, reason="the code grader (megatron_lopd/evaluation/graders.py) is not there yet")
def test_livecodebench_benchmark_runs_the_code_grader(adder_model_dir, tmp_path):
    """The adder answers '#<sum>', never code: every LiveCodeBench sample is graded wrong, with the grader's reason."""
    from tests.datasets.test_formats import lcb_rows

    (tmp_path / "lcb").mkdir()
    (tmp_path / "lcb" / "test5.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lcb_rows()))
    run = suite_run("paper", [f"lcb_v5={tmp_path / 'lcb'}"], {"samples_per_problem": 1, "max_tokens": 8, "backend": "hf", "temperature": 0.0})
    report = run_suite(adder_model_dir, run, tmp_path / "out", progress=False)
    lcb = report.benchmarks[3]
    assert lcb.status == "done" and lcb.results["num_problems"] == 2 and lcb.results["avg_at_k"] == 0.0
    records = read_results(tmp_path / "out" / "lcb_v5")[0]
    assert all(not r["correct"] for r in records) and all("detail" in r for r in records)
    assert EvalConfig(grader="code").make_grader().name == "code"
