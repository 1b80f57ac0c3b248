"""The demo's synthetic task: both styles solve the same problems, the grader reads the answer, splits are fixed."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from megatron_lopd.demo import task


def _problems(n=300, seed=0):
    rng = random.Random(seed)
    return [task.Problem(rng.randint(1000, 9999), rng.randint(2, 9)) for _ in range(n)] + [task.Problem(9999, 9), task.Problem(1000, 2)]


# Independent readers of the two written styles: (digit, multiplier, carry, two-digit value) per step.
_STEP = {"A": re.compile(r"(\d)\*(\d)\+(\d)=(\d\d)"), "B": re.compile(r"(\d),(\d),(\d):(\d\d)")}


def _read_steps(text: str, style: str, multiplier: int):
    """Style A writes the two factors in either order: the multiplier is the prompt's one-digit factor."""
    steps = [tuple(map(int, m)) for m in _STEP[style].findall(text)]
    if style == "B":
        return [(d, m, c, v) for m, d, c, v in steps]
    return [((x if y == multiplier else y), multiplier, c, v) for x, y, c, v in steps]


@pytest.mark.parametrize("style,reference", [("A", False), ("A", True), ("B", False), ("B", True)])
def test_written_steps_compute_the_product(style, reference):
    """Re-derive the answer from the written steps alone (long multiplication by hand)."""
    for p in _problems():
        text = task.reference_solution(p, style) if reference else task.solution(p, style)
        steps = _read_steps(text, style, p.b)
        assert [d for d, _, _, _ in steps] == [int(ch) for ch in reversed(str(p.a))]
        carry, digits = 0, []
        for d, m, c, v in steps:
            assert m == p.b and c == carry and v == d * m + c
            digits.append(v % 10)
            carry = v // 10
        product = int(str(carry) + "".join(map(str, reversed(digits))))
        assert product == p.a * p.b
        assert text.endswith(f"#{product}")
        assert task.extract_answer(text) == str(p.a * p.b)


def test_styles_agree_on_answers_and_differ_in_every_step():
    for p in _problems():
        a, b = task.solution(p, "A"), task.solution(p, "B")
        assert task.extract_answer(a) == task.extract_answer(b) == p.answer
        assert _read_steps(a, "A", p.b) == _read_steps(b, "B", p.b) == _read_steps(task.reference_solution(p, "A"), "A", p.b)
        assert a.split("#")[0] != b.split("#")[0]
    assert max(len(task.solution(p, s)) for p in _problems() for s in task.STYLES) == task.max_response_chars()
    with pytest.raises(ValueError, match="unknown solution style"):
        task.solution(task.Problem(1234, 5), "C")


def test_reference_paths_are_fixed_fair_coins():
    """Style A's reference solutions write each step's factors in a random order (the teacher's
    entropy), fixed per problem; style B's are the one canonical path."""
    probs = _problems(2000)
    refs = [task.reference_solution(p, "A") for p in probs]
    assert refs == [task.reference_solution(p, "A") for p in probs]
    # Steps whose digit equals the multiplier read the same either way: leave them out.
    orders = [m.group(1) == str(p.b) for p, ref in zip(probs, refs) for m in re.finditer(r"(\d)\*(\d)", ref) if m.group(1) != m.group(2)]
    assert 0.46 < sum(orders) / len(orders) < 0.54
    assert sum(ref != task.solution(p, "A") for p, ref in zip(probs, refs)) > 0.85 * len(probs)
    assert all(task.reference_solution(p, "B") == task.solution(p, "B") for p in probs[:50])


def test_regex_grader_reads_the_last_answer():
    from megatron_lopd.evaluation.graders import grade_response, make_grader

    grader = make_grader("regex", answer_pattern=task.ANSWER_PATTERN)
    p = task.Problem(6311, 8)
    ref = grader.prepare(p.answer)
    assert grade_response(grader, ref, task.solution(p, "A")).correct
    assert grade_response(grader, ref, task.solution(p, "B")).correct
    wrong = task.solution(p, "A")[:-1] + "9"
    assert grade_response(grader, ref, wrong).extracted == "50489" and not grade_response(grader, ref, wrong).correct
    assert grade_response(grader, ref, "#50488;#1").extracted == "1"  # the last answer counts
    assert grade_response(grader, ref, "1*8+0=08;1*8+0=08").extracted is None  # truncated before the answer


def test_splits_are_fixed_disjoint_and_sized():
    sizes = {"eval": 50, "teacher": 400, "sft": 100, "opd": 200}
    a, b = task.make_splits(sizes), task.make_splits(sizes)
    assert a == b
    assert {k: len(v) for k, v in a.items()} == sizes
    ids = [p.id for v in a.values() for p in v]
    assert len(ids) == len(set(ids))
    assert task.make_splits(sizes, seed=1)["eval"] != a["eval"]
    assert all(1000 <= p.a <= 9999 and 2 <= p.b <= 9 for p in a["opd"])
    with pytest.raises(ValueError, match="72000"):
        task.make_splits({"x": 72001})


def test_tokenizer_covers_the_task(tmp_path):
    tok = task.build_tokenizer(tmp_path / "tok")
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    for p in _problems(50):
        for text in (p.prompt, *(task.solution(p, s) for s in task.STYLES)):
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) == len(text) and unk not in ids
            assert tok.decode(ids) == text
    assert len(tok) <= 32  # the demo's vocabulary size


def test_files_and_reference_solutions(tmp_path):
    """Prompt / eval files load through the real readers; the solutions artifact holds text + EOS."""
    import json

    from megatron_lopd.evaluation import load_problems
    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.generation.prompts import load_prompt_set, load_tokenizer

    tok = task.build_tokenizer(tmp_path / "tok")
    probs = task.make_splits({"x": 40})["x"]
    prompts = task.write_prompts(tmp_path / "p.jsonl", probs)
    evals = load_problems(task.write_eval_set(tmp_path / "e.jsonl", probs))
    assert [(e.id, e.problem, e.answer) for e in evals] == [(p.id, p.prompt, p.answer) for p in probs]
    art = task.write_solutions(tmp_path / "sol", prompts, probs, "B", tmp_path / "tok", chunk_size=16)
    reopened = RolloutArtifact.open(tmp_path / "sol")
    assert len(reopened) == 40 and reopened.kind == "sft_data" and reopened.fingerprint == art.fingerprint
    assert reopened.generator_fingerprint == "demo-task-style-B"
    prompt_set = load_prompt_set(prompts, load_tokenizer(tmp_path / "tok"))
    for i, rec in enumerate(reopened):
        assert rec.text == task.reference_solution(probs[i], "B")
        assert list(rec.response_ids) == tok.encode(rec.text, add_special_tokens=False) + [tok.eos_token_id]
        assert list(rec.prompt_ids) == prompt_set.token_ids[i]
        assert tok.decode(rec.prompt_ids) == f"<|user|>{probs[i].prompt}<|end|><|assistant|>"
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0]) == {"id": probs[0].id, "prompt": probs[0].prompt}
    with pytest.raises(ValueError, match="do not match|does not hold"):
        task.write_solutions(tmp_path / "sol2", prompts, probs[::-1], "A", tmp_path / "tok")
    assert np.all(np.diff([r.prompt_index for r in reopened]) == 1)
