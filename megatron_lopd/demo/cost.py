"""GPU-hours at the paper's sizes: Lightning OPD against standard online OPD, from FLOPs per token.

The paper's 8B run (Qwen3-8B-Base student, Qwen3-32B teacher, H100) reports Lightning OPD at
30 GPU-hours (rollouts 10 h, teacher scoring 4 h, training 16 h) against 120 h for standard
OPD (4.0x). This model re-derives both from token counts:

- FLOPs per token: 2 N for a forward pass (generation, scoring), 6 N for a training step
  (N: parameters; attention's share is left out, as in the usual 6 N estimate);
- tokens: Lightning samples each OPD prompt once (`opd_prompts` rollouts) and trains
  `steps x batch` sequences on them (each rollout 2-3 times); standard OPD samples and scores
  `steps x batch` fresh sequences (the paper: 64 prompts x 4 samples, 150 steps);
- per-phase efficiency (model FLOP/s per GPU as a share of the peak): calibrated on the paper's
  Lightning split, so the Lightning column reproduces it by construction and shows what
  efficiency each phase implies;
- standard OPD's generation runs in batches of `batch` sequences spread over the GPUs, not all
  rollouts at once: its decode throughput is lower by `small_batch_penalty`. The demo measures
  one on CPU (online generation tokens/s against the offline rollout stage's); on GPUs it
  depends on the sequences per GPU (256 / 8 here against thousands), so it is an assumption.

What drives the ratio: the number of sequences generated and scored (online: every training
sequence is a fresh sample), the small-batch decode penalty, and what the model leaves out
(weight synchronisation, a teacher server idle while the student generates, the longest
response of each step holding the others).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

H100_BF16_PEAK_TFLOPS = 989.0  # dense, SXM


@dataclass(frozen=True)
class PaperSetting:
    """The paper's 8B run. Token lengths are not reported: `prompt_tokens` and `response_tokens`
    are assumptions (responses cut at 4,096; reasoning responses run long)."""

    student_params: float = 8.19e9  # Qwen3-8B
    teacher_params: float = 32.8e9  # Qwen3-32B
    opd_prompts: int = 17_398  # DAPO-Math-17k, unique prompts
    steps: int = 150
    batch: int = 256  # sequences per step (online: 64 prompts x 4 samples)
    prompt_tokens: int = 200
    response_tokens: int = 3_000
    lightning_hours: tuple[tuple[str, float], ...] = (("rollouts", 10.0), ("scoring", 4.0), ("training", 16.0))
    online_hours: float = 120.0


def flops(setting: PaperSetting) -> dict[str, dict[str, float]]:
    """FLOPs per phase, Lightning and online."""
    seq = setting.prompt_tokens + setting.response_tokens
    offline_seqs, online_seqs = setting.opd_prompts, setting.steps * setting.batch
    train = 6 * setting.student_params * online_seqs * seq
    return {
        "lightning": {"rollouts": 2 * setting.student_params * offline_seqs * seq, "scoring": 2 * setting.teacher_params * offline_seqs * seq,
                      "training": train},
        "online": {"rollouts": 2 * setting.student_params * online_seqs * seq, "scoring": 2 * setting.teacher_params * online_seqs * seq,
                   "training": train},
    }


def measured_small_batch_penalty(summary: dict[str, Any]) -> float | None:
    """Offline rollout tokens/s over online generation tokens/s, from one demo run (None without an online run)."""
    online = next((v for v in summary.get("variants", {}).values() if "online_stats" in v), None)
    seconds = summary["wall_clock_s"]["stages"].get("rollouts")
    if online is None or not seconds:
        return None
    stats = online["online_stats"]
    offline_tps = summary["store"]["response_tokens"] / seconds
    return offline_tps / (stats["sampled_tokens"] / stats["generate_s"])


def cost_model(setting: PaperSetting = PaperSetting(), small_batch_penalty: float = 1.0) -> dict[str, Any]:
    """GPU-hours per phase for Lightning and online OPD, the implied efficiency of each phase, the ratio."""
    f = flops(setting)
    hours = dict(setting.lightning_hours)
    efficiency = {phase: f["lightning"][phase] / (hours[phase] * 3600 * H100_BF16_PEAK_TFLOPS * 1e12) for phase in hours}
    online = {phase: f["online"][phase] / (efficiency[phase] * H100_BF16_PEAK_TFLOPS * 1e12 * 3600) for phase in hours}
    online["rollouts"] *= small_batch_penalty
    lightning_total, online_total = sum(hours.values()), sum(online.values())
    return {
        "setting": dataclasses.asdict(setting), "small_batch_penalty": small_batch_penalty, "flops": f,
        "efficiency": efficiency, "lightning_hours": hours, "online_hours": online,
        "lightning_total": lightning_total, "online_total": online_total, "ratio": online_total / lightning_total,
        "paper_ratio": setting.online_hours / lightning_total,
    }


def cost_lines(summary: dict[str, Any]) -> list[str]:
    """The report's section: the model with no small-batch penalty and with the one this run measured."""
    penalty = measured_small_batch_penalty(summary)
    base = cost_model()
    runs = [("no small-batch penalty", base)] + ([(f"the penalty measured here ({penalty:.2f}x)", cost_model(small_batch_penalty=penalty))]
                                                 if penalty else [])
    s = base["setting"]
    lines = [
        "## Cost at the paper's sizes (a model)",
        "",
        f"Qwen3-8B student, Qwen3-32B teacher, H100 (bf16 peak {H100_BF16_PEAK_TFLOPS:g} TFLOP/s); {s['opd_prompts']:,} rollouts for "
        f"Lightning, {s['steps']} steps x {s['batch']} sequences for both; {s['prompt_tokens']} prompt + {s['response_tokens']:,} "
        "response tokens per sequence (assumed). FLOPs: 2N per token per forward pass, 6N per training token. Each phase's "
        "efficiency is calibrated on the paper's Lightning split (`megatron_lopd/demo/cost.py` says why and what is left out).",
        "",
        "| phase | Lightning: paper GPU-h | implied efficiency | online: model GPU-h (" + ") | online (".join(n for n, _ in runs) + ") |",
        "|---|---|---|" + "---|" * len(runs),
    ]
    for phase, hours in base["lightning_hours"].items():
        lines.append(f"| {phase} | {hours:g} | {100 * base['efficiency'][phase]:.1f} % | "
                     + " | ".join(f"{m['online_hours'][phase]:.1f}" for _, m in runs) + " |")
    lines.append(f"| **total** | **{base['lightning_total']:g}** | | " + " | ".join(f"**{m['online_total']:.1f}**" for _, m in runs) + " |")
    ratios = "; ".join(f"{m['ratio']:.1f}x with {name}" for name, m in runs)
    lines += ["", f"Online / Lightning: {ratios}; the paper reports {base['paper_ratio']:.1f}x ({s['online_hours']:g} h). "
              f"Online generates and scores {s['steps'] * s['batch'] / s['opd_prompts']:.2f}x the sequences (every training sequence is a fresh "
              "sample). The rest of the paper's gap is what this model guesses or leaves out: the small-batch decode penalty on GPUs "
              "(measured here on CPU only), weight synchronisation, a teacher idle while the student samples, and each step "
              "waiting for its longest response.", ""]
    return lines
