"""The demo's synthetic reasoning task: multi-digit multiplication with a written chain of thought.

A problem is `a*b` with a 4-digit `a` and a 1-digit `b` in 2..9 (72,000 problems). The
solution works right to left, one digit of `a` per step, carrying as it goes, then
writes the answer after `#`. Two styles, same steps, same answer:

    prompt   6311*8
    style A  1*8+0=08;8*1+0=08;3*8+0=24;8*6+2=50;#50488
    style B  8,1,0:08|8,1,0:08|8,3,0:24|8,6,2:50|#50488

Style A writes each step's two factors in either order (`1*8` or `8*1`, a fair coin per
step in the reference solutions): answer-equivalent paths, so a teacher trained to
convergence still has real entropy at those positions (about ln 2 nats each) instead
of being near-deterministic everywhere, as reasoning models are. Style B is one fixed
path. Teacher A learns style A, teacher B style B: two teachers that both solve the task
but disagree token by token on how a solution is written, which is what the teacher
consistency ablation needs. The answer is checked by the evaluation package's `regex`
grader with `ANSWER_PATTERN` (the last `#digits` of the response).

The problem sets (training, SFT prompts, OPD prompts, held-out evaluation) are disjoint
draws from one fixed generator, so they do not change with the demo's seed: the seed
varies models and sampling, the benchmark stays the same.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

CHARS = "0123456789*+=;,:|#"  # everything a prompt or a solution of either style can contain
ANSWER_PATTERN = r"#(\d+)"
STYLES = ("A", "B")
DIGITS = 4  # digits of the first factor
SPLIT_SEED = 20260401  # the problem sets are fixed, independent of the demo's seed


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def id(self) -> str:
        return f"{self.a}x{self.b}"

    @property
    def prompt(self) -> str:
        return f"{self.a}*{self.b}"

    @property
    def answer(self) -> str:
        return str(self.a * self.b)


def steps(problem: Problem) -> list[tuple[int, int, int, int]]:
    """(digit, multiplier, carry in, two-digit partial result) per step, right to left."""
    out, carry = [], 0
    for digit in map(int, reversed(str(problem.a))):
        value = digit * problem.b + carry
        out.append((digit, problem.b, carry, value))
        carry = value // 10
    return out


def solution(problem: Problem, style: str, swaps: Sequence[bool] | None = None) -> str:
    """The written solution in style "A" or "B" (both end with `#answer`). `swaps[i]`: style A's
    step i writes `multiplier*digit` instead of `digit*multiplier` (default: never)."""
    if style == "A":
        swaps = swaps or [False] * DIGITS
        body = ";".join(f"{m}*{d}+{c}={v:02d}" if swap else f"{d}*{m}+{c}={v:02d}" for (d, m, c, v), swap in zip(steps(problem), swaps))
        return f"{body};#{problem.answer}"
    if style == "B":
        body = "|".join(f"{m},{d},{c}:{v:02d}" for d, m, c, v in steps(problem))
        return f"{body}|#{problem.answer}"
    raise ValueError(f"unknown solution style {style!r} (use one of {STYLES})")


def reference_solution(problem: Problem, style: str) -> str:
    """The solution a teacher is trained on: style A's factor orders are fair coins, fixed per problem."""
    if style != "A":
        return solution(problem, style)
    rng = random.Random(f"{SPLIT_SEED}|{problem.id}")
    return solution(problem, style, [rng.random() < 0.5 for _ in range(DIGITS)])


def extract_answer(text: str) -> str | None:
    """The last `#digits` of a response, as the regex grader reads it."""
    found = re.findall(ANSWER_PATTERN, text)
    return found[-1] if found else None


def max_response_chars() -> int:
    """The longest solution of either style (the longest product has DIGITS + 1 digits)."""
    worst = Problem(10**DIGITS - 1, 9)
    return max(len(solution(worst, s)) for s in STYLES)


def all_problems() -> list[Problem]:
    return [Problem(a, b) for a in range(10 ** (DIGITS - 1), 10**DIGITS) for b in range(2, 10)]


def make_splits(sizes: dict[str, int], seed: int = SPLIT_SEED) -> dict[str, list[Problem]]:
    """Disjoint problem sets of the given sizes (in the given order), from one seeded shuffle."""
    pool = all_problems()
    total = sum(sizes.values())
    if total > len(pool):
        raise ValueError(f"asked for {total} problems, the task has {len(pool)}")
    random.Random(seed).shuffle(pool)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = pool[start : start + size]
        start += size
    return out


# ------------------------------------------------------------------------------------ files


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(path: str | Path, problems: Sequence[Problem]) -> Path:
    """A prompt file for `lopd generate` (one user turn per problem)."""
    return _write_jsonl(Path(path), [{"id": p.id, "prompt": p.prompt} for p in problems])


def write_eval_set(path: str | Path, problems: Sequence[Problem]) -> Path:
    """An evaluation file for `lopd eval` / `evaluation.evaluate` (id, problem, answer)."""
    return _write_jsonl(Path(path), [{"id": p.id, "problem": p.prompt, "answer": p.answer} for p in problems])


def build_tokenizer(out_dir: str | Path | None = None):
    """The demo's character tokenizer: the task's characters plus the chat specials."""
    from megatron_lopd.models.tokenizer import build_char_tokenizer

    return build_char_tokenizer(chars=CHARS, out_dir=out_dir)


def write_solutions(out: str | Path, prompts_path: str | Path, problems: Sequence[Problem], style: str, tokenizer_dir: str | Path, *, chunk_size: int = 4096):
    """Reference solutions in `style` as an SFT-data artifact: what a teacher is trained on.

    Same format, manifest and checks as `lopd generate` output; the generator is this
    program (`demo-task-style-<S>`), not a model, and every response ends with EOS.
    """
    from megatron_lopd.artifacts import ArtifactWriter, RolloutRecord
    from megatron_lopd.generation.prompts import load_prompt_set, load_tokenizer
    from megatron_lopd.provenance import chat_template, tokenizer_fingerprint

    tokenizer = load_tokenizer(tokenizer_dir)
    prompt_set = load_prompt_set(prompts_path, tokenizer)
    if prompt_set.ids != [p.id for p in problems]:
        raise ValueError(f"{prompts_path} does not hold these problems in this order")
    plan = {
        "kind": "sft_data",
        "producer": {
            "generator_fingerprint": f"demo-task-style-{style}",
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir),
            "chat_template": chat_template(tokenizer_dir),
            "backend": "program",
            "dtype": "",
            "model_path": "",
        },
        "inputs": {"prompts_fingerprint": prompt_set.fingerprint, "prompts_path": str(Path(prompts_path).resolve()), "num_prompts": len(problems)},
        "params": {"style": style},
        "layout": {"num_prompts": len(problems), "n": 1, "chunk_size": chunk_size, "has_logprobs": False},
    }
    writer = ArtifactWriter.create(out, plan, overwrite=True)
    for chunk, (start, stop) in enumerate(writer.ranges):
        records = []
        for i in range(start, stop):
            text = reference_solution(problems[i], style)
            ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            records.append(
                RolloutRecord(
                    prompt_id=prompt_set.ids[i],
                    sample_index=0,
                    prompt_ids=np.asarray(prompt_set.token_ids[i], np.int32),
                    response_ids=np.asarray(ids, np.int32),
                    finish_reason="stop",
                    text=text,
                    prompt_index=i,
                )
            )
        writer.write_chunk(chunk, records)
    return writer.finalize()
