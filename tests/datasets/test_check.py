"""The leakage / duplicate check (megatron_lopd/datasets/check.py) and `lopd data check`."""

from __future__ import annotations

import json

from megatron_lopd.cli import main
from megatron_lopd.datasets import DataSource, check_leakage, data_format, normalize_text

HEAD, TAIL = "Solve the following math problem step by step.\n\n", "\n\nRemember to put your answer on its own line."
AIME_1 = "Every morning Aya goes for a $9$-kilometer-long walk and stops at a coffee shop afterwards."
AIME_2 = "Let $ABC$ be a triangle inscribed in circle $\\omega$."
HMMT_1 = "Compute the sum of the positive divisors (including $1$) of $9!$ that have units digit $1$."


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _inputs(tmp_path):
    train = _jsonl(tmp_path / "opd.jsonl", [
        {"prompt": [{"role": "user", "content": HEAD + "EVERY  morning aya goes for a $9$-kilometer-long walk\nand stops at a coffee shop afterwards." + TAIL}],
         "label": "204"},                                                       # AIME_1, wrapped, other case and spacing
        {"prompt": [{"role": "user", "content": "Find all primes p with p+2 prime."}], "label": "many"},
        {"prompt": [{"role": "user", "content": "find all primes p  with p+2 prime. "}], "label": "many"},  # a repeat after normalisation
        {"prompt": [{"role": "user", "content": HMMT_1.upper()}], "label": "103"},  # HMMT_1 exactly, after normalisation
        {"prompt": [{"role": "user", "content": "1+1"}], "label": "2"},
    ])
    aime = _jsonl(tmp_path / "aime24.jsonl", [{"id": 60, "problem": AIME_1, "answer": "204"}, {"id": 61, "problem": AIME_2, "answer": "17"},
                                              {"id": 62, "problem": "1+1", "answer": "2"}])  # too short to count as contained; equal is equal
    hmmt = _jsonl(tmp_path / "hmmt.jsonl", [{"problem_idx": 1, "problem": HMMT_1, "answer": "103"}])
    return train, aime, hmmt


def test_report_finds_repeats_identical_and_contained_problems(tmp_path):
    train, aime, hmmt = _inputs(tmp_path)
    report = check_leakage(DataSource(train, data_format("dapo_math_17k_slime")),
                           {"aime24": DataSource(aime, data_format("problems")), "hmmt25": DataSource(hmmt, data_format("hmmt25"))})
    assert report.leaked and report.prompt_rows == 5 and report.eval_rows == {"aime24": 3, "hmmt25": 1}
    assert [(o.eval_set, o.eval_id, o.prompt_id, o.kind) for o in report.overlaps] == [
        ("aime24", "60", "0", "contained"), ("aime24", "62", "4", "identical"), ("hmmt25", "1", "3", "identical")]
    assert [(g.file, g.count, g.ids) for g in report.duplicates] == [(str(train), 2, ("1", "2"))]
    assert report.duplicate_rows(str(train)) == 1
    lines = report.lines()
    assert lines[0].startswith("compared after normalisation: Unicode NFKC, case-folded")
    assert "aime24 vs " + str(train) + ": LEAKED: 2 of 3 problems occur in the training prompts" in lines
    assert normalize_text("  A\u00a0b\n\tC ") == "a b c"  # NFKC turns the no-break space into a space


def test_no_overlap_is_a_clean_report(tmp_path):
    train, _, hmmt = _inputs(tmp_path)
    clean = _jsonl(tmp_path / "clean.jsonl", [{"problem": "A problem nobody trained on, long enough.", "answer": "1"}])
    report = check_leakage(DataSource(train, data_format("dapo_math_17k_slime")), {"other": DataSource(clean, data_format("problems"))})
    assert not report.leaked and report.overlaps == []
    assert f"other vs {train}: no overlap" in report.lines()


def test_cli_exit_status_and_json(tmp_path, capsys):
    train, aime, hmmt = _inputs(tmp_path)
    args = ["data", "check", "--opd-prompts", str(train), "--format", "dapo_math_17k_slime", "--eval", f"aime24:problems={aime}"]
    assert main([*args, "--eval", f"hmmt25={hmmt}", "--json", str(tmp_path / "r.json")]) == 1  # leakage
    out = capsys.readouterr().out
    assert "hmmt25 vs" in out and "LEAKED: 1 of 1 problems" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["leaked"] is True and len(saved["overlaps"]) == 3
    clean = _jsonl(tmp_path / "clean.jsonl", [{"problem": "A problem nobody trained on, long enough.", "answer": "1"}])
    assert main(["data", "check", "--opd-prompts", str(train), "--format", "dapo_math_17k_slime", "--eval", f"mine:problems={clean}"]) == 0
    assert main(["data", "check", "--opd-prompts", str(train), "--format", "dapo_math_17k_slime", "--eval", f"mine:problems={clean}",
                 "--strict"]) == 1  # the training prompts repeat one prompt
    capsys.readouterr()
    assert main(["data", "check", "--opd-prompts", str(train), "--eval", f"mystery={clean}"]) == 2
    err = capsys.readouterr().err
    assert "--eval 'mystery=" in err and "no data format 'mystery'" in err
