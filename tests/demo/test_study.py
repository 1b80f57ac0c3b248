"""The paper-loss study's report (megatron_lopd/demo/study.py) from hand-made numbers; the
study's stages run end to end in tests/demo/test_run.py's slow test."""

from __future__ import annotations

from megatron_lopd.demo import study as study_mod


def _arm(name: str, loss: str, start: float, end: float, se: float, *, t07: bool = False) -> dict:
    points = 100 * (end - start)
    return {"name": name, "what": name.replace("_", " "), "loss": loss, "lr": 3e-4, "steps": 100, "advantage_clip": 0.0, "t07": t07,
            "start_pass1": start, "pass1": end, "pass1_stderr": 0.02, "diff_vs_start": {"points": points, "se": se, "significant": abs(points) > 2 * se},
            "start_kl": 0.1, "kl_to_teacher_a": 0.1 + (start - end), "drift_chi2_end": 0.02, "drift_chi2_max": 0.5, "drift_kl_end": 0.01,
            "curve": [{"step": 0, "pass1": start, "kl_to_teacher_a": 0.1}, {"step": 100, "pass1": end, "kl_to_teacher_a": 0.1 + (start - end)}],
            "metrics": [{"step": 1, "loss": 0.1, "drift_chi2": 0.0, "drift_kl": 0.0, "kl_to_teacher": 0.2},
                        {"step": 100, "loss": 0.1, "drift_chi2": 0.02, "drift_kl": 0.01, "kl_to_teacher": 0.2}]}


def _summary(arms: list[dict], base_matches: bool = True) -> dict:
    return {"seed": 0, "R": {"pass1": 0.7, "kl_to_teacher_a": 0.1}, "R_t07": {"pass1": 0.8, "kl_to_teacher_a": 0.08}, "arms": arms,
            "demo_runs": {"online (paper loss)": {"pass1": 0.71, "diff_vs_R": 1.0}}, "base_matches_demo": base_matches}


def test_findings_follow_the_numbers(tmp_path):
    none_better = _summary([_arm("base", "lightning_opd", 0.7, 0.71, 2.0), _arm("lr_3e-3", "lightning_opd", 0.7, 0.5, 3.0),
                            _arm("t07_topk", "topk_reverse_kl", 0.8, 0.95, 2.0, t07=True)])
    text = study_mod.study_findings(none_better)
    assert text[0] == "No setting of the paper's loss improved its R beyond 2 SE (best: base, +1.0 points)."
    assert text[1].startswith("It made R worse beyond 2 SE in: lr_3e-3 (-20.0 points, drift chi2 up to 0.500)")
    assert "Control at T=0.7: the top-k reverse KL from the same R(T=0.7) moved it +15.0 points (SE 2.0)." in text
    assert text[-1].endswith("reproduces the demo's Lightning OPD (paper loss) problem by problem.")

    one_better = _summary([_arm("base", "lightning_opd", 0.7, 0.7, 2.0), _arm("lr_1e-3", "lightning_opd", 0.7, 0.8, 2.0)], base_matches=False)
    text = study_mod.study_findings(one_better)
    assert text[0] == "The paper's loss improved its R beyond 2 SE in: lr_1e-3 (lr 1e-3: +10.0 points)."
    assert "does NOT reproduce" in text[-1] and not any(t.startswith("It made R worse") for t in text)

    md = study_mod.study_markdown(none_better)
    assert "| lr_3e-3 (lr 3e-3) | lightning_opd | 0.0003 | 100 | - | 70.0 -> 50.0 | -20.0 (3.0) * |" in md
    assert "online (paper loss) 71.0% (+1.0 vs R)" in md
    png = study_mod.plot_study(none_better, tmp_path / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_arms_change_one_knob_each():
    arms = study_mod.paper_loss_arms()
    assert len({a.name for a in arms}) == len(arms) and arms[0] == study_mod.StudyArm("base", arms[0].what)
    default = study_mod.StudyArm("x", "x")
    for arm in arms[1:]:
        changed = {f for f in ("lr", "passes", "advantage_clip", "t07", "loss") if getattr(arm, f) != getattr(default, f)}
        assert changed and (len(changed) == 1 or arm.name in ("clip_1_lr_3e-3", "t07_topk")), arm.name
