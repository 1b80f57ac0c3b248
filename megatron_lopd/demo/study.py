"""`lopd demo --study paper-loss`: why the paper's sampled-token loss does not improve R here.

In the demo (README, seeds 0-2), Lightning OPD with the top-k reverse KL lifts R by
+16.5 +- 3.1 points while the paper's own loss (`-A_t log S(a_t)`, `A_t = lpT - lpS` on the
sampled token) makes R worse in every seed (-26.5 +- 10.6 points).
The study reruns that training from the same R and the same store (same data order), one
knob at a time, over the knobs that plausibly matter at this scale:

- learning rate (1e-4 .. 3e-3 around the demo's 3e-4),
- steps (three passes over the store instead of one),
- an advantage clip (`advantage_clip`, A clipped to [-1, 1]; alone and at a high lr),
- the paper's sampling temperature 0.7 for the SFT data and the rollouts (a new R and store,
  built by the pipeline's own stages; the top-k loss from that R too, as a control).

Every arm logs the drift monitor (chi2 and KL of S from R on the stored tokens, each step)
and is measured like the demo's runs (greedy pass@1, KL to teacher A on the model's own T=1
samples) at every checkpoint. A `base` arm repeats the demo's own run through the study's
path: it must match the demo's Lightning result.

Output: OUT/study-paper-loss/study.md, study.json, study.png (state.json resumes it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_lopd.demo.lanes import Stage, default_jobs, run_plan
from megatron_lopd.demo.report import SIGNIFICANT_SE, paired_diff
from megatron_lopd.demo.run import Demo, DemoSizes, _atomic_json, run_demo
from megatron_lopd.errors import ConfigError

STUDY_NAME = "study-paper-loss"
T07 = 0.7  # the paper's sampling temperature for the SFT data and the rollouts


@dataclass(frozen=True)
class StudyArm:
    name: str
    what: str
    lr: float | None = None  # None: the demo's opd_lr
    passes: int = 1  # passes over the store (steps = passes x the demo's opd_steps)
    advantage_clip: float = 0.0
    t07: bool = False  # from the R and store built at temperature 0.7
    loss: str = "lightning_opd"


def paper_loss_arms() -> list[StudyArm]:
    return [
        StudyArm("base", "the demo's run, repeated (must match the demo)"),
        StudyArm("lr_1e-4", "lr 1e-4", lr=1e-4),
        StudyArm("lr_1e-3", "lr 1e-3", lr=1e-3),
        StudyArm("lr_3e-3", "lr 3e-3", lr=3e-3),
        StudyArm("passes_3", "3 passes over the store", passes=3),
        StudyArm("clip_1", "advantage clipped to [-1, 1]", advantage_clip=1.0),
        StudyArm("clip_1_lr_3e-3", "advantage clipped to [-1, 1], lr 3e-3", lr=3e-3, advantage_clip=1.0),
        StudyArm("t07", f"SFT data and rollouts at T={T07} (paper)", t07=True),
        StudyArm("t07_topk", f"SFT data and rollouts at T={T07}, top-k reverse KL (control)", t07=True, loss="topk_reverse_kl"),
    ]


class PaperLossStudy:
    """The study's stages over a finished demo (`demo_out`); same runner protocol as `Demo`."""

    def __init__(self, demo_out: Path, seed: int, sizes: DemoSizes, state: dict[str, Any], console: Callable[[str], None],
                 progress: bool, *, jobs: int = 1):
        demo_state = json.loads((Path(demo_out) / "work" / "state.json").read_text())
        self.demo = Demo(Path(demo_out), seed, sizes, demo_state, console, progress)
        self.dir = Path(demo_out) / STUDY_NAME
        self.state, self.console, self.progress, self.jobs = state, console, progress, jobs
        self.arms = paper_loss_arms()

    # ------------------------------------------------------------------ runner protocol
    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def save_state(self) -> None:
        _atomic_json(self.dir / "state.json", self.state)

    def lane_runner(self) -> Callable[[], "PaperLossStudy"]:
        d = self.demo
        return functools.partial(PaperLossStudy, d.paths.out, d.seed, d.sizes, {}, print, False)

    def close(self) -> None:
        self.demo.close()

    # ------------------------------------------------------------------ the T=0.7 pipeline
    @property
    def t07_pipeline(self) -> Path:
        return self.dir / "t07" / "pipeline"

    def t07_config(self):
        """The demo's pipeline with the paper's temperature for the SFT data and the rollouts."""
        config = self.demo.pipeline_config()
        return dataclasses.replace(config, work_dir=str(self.t07_pipeline),
                                   sft_data=dataclasses.replace(config.sft_data, temperature=T07),
                                   rollouts=dataclasses.replace(config.rollouts, temperature=T07))

    def t07_stage(self, name: str) -> dict[str, Any]:
        result = self.demo.run_pipeline_stage(name, self.t07_config())
        if name == "sft":
            result["measure"] = self.demo.measure("study-t07_R", self.t07_pipeline / "sft" / "hf")
        return result

    # ------------------------------------------------------------------ the arms
    def run_dir(self, arm: StudyArm) -> Path:
        return self.dir / "runs" / arm.name

    def run_arm(self, arm: StudyArm) -> dict[str, Any]:
        d, s = self.demo, self.demo.sizes
        pipe = self.t07_pipeline if arm.t07 else d.paths.pipeline
        steps = arm.passes * s.opd_steps
        overrides = d.offline_overrides("lightning", arm.loss, pipe / "teacher_store", self.run_dir(arm), pipe) + [
            f"optimizer.lr={arm.lr or s.opd_lr}", f"train_steps={steps}", f"advantage_clip={arm.advantage_clip}",
            f"checkpoint.save_every={s.curve_every * arm.passes}",
        ]
        t0 = time.perf_counter()
        d.run_training(overrides)
        start = self.state["stages"]["t07_sft"]["measure"] if arm.t07 else d.state["stages"]["sft"]["measure"]
        return d.finish_variant(f"study-{arm.name}", self.run_dir(arm), self.run_dir(arm) / "hf", time.perf_counter() - t0,
                                {"loss": arm.loss, "arm": dataclasses.asdict(arm), "steps": steps}, start=start, steps=steps)

    def stages(self) -> list[Stage]:
        out = [Stage(f"t07_{name}", f"pipeline at T={T07}: {what}", lambda n=name: self.t07_stage(n), (), after)
               for name, what, after in (("sft_data", "teacher A writes the SFT data", ()), ("sft", "SFT -> R(T=0.7)", ("t07_sft_data",)),
                                         ("rollouts", "R(T=0.7) samples the rollouts", ("t07_sft",)),
                                         ("score", "teacher A scores them into a store", ("t07_rollouts",)))]
        # The T=0.7 chain first: it is the longest path.
        arms = sorted(self.arms, key=lambda a: not a.t07)
        out += [Stage(arm.name, arm.what, lambda a=arm: self.run_arm(a), (self.run_dir(arm),), ("t07_score",) if arm.t07 else ())
                for arm in arms]
        return out


# ---------------------------------------------------------------------------------------
# Report


def _drift(metrics: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    values = [m[key] for m in metrics if m.get(key) is not None]
    return (values[-1], max(values)) if values else (None, None)


def study_summary(study: PaperLossStudy) -> dict[str, Any]:
    demo_st, st = study.demo.state["stages"], study.state["stages"]
    r = demo_st["sft"]["measure"]
    arms = []
    for arm in study.arms:
        v = st[arm.name]
        start = st["t07_sft"]["measure"] if arm.t07 else r
        diff = paired_diff(v["measure"]["correct"], start["correct"])
        chi2_end, chi2_max = _drift(v["metrics"], "drift_chi2")
        arms.append({
            "name": arm.name, "what": arm.what, "loss": arm.loss, "lr": arm.lr or study.demo.sizes.opd_lr, "steps": v["steps"],
            "advantage_clip": arm.advantage_clip, "t07": arm.t07,
            "start_pass1": start["pass1"], "pass1": v["measure"]["pass1"], "pass1_stderr": v["measure"]["pass1_stderr"],
            "diff_vs_start": {"points": diff.points, "se": diff.se, "significant": diff.significant},
            "start_kl": start["kl_to_teacher_a"], "kl_to_teacher_a": v["measure"]["kl_to_teacher_a"],
            "drift_chi2_end": chi2_end, "drift_chi2_max": chi2_max, "drift_kl_end": _drift(v["metrics"], "drift_kl")[0],
            "curve": v["curve"], "metrics": [{k: m.get(k) for k in ("step", "loss", "drift_chi2", "drift_kl", "kl_to_teacher")} for m in v["metrics"]],
        })
    demo_runs = {}
    for name, key in (("lightning (paper loss)", "eval"), ("lightning (top-k RKL)", "lightning_topk"),
                      ("online (paper loss)", "online_lightning_opd"), ("online (top-k RKL)", "online")):
        if key in demo_st:
            m = demo_st[key]["measure"]
            demo_runs[name] = {"pass1": m["pass1"], "diff_vs_R": paired_diff(m["correct"], r["correct"]).points}
    return {"seed": study.demo.seed, "R": {"pass1": r["pass1"], "kl_to_teacher_a": r["kl_to_teacher_a"]},
            "R_t07": {k: st["t07_sft"]["measure"][k] for k in ("pass1", "kl_to_teacher_a")}, "arms": arms, "demo_runs": demo_runs,
            "base_matches_demo": st["base"]["measure"]["correct"] == demo_st["eval"]["measure"]["correct"]}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def study_findings(summary: dict[str, Any]) -> list[str]:
    paper = [a for a in summary["arms"] if a["loss"] == "lightning_opd"]
    better = [a for a in paper if a["diff_vs_start"]["significant"] and a["diff_vs_start"]["points"] > 0]
    worse = [a for a in paper if a["diff_vs_start"]["significant"] and a["diff_vs_start"]["points"] < 0]
    lines = []
    if better:
        lines.append("The paper's loss improved its R beyond 2 SE in: " + ", ".join(
            f"{a['name']} ({a['what']}: {a['diff_vs_start']['points']:+.1f} points)" for a in better) + ".")
    else:
        lines.append(f"No setting of the paper's loss improved its R beyond {SIGNIFICANT_SE:g} SE "
                     f"(best: {max(paper, key=lambda a: a['diff_vs_start']['points'])['name']}, "
                     f"{max(a['diff_vs_start']['points'] for a in paper):+.1f} points).")
    if worse:
        lines.append("It made R worse beyond 2 SE in: " + ", ".join(
            f"{a['name']} ({a['diff_vs_start']['points']:+.1f} points, drift chi2 up to {_num(a['drift_chi2_max'])})" for a in worse) + ".")
    moved = sorted(paper, key=lambda a: (a["kl_to_teacher_a"] or 0) - (a["start_kl"] or 0))
    lines.append("KL to teacher A (start -> end): " + "; ".join(
        f"{a['name']} {_num(a['start_kl'])} -> {_num(a['kl_to_teacher_a'])}" for a in moved) + ".")
    control = next((a for a in summary["arms"] if a["name"] == "t07_topk"), None)
    if control:
        lines.append(f"Control at T={T07}: the top-k reverse KL from the same R(T={T07}) moved it "
                     f"{control['diff_vs_start']['points']:+.1f} points (SE {control['diff_vs_start']['se']:.1f}).")
    lines.append("The study's base arm " + ("reproduces" if summary["base_matches_demo"] else "does NOT reproduce")
                 + " the demo's Lightning OPD (paper loss) problem by problem.")
    return lines


def study_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Why the paper's loss does not improve R in the demo (seed {summary['seed']})",
        "",
        f"R: greedy pass@1 {_pct(summary['R']['pass1'])}%, KL to teacher A {_num(summary['R']['kl_to_teacher_a'])}; "
        f"R(T={T07}): {_pct(summary['R_t07']['pass1'])}%, KL {_num(summary['R_t07']['kl_to_teacher_a'])}. "
        "Every arm starts from its R, trains on the store of its R's rollouts with the demo's data order, and changes one "
        "thing. Differences are paired over the same held-out problems against the arm's R.",
        "",
        "| arm | loss | lr | steps | clip | start -> end greedy pass@1 | end - start (SE) | KL to A start -> end | drift chi2 end / max | drift KL end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in summary["arms"]:
        d = a["diff_vs_start"]
        lines.append(
            f"| {a['name']} ({a['what']}) | {a['loss']} | {a['lr']:g} | {a['steps']} | {a['advantage_clip'] or '-'} | "
            f"{_pct(a['start_pass1'])} -> {_pct(a['pass1'])} | {d['points']:+.1f} ({d['se']:.1f}){' *' if d['significant'] else ''} | "
            f"{_num(a['start_kl'])} -> {_num(a['kl_to_teacher_a'])} | {_num(a['drift_chi2_end'])} / {_num(a['drift_chi2_max'])} | "
            f"{_num(a['drift_kl_end'], '.4f')} |")
    lines += ["", "\\* beyond 2 SE.", ""]
    if summary["demo_runs"]:
        lines += ["The demo's own runs from R, for reference: " + "; ".join(
            f"{k} {_pct(v['pass1'])}% ({v['diff_vs_R']:+.1f} vs R)" for k, v in summary["demo_runs"].items()) + ".", ""]
    lines += ["## Findings", "", *[f"- {f}" for f in study_findings(summary)], "",
              "![pass@1, KL to teacher A and drift chi2 against step](study.png)", ""]
    return "\n".join(lines)


def plot_study(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for a in summary["arms"]:
        style = "--" if a["loss"] != "lightning_opd" else "-"
        steps = [p["step"] for p in a["curve"]]
        axes[0].plot(steps, [100 * p["pass1"] for p in a["curve"]], style, marker="o", ms=3, label=a["name"])
        axes[1].plot(steps, [p["kl_to_teacher_a"] for p in a["curve"]], style, marker="o", ms=3, label=a["name"])
        m = [x for x in a["metrics"] if x.get("drift_chi2") is not None]
        axes[2].plot([x["step"] for x in m], [x["drift_chi2"] for x in m], style, lw=1, label=a["name"])
    for ax, title in zip(axes, ("greedy pass@1 (%)", "KL to teacher A (nats/token)", "drift chi2 of S from R (per step)")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[2].set_yscale("symlog", linthresh=0.01)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_paper_loss_study(out: str | Path, *, seed: int = 0, sizes: DemoSizes = DemoSizes(), jobs: int | None = None, overwrite: bool = False,
                         console: Callable[[str], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """The demo in `out` (run, or resumed to its end; `overwrite`: started over), then the study's
    arms (resumed where a previous study stopped); returns study.json's content."""
    out = Path(out)
    echo = console or (lambda line: print(line, flush=True))
    resume = not overwrite and out.is_dir() and any(out.iterdir())
    run_demo(out, seed=seed, sizes=sizes, overwrite=overwrite, resume=resume, console=echo, progress=progress, jobs=jobs)  # sets up this process too
    study_dir = out / STUDY_NAME
    state_path = study_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"seed": seed, "sizes": sizes.to_dict(), "stages": {}}
    if state.get("sizes") != sizes.to_dict() or state.get("seed") != seed:
        raise ConfigError(f"{study_dir}: a study of another demo (seed or sizes differ)", f"remove {study_dir} to start the study over")
    study = PaperLossStudy(out, seed, sizes, state, echo, progress, jobs=jobs or default_jobs())
    echo(f"== paper-loss study -> {study_dir}")
    run_plan(study, study.stages())
    summary = study_summary(study)
    _atomic_json(study_dir / "study.json", summary)
    (study_dir / "study.md").write_text(study_markdown(summary))
    plot_study(summary, study_dir / "study.png")
    echo("\n".join(["", *[f"  - {f}" for f in study_findings(summary)], f"  report: {study_dir / 'study.md'}", ""]))
    return summary
