"""Prompt files: JSONL / parquet, prompt or messages, the chat template and the thinking switch, bad files."""

from __future__ import annotations

import json

import pytest

from megatron_lopd.errors import ArtifactError
from megatron_lopd.generation.prompts import load_prompt_set


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_renders_with_the_chat_template(tmp_path, char_tokenizer):
    rows = [{"id": "a", "prompt": "1+1?"}, {"id": 7, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}]
    ps = load_prompt_set(_jsonl(tmp_path / "p.jsonl", rows), char_tokenizer)
    assert ps.ids == ["a", "7"]
    # Independent rendering: the template's markers, by hand.
    expected = ["<|user|>1+1?<|end|><|assistant|>", "<|system|>S<|end|><|user|>hi<|end|><|assistant|>"]
    assert [char_tokenizer.decode(t) for t in ps.token_ids] == expected
    off = load_prompt_set(tmp_path / "p.jsonl", char_tokenizer, thinking=False)
    assert char_tokenizer.decode(off.token_ids[0]) == expected[0] + "<think></think>"
    assert load_prompt_set(tmp_path / "p.jsonl", char_tokenizer, thinking=True).token_ids == ps.token_ids
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "p.jsonl").read_bytes())
    assert load_prompt_set(tmp_path / "copy.jsonl", char_tokenizer).fingerprint == ps.fingerprint  # content, not name


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.jsonl", None, "does not exist"),
        ("p.txt", "x", "unknown format '.txt'"),
        ("p.jsonl", "", "holds no prompts"),
        ("p.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n', r"p.jsonl:2: invalid JSON"),
        ("p.jsonl", '[1, 2]\n', r"p.jsonl:1: a list, not an object"),
        ("p.jsonl", '{"id": 1, "text": "a"}\n', r"p.jsonl:1: no non-empty 'prompt'"),
        ("p.jsonl", '{"id": 1, "messages": [{"role": "user"}]}\n', "'messages' must be a list"),
        ("p.jsonl", '{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n', "duplicate id '1'"),
    ],
)
def test_bad_prompt_files(tmp_path, char_tokenizer, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ArtifactError, match=match):
        load_prompt_set(path, char_tokenizer)


def test_parquet_prompts(tmp_path, char_tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["1+1?", "2+2?"]}), tmp_path / "p.parquet")
    pp = load_prompt_set(tmp_path / "p.parquet", char_tokenizer)
    assert pp.ids == ["a", "b"]
    assert [char_tokenizer.decode(t) for t in pp.token_ids] == ["<|user|>1+1?<|end|><|assistant|>", "<|user|>2+2?<|end|><|assistant|>"]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ArtifactError, match="unreadable parquet"):
        load_prompt_set(tmp_path / "bad.parquet", char_tokenizer)
