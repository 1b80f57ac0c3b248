"""The demo over several seeds: `aggregate.md`, `aggregate.json` and `curves.png` from each seed's summary.

A single run moves by several points between machines (floating-point order differs between
CPUs) and between seeds, so what the demo claims is stated over seeds: per model the mean and
standard deviation (n - 1) of greedy pass@1 over seeds; per comparison the paired difference
(same held-out problems) of each seed, its mean and standard deviation over seeds, and in how
many seeds it was beyond 2 paired standard errors. A sentence calls a difference real only when
every seed puts it beyond 2 SE with the same sign, "no difference" only when no seed does;
otherwise it says how the seeds split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from megatron_lopd.demo.report import (LIGHTNING_BASES, SIGNIFICANT_SE, STAGE_ROWS, TEACHER_FLOOR, TEACHER_NAMES, paired_diff,
                                       run_with_loss, teachers_failed)
from megatron_lopd.runtime.files import atomic_write

AGGREGATE_JSON = "aggregate.json"
AGGREGATE_MD = "aggregate.md"
AGGREGATE_PLOT = "curves.png"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def _comparisons(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, a, b) of the differences a - b the demo reads, for the runs this summary has."""
    variants = summary["variants"]
    out = [(f"{v['label']} vs R", name, "sft_R") for name, v in variants.items()]
    for name, v in variants.items():
        loss, label = v["loss"], v["label"].split("(")[-1].rstrip(")")
        lightning, plain_b = run_with_loss(variants, loss, *LIGHTNING_BASES), run_with_loss(variants, loss, "offline_teacher_b")
        if v["base"] == "online" and lightning:
            out.append((f"Lightning minus online ({label})", lightning, name))
        if v["base"] == "offline_teacher_b" and lightning:
            out.append((f"consistent teacher A minus teacher B ({label})", lightning, name))
        if v["base"] == "offline_teacher_b_residualized" and plain_b:
            out.append((f"B style-residualized minus B plain ({label})", name, plain_b))
    return out


def aggregate(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Numbers over seeds (the module docstring). Every summary must come from the same demo sizes."""
    if not summaries:
        raise ValueError("aggregate needs at least one seed's summary")
    if any(s["sizes"] != summaries[0]["sizes"] for s in summaries):
        raise ValueError("the seeds' demos were run with different sizes")
    seeds = [s["seed"] for s in summaries]
    first = summaries[0]
    models = [k for k, _ in STAGE_ROWS] + list(first["variants"])
    labels = {**dict(STAGE_ROWS), **{n: v["label"] for n, v in first["variants"].items()}}
    accuracy = {}
    for key in models:
        per_seed = [100 * s["accuracy"][key]["pass1"] for s in summaries]
        m, sd = mean_sd(per_seed)
        accuracy[key] = {"label": labels[key], "mean": m, "sd": sd, "per_seed": per_seed}
    differences = []
    for label, a, b in _comparisons(first):
        diffs = [paired_diff(s["paired_correct"][a], s["paired_correct"][b]) for s in summaries]
        m, sd = mean_sd([d.points for d in diffs])
        differences.append({"label": label, "a": a, "b": b, "mean": m, "sd": sd, "per_seed": [d.points for d in diffs],
                            "per_seed_se": [d.se for d in diffs], "above": sum(d.significant and d.points > 0 for d in diffs),
                            "below": sum(d.significant and d.points < 0 for d in diffs)})
    wall = [s["wall_clock_s"]["total"] for s in summaries]
    failed = {s["seed"]: teachers_failed(s) for s in summaries if teachers_failed(s)}
    return {"seeds": seeds, "sizes": first["sizes"], "accuracy": accuracy, "differences": differences, "teachers_failed": failed,
            "wall_clock_s": {"per_seed": wall, "mean": mean_sd(wall)[0]}, "versions": first["versions"]}


def reading(d: dict[str, Any], n: int) -> str:
    """One sentence on a difference over seeds (the module docstring's rule)."""
    spread = f"{d['mean']:+.1f} +- {d['sd']:.1f} points over {n} seeds"
    if d["above"] == n:
        return f"**{d['label']}:** {spread}; above 0 beyond {SIGNIFICANT_SE:g} SE in every seed."
    if d["below"] == n:
        return f"**{d['label']}:** {spread}; below 0 beyond {SIGNIFICANT_SE:g} SE in every seed."
    neither = n - d["above"] - d["below"]
    if neither == n:
        return f"**{d['label']}:** {spread}; within {SIGNIFICANT_SE:g} SE of 0 in every seed."
    return (f"**{d['label']}:** {spread}; not settled: beyond {SIGNIFICANT_SE:g} SE above 0 in {d['above']}, below 0 in "
            f"{d['below']}, within in {neither} of the seeds.")


def aggregate_markdown(agg: dict[str, Any]) -> str:
    seeds, n = agg["seeds"], len(agg["seeds"])
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"# Lightning OPD demo over {n} seeds ({', '.join(map(str, seeds))})",
        "",
        "Each seed's own report is in `seed-N/report.md`. Mean +- standard deviation over seeds (n - 1); paired differences "
        f"are over the same {agg['sizes']['eval_problems']} held-out problems within a seed.",
        "",
        *([f"**Seeds whose teachers did not learn the task** (greedy pass@1 below {100 * TEACHER_FLOOR:.0f} %): "
           + "; ".join(f"seed {s}: {', '.join(TEACHER_NAMES[t] for t in ts)}" for s, ts in agg["teachers_failed"].items())
           + ". Their R and every run from it inherit that; the means and spreads below include them.", ""]
          if agg["teachers_failed"] else []),
        "## Greedy pass@1 (%)",
        "",
        f"| model | mean +- sd | {head} |",
        "|---|---|" + "---|" * n,
        *[f"| {a['label']} | {a['mean']:.1f} +- {a['sd']:.1f} | " + " | ".join(f"{x:.1f}" for x in a["per_seed"]) + " |"
          for a in agg["accuracy"].values()],
        "",
        "## What the seeds show",
        "",
        *[f"- {reading(d, n)}" for d in agg["differences"]],
        "",
        f"| difference (points) | mean +- sd | {head} |",
        "|---|---|" + "---|" * n,
        *[f"| {d['label']} | {d['mean']:+.1f} +- {d['sd']:.1f} | "
          + " | ".join(f"{p:+.1f} (SE {se:.1f})" for p, se in zip(d["per_seed"], d["per_seed_se"])) + " |" for d in agg["differences"]],
        "",
        f"![accuracy and KL to teacher A against step, mean and band of +- 1 sd over seeds]({AGGREGATE_PLOT})",
        "",
        f"Wall-clock per seed, start to end: {', '.join(f'{w:.0f} s' for w in agg['wall_clock_s']['per_seed'])} "
        "(the teachers do not depend on the seed: the first seed trains them, the others link them).",
        "",
    ]
    return "\n".join(lines)


def plot_bands(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    """Each run's curve: the mean over seeds with a band of +- 1 sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, v in summaries[0]["variants"].items():
        steps = [p["step"] for p in v["curve"]]
        for ax, key, scale in ((axes[0], "pass1", 100.0), (axes[1], "kl_to_teacher_a", 1.0)):
            rows = [[float("nan") if p[key] is None else scale * p[key] for p in s["variants"][name]["curve"]] for s in summaries]
            stats = [mean_sd([r[i] for r in rows]) for i in range(len(steps))]
            mean = [m for m, _ in stats]
            style = "--" if v["loss"] == "sft" else "-"
            (line,) = ax.plot(steps, mean, style, marker="o", label=v["label"])
            ax.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(), alpha=0.15)
    for ax, title, ylabel in ((axes[0], "held-out accuracy (greedy pass@1)", "%"),
                              (axes[1], "KL(student || teacher A) per token, on student samples", "nats / token")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (from R)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Lightning OPD demo, mean +- sd over seeds {', '.join(str(s['seed']) for s in summaries)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_aggregate(out: Path, summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out = Path(out)
    agg = aggregate(summaries)
    plot_bands(summaries, out / AGGREGATE_PLOT)
    atomic_write(out / AGGREGATE_MD, aggregate_markdown(agg))
    atomic_write(out / AGGREGATE_JSON, json.dumps(agg, indent=1) + "\n")
    return agg


def console_aggregate(agg: dict[str, Any], out: Path) -> str:
    n = len(agg["seeds"])
    width = max(len(a["label"]) for a in agg["accuracy"].values())
    lines = ["", f"Lightning OPD demo over seeds {', '.join(map(str, agg['seeds']))}: greedy pass@1, mean +- sd", ""]
    lines += [f"  {a['label']:<{width}}  {a['mean']:5.1f} +- {a['sd']:4.1f}%" for a in agg["accuracy"].values()]
    lines += [""] + ["  - " + reading(d, n).replace("**", "") for d in agg["differences"]]
    lines += ["", f"  report: {Path(out) / AGGREGATE_MD}", ""]
    return "\n".join(lines)
