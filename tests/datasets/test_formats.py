"""The named formats (megatron_lopd/datasets/formats.py, livecodebench.py): small local files in exactly
the published layouts, read into hand-written expected prompts and answers."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from megatron_lopd.datasets import FORMATS, DataSource, data_format, read_examples
from megatron_lopd.errors import ArtifactError, ConfigError

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form Answer: $Answer "
             "(without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


def _read(path, fmt, with_answer=True, **keys):
    return read_examples(DataSource(path, data_format(fmt, **keys)), with_answer=with_answer)


def _summary(examples):
    return [(e.id, e.text, e.answer) for e in examples]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dapo_math_17k_parquet_drops_the_published_repeats(tmp_path, capsys):
    """BytedTsinghua-SIA/DAPO-Math-17k: each prompt stored ~100 times (here 3x and 1x)."""
    def row(problem, answer, index):
        return {"data_source": "math_dapo", "prompt": [{"content": DAPO_HEAD + problem + DAPO_TAIL, "role": "user"}], "ability": "MATH",
                "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": index}}
    rows = [row("Find $x$ if $2x=6$.", "3", "a1"), row("Find $x$ if $2x=6$.", "3", "a2"), row("How many primes are below 10?", "4", "b1"),
            row("Find $x$ if $2x=6$.", "3", "a3")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo-math-17k.parquet")
    examples = _read(tmp_path / "dapo-math-17k.parquet", "dapo_math_17k")
    assert _summary(examples) == [("a1", DAPO_HEAD + "Find $x$ if $2x=6$." + DAPO_TAIL, "3"),
                                  ("b1", DAPO_HEAD + "How many primes are below 10?" + DAPO_TAIL, "4")]
    assert examples[0].messages == ({"role": "user", "content": DAPO_HEAD + "Find $x$ if $2x=6$." + DAPO_TAIL},)
    assert "dropped 2 rows repeating an earlier prompt" in capsys.readouterr().err


def test_dapo_math_17k_processed_and_slime_layouts(tmp_path):
    processed = [{"prompt": DAPO_HEAD + "Compute $1+1$." + DAPO_TAIL, "solution": "2", "data_source": "math_dapo",
                  "source_prompt": [{"content": DAPO_HEAD + "Compute $1+1$." + DAPO_TAIL, "role": "user"}], "ability": "MATH",
                  "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "i-0"}}]
    pq.write_table(pa.Table.from_pylist(processed), tmp_path / "train.parquet")
    ex = _read(tmp_path / "train.parquet", "dapo_math_17k_processed")
    assert _summary(ex) == [("i-0", DAPO_HEAD + "Compute $1+1$." + DAPO_TAIL, "2")] and ex[0].messages is None  # a string prompt
    slime = _jsonl(tmp_path / "dapo-math-17k.jsonl", [{"prompt": [{"content": DAPO_HEAD + "Compute $2+2$." + DAPO_TAIL, "role": "user"}],
                                                       "label": "4"},
                                                      {"prompt": [{"content": DAPO_HEAD + "Compute $3+3$." + DAPO_TAIL, "role": "user"}],
                                                       "label": "6"}])
    assert _summary(_read(slime, "dapo_math_17k_slime")) == [("0", DAPO_HEAD + "Compute $2+2$." + DAPO_TAIL, "4"),
                                                            ("1", DAPO_HEAD + "Compute $3+3$." + DAPO_TAIL, "6")]


def test_openthoughts3_takes_the_human_turn_as_the_prompt(tmp_path):
    rows = [{"difficulty": 6, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
             "conversations": [{"from": "human", "value": "Let $f(x)=x^2$. Find $f(3)$."}, {"from": "gpt", "value": "<think>\n9\n</think>\n\n$9$"}]},
            {"difficulty": 8, "source": "nvidia/OpenCodeReasoning", "domain": "code",
             "conversations": [{"from": "human", "value": "Write a function that reverses a string."}, {"from": "gpt", "value": "def r(s): ..."}]}]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "data" / "train-00001-of-00002.parquet")
    examples = _read(tmp_path / "data", "openthoughts3", with_answer=False)
    assert _summary(examples) == [("0", "Let $f(x)=x^2$. Find $f(3)$.", None), ("1", "Write a function that reverses a string.", None)]
    assert [e.messages for e in examples] == [({"role": "user", "content": "Let $f(x)=x^2$. Find $f(3)$."},),
                                              ({"role": "user", "content": "Write a function that reverses a string."},)]


def test_aime_and_hmmt_layouts(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"id": 60, "problem": "Every morning Aya walks $9$ km.", "solution": "...", "answer": "204",
                                          "url": "https://artofproblemsolving.com/x", "year": "2024"}]), tmp_path / "h4.parquet")
    assert _summary(_read(tmp_path / "h4.parquet", "aime24")) == [("60", "Every morning Aya walks $9$ km.", "204")]
    pq.write_table(pa.Table.from_pylist([{"ID": "2024-I-1", "Problem": "Every morning Aya walks $9$ km.", "Solution": "...", "Answer": 204}]),
                   tmp_path / "aime_2024_problems.parquet")
    assert _summary(_read(tmp_path / "aime_2024_problems.parquet", "aime24_maxwell")) == [("2024-I-1", "Every morning Aya walks $9$ km.", "204")]
    (tmp_path / "AIME2025").mkdir()
    _jsonl(tmp_path / "AIME2025" / "aime2025-I.jsonl", [{"question": "Find the sum of all bases $b>9$.", "answer": "70"}])
    _jsonl(tmp_path / "AIME2025" / "aime2025-II.jsonl", [{"question": "Six points lie on a line.", "answer": "468"}])
    assert _summary(_read(tmp_path / "AIME2025", "aime25")) == [("0", "Find the sum of all bases $b>9$.", "70"), ("1", "Six points lie on a line.", "468")]
    pq.write_table(pa.Table.from_pylist([{"id": "I-1", "problem": "Find the sum of all bases $b>9$.", "answer": "70", "solution": "",
                                          "url": "", "year": 2025}]), tmp_path / "yentinglin.parquet")
    assert _summary(_read(tmp_path / "yentinglin.parquet", "aime25_yentinglin")) == [("I-1", "Find the sum of all bases $b>9$.", "70")]
    pq.write_table(pa.Table.from_pylist([{"problem_idx": 1, "problem": "Compute the sum of the positive divisors of $9!$.", "answer": "103",
                                          "problem_type": ["Number Theory"]}]), tmp_path / "hmmt.parquet")
    assert _summary(_read(tmp_path / "hmmt.parquet", "hmmt25")) == [("1", "Compute the sum of the positive divisors of $9!$.", "103")]


def _private(tests):
    """code_generation_lite's encoding: base64 of zlib-compressed pickle of the JSON text."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def lcb_rows():
    """Three problems in code_generation_lite's layout: functional (LeetCode), stdin (AtCoder), and one
    outside the v5 window; the second stores its private tests as plain JSON (the older files)."""
    return [
        {"question_title": "Sum Pair", "question_content": "Return a + b.", "platform": "leetcode", "question_id": "3500",
         "contest_id": "weekly-contest-410", "contest_date": "2024-08-10T00:00:00", "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
         "difficulty": "easy", "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
         "private_test_cases": _private([{"input": "5\n6", "output": "11", "testtype": "functional"}]),
         "metadata": json.dumps({"func_name": "add"})},
        {"question_title": "Echo", "question_content": "Print N twice.", "platform": "atcoder", "question_id": "abc390_a",
         "contest_id": "abc390", "contest_date": "2025-02-01T00:00:00", "starter_code": "", "difficulty": "easy",
         "public_test_cases": json.dumps([{"input": "3\n", "output": "3 3\n", "testtype": "stdin"}]),
         "private_test_cases": json.dumps([{"input": "7\n", "output": "7 7\n", "testtype": "stdin"}]), "metadata": json.dumps({})},
        {"question_title": "Old", "question_content": "An older problem.", "platform": "codeforces", "question_id": "1900A",
         "contest_id": "1900", "contest_date": "2023-11-20T00:00:00", "starter_code": "", "difficulty": "medium",
         "public_test_cases": json.dumps([{"input": "1\n", "output": "1\n", "testtype": "stdin"}]),
         "private_test_cases": _private([]), "metadata": json.dumps({})},
    ]


def test_livecodebench_windows_prompts_and_tests(tmp_path):
    from megatron_lopd.datasets.livecodebench import STARTER_CODE_INSTRUCTION, STDIN_INSTRUCTION

    rows = lcb_rows()
    (tmp_path / "lcb").mkdir()
    _jsonl(tmp_path / "lcb" / "test5.jsonl", rows[:2])
    _jsonl(tmp_path / "lcb" / "test.jsonl", rows[2:])
    v5 = _read(tmp_path / "lcb", "lcb_v5")
    assert [e.id for e in v5] == ["3500", "abc390_a"]  # 2023's problem is outside the window; 2025-02-01 is its last day
    assert [json.loads(e.answer) for e in v5] == [
        {"tests": [{"input": "1\n2", "output": "3"}, {"input": "5\n6", "output": "11"}], "fn_name": "add"},
        {"tests": [{"input": "3\n", "output": "3 3\n"}, {"input": "7\n", "output": "7 7\n"}], "fn_name": None},
    ]
    assert [e.text for e in v5] == ["Return a + b.", "Print N twice."]
    assert v5[0].messages[0]["content"] == ("Return a + b.\n\n" + STARTER_CODE_INSTRUCTION + "\n\n```python\nclass Solution:\n"
                                            "    def add(self, a: int, b: int) -> int:\n        \n```")
    assert v5[1].messages[0]["content"] == "Print N twice.\n\n" + STDIN_INSTRUCTION
    assert [e.id for e in _read(tmp_path / "lcb", "lcb_v6")] == ["abc390_a"]  # the shared boundary day is in both, as in LCB's loader
    assert [e.id for e in _read(tmp_path / "lcb", "lcb")] == ["1900A", "3500", "abc390_a"]  # test.jsonl first: name order
    assert [e.id for e in _read(tmp_path / "lcb", "lcb", lcb_window="2023-01-01:2024-01-01")] == ["1900A"]
    with pytest.raises(ArtifactError, match="holds no rows in the contest-date window 2026-01-01:"):
        _read(tmp_path / "lcb", "lcb", lcb_window="2026-01-01:")


def test_livecodebench_damaged_rows(tmp_path):
    row = lcb_rows()[0]
    _jsonl(tmp_path / "bad.jsonl", [{**row, "private_test_cases": "not-base64!"}])
    with pytest.raises(ArtifactError, match=r"bad\.jsonl:1: 'private_test_cases' is neither JSON nor base64\(zlib\(pickle\(JSON\)\)\)"):
        _read(tmp_path / "bad.jsonl", "lcb")

    class Evil:  # a pickle that would run code when loaded: refused, nothing runs
        def __reduce__(self):
            return (print, ("ran",))
    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    _jsonl(tmp_path / "evil.jsonl", [{**row, "private_test_cases": evil}])
    with pytest.raises(ArtifactError, match="UnpicklingError: refusing to load builtins.print"):
        _read(tmp_path / "evil.jsonl", "lcb")
    _jsonl(tmp_path / "nodate.jsonl", [{k: v for k, v in row.items() if k != "contest_date"}])
    with pytest.raises(ArtifactError, match=r"nodate\.jsonl:1: no 'contest_date' \(its keys: 'question_title'"):
        _read(tmp_path / "nodate.jsonl", "lcb")
    # prompts alone (generation, the leakage check) never decode the tests
    assert [e.id for e in _read(tmp_path / "bad.jsonl", "lcb", with_answer=False)] == ["3500"]


def test_format_overrides_and_their_errors(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"uid": "a", "question": {"body": "Q?"}, "gold": "1"}])
    ex = _read(path, "problems", id_key="uid", prompt_key="question.body", answer_key="gold")
    assert _summary(ex) == [("a", "Q?", "1")]
    assert data_format("prompts", messages_key="none").reader.messages_key is None
    with pytest.raises(ConfigError, match="unknown data format 'aime2024'"):
        data_format("aime2024")
    with pytest.raises(ConfigError, match="--prompt-key cannot change format 'lcb_v5'"):
        data_format("lcb_v5", prompt_key="x")
    with pytest.raises(ConfigError, match="--lcb-window applies to the LiveCodeBench formats"):
        data_format("aime24", lcb_window="2024-01-01:2024-02-01")
    with pytest.raises(ConfigError, match="ends before it starts"):
        data_format("lcb", lcb_window="2025-01-01:2024-01-01")
    with pytest.raises(ConfigError, match="not a date"):
        data_format("lcb", lcb_window="soon:")
    assert set(FORMATS) >= {"dapo_math_17k", "dapo_math_17k_processed", "dapo_math_17k_slime", "openthoughts3", "aime24", "aime25",
                            "hmmt25", "lcb_v5", "lcb_v6"}


def test_duplicate_ids_and_empty_files(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"id": "x", "problem": "a", "answer": "1"}, {"id": "x", "problem": "b", "answer": "2"}])
    with pytest.raises(ArtifactError, match=r"d\.jsonl:2: duplicate id 'x' \(first at .*d\.jsonl:1\)"):
        _read(path, "problems")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ArtifactError, match=r"e\.jsonl holds no rows"):
        _read(tmp_path / "e.jsonl", "problems")
