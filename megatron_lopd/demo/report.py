"""The demo's report: `report.md`, `curves.png` and `summary.json` from the measured numbers.

Every statement in the report is computed from the summary: differences between two
models are paired (same held-out problems) with their standard error, and a difference
counts as real only beyond two standard errors. Nothing here knows what the run "should"
show.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lopd.demo.cost import cost_lines
from megatron_lopd.runtime.files import atomic_write

SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.md"
PLOT_NAME = "curves.png"
SIGNIFICANT_SE = 2.0  # |difference| beyond this many standard errors counts as a difference
# Below this greedy pass@1 a teacher has not learned the task: the seed's comparisons then test nothing.
TEACHER_FLOOR = 0.9
TEACHER_NAMES = {"teacher_a": "teacher A", "teacher_b": "teacher B"}

STAGE_ROWS = (
    ("base_student", "base student B (random init)"),
    ("teacher_a", "teacher A (style A)"),
    ("teacher_b", "teacher B (style B)"),
    ("sft_R", "R = B after SFT on teacher A's data"),
)


@dataclass(frozen=True)
class Diff:
    points: float  # percentage points, a - b
    se: float  # paired standard error, points

    @property
    def significant(self) -> bool:
        return abs(self.points) > SIGNIFICANT_SE * self.se

    def text(self) -> str:
        return f"{self.points:+.1f} points (SE {self.se:.1f})"


def paired_diff(a: list[int], b: list[int]) -> Diff:
    """Mean of a_i - b_i over the same problems, in points, with its standard error."""
    if len(a) != len(b) or not a:
        raise ValueError("paired difference needs two equally long, non-empty correctness lists")
    d = [100.0 * (x - y) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return Diff(mean, math.sqrt(var / len(d)))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _kl(x: float | None) -> str:
    return "n/a" if x is None else f"{x + 0.0:.3f}".replace("-0.000", "0.000")


def _tokens(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def _verdict(d: Diff, better: str, worse: str, same: str) -> str:
    if not d.significant:
        return same
    return better if d.points > 0 else worse


# ---------------------------------------------------------------------------------------
# Findings: sentences from numbers


LIGHTNING_BASES = ("lightning", "lightning_topk")


def run_with_loss(variants: dict[str, Any], loss: str, *bases: str) -> str | None:
    """The first run of one of `bases` trained with `loss`; None when the demo has none."""
    return next((n for n, v in variants.items() if v["base"] in bases and v["loss"] == loss), None)


def teachers_failed(summary: dict[str, Any]) -> list[str]:
    """The teachers below TEACHER_FLOOR (empty when both learned the task)."""
    return [t for t in ("teacher_a", "teacher_b") if summary["accuracy"][t]["pass1"] < TEACHER_FLOOR]


def findings(summary: dict[str, Any]) -> list[str]:
    acc, correct, variants = summary["accuracy"], summary["paired_correct"], summary["variants"]
    out: list[str] = []
    failed = teachers_failed(summary)
    if failed:
        out.append(f"**This seed's {' and '.join(TEACHER_NAMES[t] for t in failed)} did not learn the task** "
                   f"(greedy pass@1 {', '.join(_pct(acc[t]['pass1']) + '%' for t in failed)}, below {100 * TEACHER_FLOOR:.0f} %): "
                   "R and every run from it inherit that, so the comparisons below say little about the method; "
                   "compare several seeds (`lopd demo --seeds 0,1,2`).")
    r = acc["sft_R"]["pass1"]

    def vs(a: str, b: str) -> Diff:
        return paired_diff(correct[a], correct[b])

    def against_lightning(base: str):
        """(run, its variant, the Lightning run with the same loss, Lightning minus run, the loss label) per run of kind `base`."""
        for name, v in variants.items():
            ref = run_with_loss(variants, v["loss"], *LIGHTNING_BASES)
            if v["base"] == base and ref is not None:
                yield name, v, ref, vs(ref, name), v["label"].split("(")[-1].rstrip(")")

    # 1. Lightning OPD against R, per loss.
    for name in ("lightning", "lightning_topk"):
        if name not in variants:
            continue
        d = vs(name, "sft_R")
        label = variants[name]["label"]
        out.append(
            f"**{label} vs R:** {_pct(acc[name]['pass1'])}% vs {_pct(r)}%, {d.text()}: "
            + _verdict(d, "Lightning OPD improved on R.", "Lightning OPD ended below R.", f"no difference beyond {SIGNIFICANT_SE:g} SE.")
            + (" Why, measured: `lopd demo --study paper-loss` (docs/paper-loss-study.md)." if name == "lightning" and d.significant and d.points < 0 else "")
        )

    # 2. Teacher consistency: the same loss on the same rollouts, scored by A vs by B.
    for name, _v, ref, d, loss in against_lightning("offline_teacher_b"):
        out.append(
            f"**Teacher consistency ({loss}):** the same rollouts scored by teacher A "
            f"(which wrote the SFT data) gave {_pct(acc[ref]['pass1'])}%, scored by teacher B {_pct(acc[name]['pass1'])}%; "
            f"A minus B {d.text()}. "
            + _verdict(d, "The consistent teacher was better.", "The inconsistent teacher was better.",
                       "No difference beyond 2 SE in this run.")
            + f" KL of the final student to teacher A: {_kl(acc[ref]['kl_to_teacher_a'])} (A) vs {_kl(acc[name]['kl_to_teacher_a'])} (B)."
        )

    # 2b. Cross-teacher correction: teacher B's scores with the style part subtracted, same loss.
    meter = summary.get("consistency", {}).get("meter", {})
    for name, v, ref, d, loss in against_lightning("offline_teacher_b_residualized"):
        plain = run_with_loss(variants, v["loss"], "offline_teacher_b")
        text = f"**Cross-teacher correction ({loss}):** teacher B's scores style-residualized gave {_pct(acc[name]['pass1'])}%"
        if plain is not None:
            dp = vs(name, plain)
            text += (f", plain teacher B {_pct(acc[plain]['pass1'])}%: corrected minus plain {dp.text()}: "
                     + _verdict(dp, "the correction helped.", "the correction hurt.", "no difference beyond 2 SE."))
        text += f" Consistent teacher A minus corrected B: {d.text()}."
        if "teacher_b" in meter:
            b = meter["teacher_b"]
            text += (f" The meter on B's store: |lpT - lpR| > 1 nat at {_pct(b['gap']['share_over_1nat'])}% of tokens "
                     f"(teacher A's store: {_pct(meter['teacher_a']['gap']['share_over_1nat'])}%); the cross-fitted style tables "
                     f"explain {_pct(b['explained']['style'])}% of the gap's variance, leaving {_pct(b['residual']['share_over_1nat'])}% "
                     "of tokens beyond 1 nat.")
        out.append(text)

    # 3. Offline (Lightning) vs online, same loss: accuracy and cost.
    tokens = summary["teacher_forward_tokens"]
    wall = summary["wall_clock_s"]["stages"]
    for name, v, ref, d, loss in against_lightning("online"):
        offline_tokens, online_tokens = tokens["offline_scoring_teacher_a"], v["teacher_forward_tokens"]
        runs_on_store = sum(w["data"] == variants[ref]["data"] for w in variants.values())
        offline_s = wall.get("rollouts", 0.0) + wall.get("score", 0.0) + variants[ref]["train_seconds"]
        online_s = v["train_seconds"]
        out.append(
            f"**Offline vs online ({loss}):** Lightning OPD {_pct(acc[ref]['pass1'])}%, "
            f"standard online OPD {_pct(acc[name]['pass1'])}%; Lightning minus online {d.text()}: "
            + _verdict(d, "Lightning OPD was better.", "online OPD was better.", "no difference beyond 2 SE.")
            + f" Teacher forward tokens: {_tokens(offline_tokens)} to score the rollouts once, shared by the {runs_on_store} offline "
            f"runs on that store ({_tokens(offline_tokens // max(runs_on_store, 1))} per run), vs {_tokens(online_tokens)} for the "
            f"online run ({online_tokens / max(offline_tokens, 1):.2f}x the whole store). Wall-clock for one run: {offline_s:.0f} s "
            f"offline (rollouts + scoring + training) vs {online_s:.0f} s online ({online_s / max(offline_s, 1e-9):.2f}x); "
            f"each further run on the store costs the training alone ({variants[ref]['train_seconds']:.0f} s here), with no teacher loaded."
        )

    # 4. Continued SFT as the reference for "more training of R".
    if "continued_sft" in variants:
        d = vs("continued_sft", "sft_R")
        text = (f"**Continued SFT from R (same steps):** {_pct(acc['continued_sft']['pass1'])}%, {d.text()} vs R"
                + (" (R was still improving under SFT)." if d.significant and d.points > 0 else "."))
        best = max((n for n in variants if n.startswith("lightning")), key=lambda n: acc[n]["pass1"], default=None)
        if best is not None:
            db = vs(best, "continued_sft")
            text += f" Best Lightning run ({variants[best]['label']}) minus continued SFT: {db.text()}: " + _verdict(
                db, "Lightning OPD beat more SFT.", "more SFT beat Lightning OPD.", "no difference beyond 2 SE.")
        out.append(text)
    return out


# ---------------------------------------------------------------------------------------
# Plot


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    kls = []
    for name, v in summary["variants"].items():
        steps = [p["step"] for p in v["curve"]]
        style = "--" if v["loss"] == "sft" else "-"
        kl = [float("nan") if p["kl_to_teacher_a"] is None else p["kl_to_teacher_a"] for p in v["curve"]]
        kls += kl
        ax_acc.plot(steps, [100 * p["pass1"] for p in v["curve"]], style, marker="o", label=v["label"])
        ax_kl.plot(steps, kl, style, marker="o", label=v["label"])
    for ax, title, ylabel in (
        (ax_acc, "held-out accuracy (greedy pass@1)", "%"),
        (ax_kl, "KL(student || teacher A) per token, on student samples", "nats / token"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (from R)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if all(k > 0 for k in kls if k == k):  # an estimate can dip below 0 (then: linear axis)
        ax_kl.set_yscale("log")
    ax_acc.legend(fontsize=7, loc="best")
    fig.suptitle(f"Lightning OPD demo, seed {summary['seed']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# Markdown


def _rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(accuracy key, label) of every stage and variant, in report order."""
    return list(STAGE_ROWS) + [(n, v["label"]) for n, v in summary["variants"].items()]


def _accuracy_table(summary: dict[str, Any]) -> list[str]:
    acc, correct, variants = summary["accuracy"], summary["paired_correct"], summary["variants"]
    lines = [
        "| model | greedy pass@1 % (SE) | sampled pass@1 % | KL to teacher A | vs R, points (paired SE) |",
        "|---|---|---|---|---|",
    ]
    for key, label in _rows(summary):
        a = acc[key]
        delta = paired_diff(correct[key], correct["sft_R"]).text() if key in variants else ""
        kl = "n/a (writes style B)" if key == "teacher_b" else _kl(a["kl_to_teacher_a"])
        lines.append(f"| {label} | {_pct(a['pass1'])} ({_pct(a['pass1_stderr'])}) | {_pct(a['sampled_pass1'])} | {kl} | {delta} |")
    return lines


def _meter_section(summary: dict[str, Any]) -> list[str]:
    """The consistency meter (`lopd store consistency`) on both teachers' stores of the same rollouts."""
    c = summary.get("consistency")
    if not c:
        return []
    lines = ["## Teacher-R consistency meter", "",
             "| store | mean lpT - lpR | median | share > 1 nat | variance explained by style (token / position x surprisal / both) | residual share > 1 nat |",
             "|---|---|---|---|---|---|"]
    for key, label in (("teacher_a", "teacher A (wrote the SFT data)"), ("teacher_b", "teacher B")):
        m = c["meter"][key]
        e = m["explained"]
        lines.append(f"| {label} | {m['gap']['mean']:+.3f} | {m['gap']['quantiles']['0.5']:+.3f} | {_pct(m['gap']['share_over_1nat'])}% | "
                     f"{_pct(e['token'])} / {_pct(e['cell'])} / {_pct(e['style'])}% | {_pct(m['residual']['share_over_1nat'])}% |")
    top = ", ".join(f"`{t.get('text', t['token'])}` {t['mean_gap']:+.1f}" for t in c["meter"]["teacher_b"]["recurring"])
    lines += ["", f"Teacher B's largest recurring gaps (token: mean nats over the rollouts using it): {top}. "
              f"Corrected sampled-token scores above 0: {_pct(c['positive_scores'])}% of tokens; the top-k with the token table "
              f"applied and renormalised moved {_kl(c['topk_kl'])} nats/position (KL) and changed the top-1 at "
              f"{_pct(c['topk_top1_changed'])}% of positions.", ""]
    return lines


def report_markdown(summary: dict[str, Any]) -> str:
    s, sizes, wall, tokens = summary, summary["sizes"], summary["wall_clock_s"], summary["teacher_forward_tokens"]
    cpu = summary.get("cpu_s", {"stages": {}, "total": 0.0})
    ex = s["example"]
    variants = s["variants"]
    opted_out = [v["label"] for v in variants.values() if v["base"] == "offline_teacher_b"]
    lines = [
        f"# Lightning OPD demo (seed {s['seed']})",
        "",
        "The consistent-teacher pipeline in miniature on CPU, with the project's own stages: tiny Qwen3 models, "
        "the Megatron trainer, the generation backends, the zarr teacher store and the evaluation package.",
        "",
        f"Task: `{ex['prompt']}` -> style A `{ex['style_A']}`, style B `{ex['style_B']}` "
        f"(4-digit x 1-digit multiplication with a written chain of thought; the answer is the last `#digits`; style A "
        "writes each step's factors in either order, answer-equivalent paths that give teacher A real entropy). "
        f"Held-out problems: {sizes['eval_problems']} (greedy pass@1); sampled pass@1 and KL to teacher A on the first "
        f"{sizes['kl_prompts']} of them (one T=1 sample each). Teachers: {sizes['teacher_steps']} SFT steps on reference "
        f"solutions. R: {sizes['sft_steps']} SFT steps on {s['data']['sft_samples']} answers of teacher A "
        f"(sampled at T={sizes['temperature']} with the {s['data']['sft_data_backend']} backend; {_pct(s['data']['sft_data_correct'])}% "
        f"of them correct). Every run from R: {sizes['opd_steps']} steps of {sizes['batch']} sequences at lr {sizes['opd_lr']:g}; "
        f"the offline runs make one pass over {s['data']['rollouts']} rollouts of R ({_pct(s['data']['rollouts_correct'])}% correct), "
        f"scored once by the teacher with its top-{s['store']['top_k']}.",
        "",
        "## Accuracy after every stage",
        "",
        *_accuracy_table(s),
        "",
        f"Differences are paired over the same {sizes['eval_problems']} problems; one counts as real beyond {SIGNIFICANT_SE:g} SE.",
        "",
        "## What this run shows",
        "",
        *[f"- {f}" for f in findings(s)],
        "",
        *_meter_section(s),
        "## Curves",
        "",
        f"![accuracy and KL to teacher A against step]({PLOT_NAME})",
        "",
        f"Step 0 is R; the other points are the runs' checkpoints every {sizes['curve_every']} steps, converted to Hugging Face "
        "and measured like the final models. KL is estimated on the student's own T=1 samples (mean of log S - log A per token).",
        "",
        "## Cost",
        "",
        "| stage | wall-clock s | CPU s |",
        "|---|---|---|",
        *[f"| {name} | {sec:.1f} | {cpu['stages'].get(name, 0.0):.1f} |" for name, sec in wall["stages"].items()],
        f"| **all stages** | **{wall.get('stage_sum', wall['total']):.1f}** | **{cpu['total']:.1f}** |",
        "",
        f"From the first stage's start to the last one's end: **{wall['total']:.1f} s** in {wall.get('jobs', 1)} parallel lanes "
        f"(this invocation {wall['this_invocation']:.1f} s). Stage times include measuring the stage's models; stages in parallel "
        "lanes share the CPUs, so each is slower than it would be alone. CPU s is the stage's process and subprocesses' CPU "
        "time: on a shared machine, the demo's own work.",
        "",
        "| teacher forward tokens | tokens |",
        "|---|---|",
        f"| writing the SFT data (prompt + generated) | {_tokens(tokens['sft_data_generation'])} |",
        f"| offline: scoring R's rollouts once (teacher A) | {_tokens(tokens['offline_scoring_teacher_a'])} |",
        f"| offline: scoring the same rollouts with teacher B (ablation) | {_tokens(tokens.get('offline_scoring_teacher_b'))} |",
        *[f"| online: {variants[k.split(':', 1)[1]]['label']} | {_tokens(v)} |" for k, v in tokens.items() if k.startswith("online:")],
        "",
        f"Teacher store: {s['store']['bytes']:,} bytes for {s['store']['response_tokens']:,} response tokens = "
        f"**{s['store']['bytes_per_token']:.1f} bytes/token** (top-{s['store']['top_k']} ids and log-probs, sampled-token "
        "log-probs and R's log-probs, compressed and checksummed).",
        "",
        *cost_lines(s),
        "## Notes",
        "",
        "- Teacher B's run uses the trainer's research opt-out `teacher_consistency.allow_inconsistent_teacher=true`: "
        "the trainer refuses a store whose teacher did not write the SFT data, and logs the opt-out in the run's "
        f"manifest ({', '.join(opted_out) or 'no such run'}).",
        "- The style-residualized store (`lopd store residualize`, defaults) is accepted by the trainer without the opt-out; "
        "the correction follows public descriptions of Lightning OPD 2.0 (arXiv 2607.28449), whose full text could not be read.",
        f"- The teacher-B runs train with the {', '.join(sorted({v['loss'] for v in variants.values() if v['base'].startswith('offline_teacher_b')}))} "
        f"loss (`comparison_losses`), the online runs with {', '.join(sorted({v['loss'] for v in variants.values() if v['base'] == 'online'}))} "
        "(`online_losses`); the paper's loss runs offline as the pipeline's own train stage.",
        "- The teachers are given models, as in the paper: trained once from `teacher_seed`, whatever the demo's seed"
        + (f" (this run links them from {s['teachers_shared_from']})" if s.get("teachers_shared_from") else "") + ".",
        "- The online runs use the trainer with a live data stream (`megatron_lopd.demo.online`): each step the current "
        "student's weights go to the transformers sampler, and teacher A scores the fresh samples.",
        f"- Sizes: `{json.dumps({k: v for k, v in sizes.items() if k not in ('teacher', 'student')})}`; "
        f"teacher shape `{json.dumps(sizes['teacher'])}`, student shape `{json.dumps(sizes['student'])}`.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in s['versions'].items())}.",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    out = Path(out)
    plot_curves(summary, out / PLOT_NAME)
    (out / REPORT_NAME).write_text(report_markdown(summary))
    atomic_write(out / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")
    return out / REPORT_NAME


def console_summary(summary: dict[str, Any], out: Path) -> str:
    """One screen: accuracy per stage and variant, the findings, the time, where the report is."""
    acc, rows = summary["accuracy"], _rows(summary)
    width = max(len(label) for _, label in rows)
    lines = ["", f"Lightning OPD demo, seed {summary['seed']}: greedy pass@1 on {summary['sizes']['eval_problems']} held-out problems", ""]
    for key, label in rows:
        a = acc[key]
        lines.append(f"  {label:<{width}}  {_pct(a['pass1']):>5}%  (sampled {_pct(a['sampled_pass1']):>5}%, KL to A {_kl(a['kl_to_teacher_a'])})")
    lines += [""] + ["  - " + f.replace("**", "") for f in findings(summary)]
    wall = summary["wall_clock_s"]
    lines += ["", f"  {wall['total']:.0f} s from start to end in {wall.get('jobs', 1)} lanes ({wall.get('stage_sum', wall['total']):.0f} s of stage time; "
              f"{wall['this_invocation']:.0f} s this invocation); report: {Path(out) / REPORT_NAME}", ""]
    return "\n".join(lines)
