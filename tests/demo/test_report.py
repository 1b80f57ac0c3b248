"""The report's statements follow the numbers: paired differences, verdicts, the plot and the files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_lopd.demo import report


def test_paired_diff_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    d = report.paired_diff(a.tolist(), b.tolist())
    diff = 100.0 * (a - b).astype(np.float64)
    assert d.points == pytest.approx(diff.mean(), abs=1e-9)
    assert d.se == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)), abs=1e-9)
    assert report.paired_diff([1, 1], [1, 1]).se == 0.0
    with pytest.raises(ValueError):
        report.paired_diff([1], [1, 0])


def _summary(r: list[int], variants: dict[str, list[int]]) -> dict:
    """A minimal summary.json with the given per-problem correctness of R and each variant."""
    def acc(c):
        return {"pass1": sum(c) / len(c), "pass1_stderr": 0.01, "sampled_pass1": 0.5, "kl_to_teacher_a": 0.1, "response_tokens": 40.0}

    loss = {"lightning": "lightning_opd", "lightning_topk": "topk_reverse_kl", "offline_teacher_b": "topk_reverse_kl",
            "offline_teacher_b_residualized": "topk_reverse_kl", "online": "topk_reverse_kl", "continued_sft": "sft"}
    data = {"lightning": "teacher A store", "lightning_topk": "teacher A store", "offline_teacher_b": "teacher B store",
            "offline_teacher_b_residualized": "teacher B store, style-residualized", "online": "live", "continued_sft": "SFT data"}
    n = len(r)
    zeros = [0] * n
    return {
        "seed": 3,
        "sizes": {"eval_problems": n, "kl_prompts": 10, "teacher_steps": 1, "sft_steps": 1, "opd_steps": 4, "batch": 2, "opd_lr": 1e-3,
                  "temperature": 1.0, "curve_every": 2, "teacher": {}, "student": {}},
        "accuracy": {"base_student": acc(zeros), "teacher_a": acc([1] * n), "teacher_b": acc([1] * n), "sft_R": acc(r), **{k: acc(v) for k, v in variants.items()}},
        "paired_correct": {"sft_R": r, **variants},
        "variants": {k: {"label": k, "base": k, "loss": loss[k], "data": data[k], "train_seconds": 10.0, "teacher_forward_tokens": 1000 if k != "online" else 3000,
                         "curve": [{"step": 0, "pass1": 0.5, "sampled_pass1": 0.4, "kl_to_teacher_a": 0.2},
                                   {"step": 4, "pass1": acc(v)["pass1"], "sampled_pass1": 0.4, "kl_to_teacher_a": 0.1}],
                         "metrics": []} for k, v in variants.items()},
        "wall_clock_s": {"stages": {"rollouts": 5.0, "score": 1.0}, "total": 6.0, "this_invocation": 6.0},
        "teacher_forward_tokens": {"sft_data_generation": 10, "offline_scoring_teacher_a": 1000, "offline_scoring_teacher_b": 1000, "online:online": 3000},
        "store": {"bytes_per_token": 12.5, "bytes": 125, "response_tokens": 10, "top_k": 8},
        "data": {"sft_data_correct": 0.8, "sft_data_backend": "hf", "rollouts_correct": 0.6, "rollouts": 4, "sft_samples": 4},
        "example": {"prompt": "1234*5", "style_A": "a", "style_B": "b"},
        "versions": {"torch": "x"},
    }


def test_findings_follow_the_numbers():
    r = [1] * 200 + [0] * 200
    better = [1] * 300 + [0] * 100  # +25 points over R, paired: far beyond 2 SE
    worse = [0] * 400
    same = list(r)
    s = _summary(r, {"lightning": same, "lightning_topk": better, "offline_teacher_b": worse, "online": better, "continued_sft": same})
    text = "\n".join(report.findings(s))
    assert "Lightning OPD (paper loss)" not in text  # labels come from the summary, not from the code
    lines = report.findings(s)
    assert "no difference beyond 2 SE" in lines[0] and "+0.0 points" in lines[0]
    assert "improved on R" in lines[1] and "+25.0 points" in lines[1]
    assert "The consistent teacher was better" in lines[2] and "+75.0 points" in lines[2]
    assert "no difference beyond 2 SE" in lines[3] and "(3.00x the whole store)" in lines[3] and "shared by the 2 offline runs" in lines[3] and "(500 per run)" in lines[3]
    assert "more SFT" not in lines[4] or "beat" in lines[4]

    flipped = _summary(r, {"lightning": worse, "lightning_topk": same, "offline_teacher_b": better, "online": better, "continued_sft": better})
    lines = report.findings(flipped)
    assert "ended below R" in lines[0] and "`lopd demo --study paper-loss`" in lines[0]  # the paper loss below R points to the study
    assert "--study" not in "\n".join(report.findings(s))
    assert "The inconsistent teacher was better" in lines[2]
    assert "online OPD was better" in lines[3]
    assert "more SFT beat Lightning OPD" in lines[4]


def meter(share: float, explained: float, residual: float) -> dict:
    return {"gap": {"mean": -1.0, "share_over_1nat": share, "quantiles": {"0.5": -0.5}}, "residual": {"share_over_1nat": residual},
            "explained": {"token": explained / 2, "cell": explained / 2, "style": explained}, "recurring": [{"token": 7, "text": ";", "mean_gap": -3.0}]}


def test_cross_teacher_finding_and_meter_section(tmp_path):
    r = [1] * 200 + [0] * 200
    worse = [0] * 400
    s = _summary(r, {"lightning": r, "lightning_topk": r, "offline_teacher_b": worse, "offline_teacher_b_residualized": r,
                     "online": r, "continued_sft": r})
    s["consistency"] = {"meter": {"teacher_a": meter(0.025, 0.10, 0.036), "teacher_b": meter(0.939, 0.228, 0.728)},
                        "positive_scores": 0.35, "topk_kl": 0.68, "topk_top1_changed": 0.18}
    lines = report.findings(s)
    cross = next(line for line in lines if line.startswith("**Cross-teacher correction"))
    assert "corrected minus plain +50.0 points" in cross and "the correction helped." in cross
    assert "at 93.9% of tokens (teacher A's store: 2.5%)" in cross and "explain 22.8% of the gap's variance, leaving 72.8%" in cross
    consistency = next(line for line in lines if line.startswith("**Teacher consistency"))
    assert "scored by teacher B 0.0%" in consistency  # the plain B run, not the corrected one
    md = report.report_markdown(s)
    assert "## Teacher-R consistency meter" in md and "| teacher B | -1.000 | -0.500 | 93.9% | 11.4 / 11.4 / 22.8% | 72.8% |" in md
    assert "`;` -3.0" in md and "changed the top-1 at 18.0% of positions" in md
    assert "opt-out `teacher_consistency.allow_inconsistent_teacher=true`" in md and "manifest (offline_teacher_b)" in md
    s["paired_correct"]["offline_teacher_b_residualized"] = worse
    assert "no difference beyond 2 SE" in next(line for line in report.findings(s) if line.startswith("**Cross-teacher"))


def test_write_report_files(tmp_path):
    r = [1, 0] * 20
    s = _summary(r, {"lightning": r, "lightning_topk": [1] * 40, "offline_teacher_b": [0] * 40, "online": r, "continued_sft": r})
    path = report.write_report(tmp_path, s)
    md = path.read_text()
    assert "# Lightning OPD demo (seed 3)" in md and "12.5 bytes/token" in md and "curves.png" in md
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(s))
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    screen = report.console_summary(s, tmp_path)
    assert len(screen.splitlines()) < 40 and "report.md" in screen
