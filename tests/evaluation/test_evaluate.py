"""Evaluation without generation: data loading, prompts, decoding, summaries, shard merging, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError
from megatron_lopd.evaluation import EvalConfig, Problem, Shard, evaluate, load_problems, merge_shards, read_results, run_eval
from megatron_lopd.datasets import DataSource, data_format
from megatron_lopd.evaluation.evaluate import RECORDED_ANSWER_CHARS, ResponseDecoder, prompt_ids, recorded_answer, result_differences, summarize, write_results

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_problems(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"id": "a", "problem": "1+1", "answer": "2"}),
            "",
            json.dumps({"problem": "2+2", "answer": 4}),  # no id: its line number; numeric answer
            json.dumps({"id": 7, "messages": [{"role": "user", "content": "hi"}], "answer": "x"}),
        ],
    )
    problems = load_problems(path)
    assert [p.id for p in problems] == ["a", "1", "7"]  # no id: the row number (from 0; blank lines are no rows)
    assert [p.answer for p in problems] == ["2", "4", "x"]
    assert problems[2].messages == ({"role": "user", "content": "hi"},) and problems[2].problem is None


@pytest.mark.parametrize(
    "line,message",
    [
        ({"id": "a", "problem": "1+1"}, r"d\.jsonl:2: no 'answer'"),
        ({"id": "a", "problem": "1+1", "answer": ""}, r"d\.jsonl:2: empty 'answer'"),
        ({"id": "a", "problem": "1+1", "answer": ["2"]}, r"d\.jsonl:2: 'answer' is a list"),
        ({"id": "a", "answer": "2"}, r"d\.jsonl:2: no 'problem' or 'messages' \(its keys: 'id', 'answer'\)"),
        ({"id": "a", "messages": [{"content": "x"}], "answer": "2"}, r"d\.jsonl:2: 'messages' has a turn without a known role"),
        ({"id": "first", "problem": "1+1", "answer": "2"}, r"d\.jsonl:2: duplicate id 'first' \(first at .*d\.jsonl:1\)"),
        ("{not json", r"d\.jsonl:2: invalid JSON"),
        ([1, 2], r"d\.jsonl:2: a list, not a JSON object"),
    ],
)
def test_bad_data_lines(tmp_path, line, message):
    text = line if isinstance(line, str) else json.dumps(line)
    path = _write(tmp_path / "d.jsonl", [json.dumps({"id": "first", "problem": "0+0", "answer": "0"}), text])
    with pytest.raises(ArtifactError, match=message):
        load_problems(path)


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(ArtifactError, match="holds no rows"):
        load_problems(_write(tmp_path / "empty.jsonl", [""]))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(samples_per_problem=0), "K=0 is below 1"),
        (dict(samples_per_problem=-3), "K=-3 is below 1"),
        (dict(max_tokens=0), "max_tokens=0"),
        (dict(temperature=-1.0), "negative"),
        (dict(top_p=0.0), "top_p"),
        (dict(prompt_template="Solve:"), "no {problem} placeholder"),
        (dict(grader="regex"), "needs an answer pattern"),
        (dict(grader="fuzzy"), "unknown grader"),
        (dict(code_workers=0), "code_workers=0 is below 1"),
    ],
)
def test_bad_config_fails_before_anything_is_read(tmp_path, kwargs, message):
    # Neither the model nor the data exist: the configuration error must come first.
    with pytest.raises(ConfigError, match=message):
        run_eval(tmp_path / "no_model", tmp_path / "no_data.jsonl", tmp_path / "out", config=EvalConfig(**kwargs))


@pytest.mark.parametrize("text", ["1", "a/b", "2/2", "-1/2", "0/0"])
def test_bad_shard(text):
    with pytest.raises(ConfigError, match="shard"):
        Shard.parse(text)


def test_shard_assignment_covers_each_problem_once():
    assert Shard.parse("1/3").indices(8) == [1, 4, 7]
    assert sorted(i for s in range(3) for i in Shard(s, 3).indices(8)) == list(range(8))


def test_unreadable_model_dir(tmp_path, tiny_hf_dir):
    problems = [Problem("a", "2", "1+1")]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in Path(tiny_hf_dir).iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "config.json").write_text("{truncated")
    for model_dir, message in ((tmp_path / "missing", "not a directory"), (no_weights, "no weight files"), (corrupt, "unreadable model directory")):
        with pytest.raises(ArtifactError, match=message):
            evaluate(model_dir, problems, config=EvalConfig(backend="hf"))


def test_prompts_use_the_chat_template_and_thinking_switch(tiny_hf_dir, char_tokenizer):
    tok = char_tokenizer
    p = Problem("a", "2", "1+1")
    plain = tok.decode(prompt_ids(tok, p, EvalConfig()))
    assert plain == "<|user|>1+1<|end|><|assistant|>"
    no_think = tok.decode(prompt_ids(tok, p, EvalConfig(enable_thinking=False, prompt_template="Q: {problem}", system_prompt="S")))
    assert no_think == "<|system|>S<|end|><|user|>Q: 1+1<|end|><|assistant|><think></think>"
    chat = Problem("b", "2", messages=({"role": "user", "content": "{problem} stays"},))
    assert tok.decode(prompt_ids(tok, chat, EvalConfig(prompt_template="X {problem}"))) == "<|user|>{problem} stays<|end|><|assistant|>"


def test_response_decoder_splits_reasoning_on_token_ids(char_tokenizer):
    # The char tokenizer marks <think> / </think> as special: a text-level split after
    # skip_special_tokens would see "abc#7" and the regex would read the reasoning.
    tok = char_tokenizer
    decode = ResponseDecoder(tok)

    def ids(text):
        return tok.encode(text, add_special_tokens=False)

    full, answer = decode(ids("<think>#3</think>#7<|end|>"))
    assert (full, answer) == ("<think>#3</think>#7<|end|>", "#7")
    assert decode(ids("<think>#3 still thinking"))[1] == ""
    assert decode(ids("#7<|end|>"))[1] == "#7"


def _records(correct: list[list[bool]], truncated=None, lengths=None) -> list[dict]:
    out = []
    for i, row in enumerate(correct):
        for j, ok in enumerate(row):
            out.append(
                {
                    "id": f"p{i}",
                    "problem_index": i,
                    "sample": j,
                    "answer": "1",
                    "extracted": None if (truncated and truncated[i][j]) else "1",
                    "correct": ok,
                    "truncated": bool(truncated and truncated[i][j]),
                    "length": lengths[i][j] if lengths else 10,
                    "response": "",
                }
            )
    return out


META = dict(model_fingerprint="model-x", data_fingerprint="data-y", total_problems=3)


def test_summarize_by_hand():
    correct = [[True, True, False, False], [False, False, False, False], [True, True, True, True]]
    truncated = [[False, False, True, False], [False, False, False, False], [False, False, False, False]]
    lengths = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    s = summarize(_records(correct, truncated, lengths), samples_per_problem=4, **META)
    assert s.num_problems == 3 and s.avg_at_k == pytest.approx(6 / 12, abs=1e-15)
    per_problem = [0.5, 0.0, 1.0]
    stderr = math.sqrt(sum((a - 0.5) ** 2 for a in per_problem) / 2 / 3)
    assert s.avg_at_k_stderr == pytest.approx(stderr, abs=1e-15)
    assert s.pass_at_k[1] == pytest.approx(s.avg_at_k, abs=1e-15)  # pass@1 == avg@K
    # pass@4 with n=4: a problem passes iff it has any correct sample -> (1 + 0 + 1) / 3.
    assert s.pass_at_k[4] == pytest.approx(2 / 3, abs=1e-15)
    assert s.mean_response_tokens == pytest.approx(6.5, abs=1e-15)
    assert s.truncation_rate == pytest.approx(1 / 12, abs=1e-15) and s.no_answer_rate == pytest.approx(1 / 12, abs=1e-15)
    line = s.console_line("t")
    assert line.startswith("t: avg@4 0.5000") and "pass@4 0.6667" in line and "truncated 8.3%" in line


def test_summarize_refuses_incomplete_problems():
    records = _records([[True, False]])[:1]
    with pytest.raises(ArtifactError, match="expected 0..1"):
        summarize(records, samples_per_problem=2, **META)


def test_merge_equals_unsharded_and_refuses_bad_shards(tmp_path):
    correct = [[True, False], [False, False], [True, True]]
    records = _records(correct)
    full = summarize(records, samples_per_problem=2, config={"seed": 0}, **META)
    for i in range(2):
        part = [r for r in records if r["problem_index"] % 2 == i]
        s = summarize(part, samples_per_problem=2, config={"seed": 0}, shard={"index": i, "count": 2}, **META)
        write_results(tmp_path / Shard(i, 2).dirname, part, s)
    merged = merge_shards(tmp_path)
    assert merged.results() == full.results()
    merged_records, reread = read_results(tmp_path)
    assert merged_records == records and reread.results() == full.results()
    assert json.loads((tmp_path / "manifest.json").read_text())["kind"] == "eval"

    # A shard of another configuration: refused.
    stale = summarize([r for r in records if r["problem_index"] % 2 == 1], samples_per_problem=2, config={"seed": 1}, **META)
    write_results(tmp_path / Shard(1, 2).dirname, [r for r in records if r["problem_index"] % 2 == 1], stale)
    with pytest.raises(ConsistencyError, match="shard 1 evaluated a different configuration"):
        merge_shards(tmp_path)
    # A missing shard: refused.
    (tmp_path / Shard(1, 2).dirname / "summary.json").unlink()
    with pytest.raises(ArtifactError, match="1 of 2 shards not finished"):
        merge_shards(tmp_path)
    with pytest.raises(ArtifactError, match="no shard"):
        merge_shards(tmp_path / "elsewhere")


def test_tool_reports_bad_input_in_one_line(tmp_path):
    # The thin tool end to end: K < 1 is one error line and exit code 2, no traceback.
    data = _write(tmp_path / "d.jsonl", [json.dumps({"id": "a", "problem": "1+1", "answer": "2"})])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o"), "--samples-per-problem", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["lopd eval: error: samples per problem K=0 is below 1 (fix: use --samples-per-problem >= 1)"]


def test_published_layouts_are_read_by_their_format(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem_idx": 1, "problem": "Compute $9!$.", "answer": "362880", "problem_type": ["Algebra"]},
                                         {"problem_idx": 2, "problem": "Compute $2^{10}$.", "answer": "1024", "problem_type": []}]),
                   tmp_path / "hmmt.parquet")
    problems = load_problems(DataSource(tmp_path / "hmmt.parquet", data_format("hmmt25")))
    assert problems == [Problem("1", "362880", "Compute $9!$."), Problem("2", "1024", "Compute $2^{10}$.")]
    assert [p.id for p in load_problems(tmp_path / "hmmt.parquet")] == ["0", "1"]  # the default layout: no id field, row numbers
    with pytest.raises(ArtifactError, match=r"hmmt\.parquet row 0: no 'gold' \(its keys: 'problem_idx', 'problem', 'answer', 'problem_type'\) "
                                            r"\(fix: pass --answer-key with one of them"):
        load_problems(DataSource(tmp_path / "hmmt.parquet", data_format("hmmt25", answer_key="gold")))
    with pytest.raises(ConfigError, match="carries no prompt template"):
        load_problems(DataSource(tmp_path / "hmmt.parquet", data_format("hmmt25"), prompt_template="Q {problem}"))


def test_long_answers_are_recorded_by_start_and_digest():
    short = "x" * RECORDED_ANSWER_CHARS
    assert recorded_answer(short) == short
    tests = '{"tests": [' + ", ".join(['{"input": "1", "output": "1"}'] * 200) + '], "fn_name": null}'
    recorded = recorded_answer(tests)
    assert recorded.startswith(tests[:200] + "... [") and f"{len(tests):,} characters, sha256 " in recorded and len(recorded) < 300
    assert recorded_answer(tests + " ") != recorded  # the digest tells two long answers apart


def test_result_differences_name_what_changed(tmp_path):
    problems = [Problem("a", "1", "1+0")]
    config = EvalConfig(samples_per_problem=2, backend="hf")
    records = [{"id": "a", "problem_index": 0, "sample": j, "answer": "1", "extracted": "1", "correct": True, "truncated": False,
                "length": 3, "response": "1"} for j in range(2)]
    from megatron_lopd.evaluation.evaluate import problems_fingerprint

    summary = summarize(records, samples_per_problem=2, model_fingerprint="model-x", data_fingerprint=problems_fingerprint(problems),
                        total_problems=1, config=dataclasses.asdict(config))
    write_results(tmp_path, records, summary)
    assert result_differences(tmp_path, "model-x", problems, config) == []
    assert result_differences(tmp_path, None, problems, dataclasses.replace(config, code_workers=4)) == []  # runtime only
    diffs = result_differences(tmp_path, "model-y", [Problem("a", "2", "1+0")], dataclasses.replace(config, temperature=1.0))
    assert [d.split(" ")[0] for d in diffs] == ["model", "data", "temperature"]
    with pytest.raises(ArtifactError, match="unreadable"):
        result_differences(tmp_path / "none", None, problems, config)


def test_code_grading_settings_reach_the_grader(monkeypatch):
    """--sandbox-allow-unisolated reaches the code grader's sandbox; it and --code-workers change no result;
    the default worker count is the CPUs this process may use (a SLURM task's share), at most 8."""
    from megatron_lopd.evaluation.evaluate import _RESUME_FREE, _RUNTIME_ONLY, grading_workers

    grader = EvalConfig(grader="code", sandbox_allow_unisolated=True).make_grader()
    assert grader.name == "code" and grader.sandbox.allow_unisolated
    assert not EvalConfig(grader="code").make_grader().sandbox.allow_unisolated
    assert {"code_workers", "sandbox_allow_unisolated"} <= set(_RUNTIME_ONLY) & set(_RESUME_FREE)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert grading_workers(EvalConfig()) == 3 and grading_workers(EvalConfig(code_workers=5)) == 5
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert grading_workers(EvalConfig()) == 8
