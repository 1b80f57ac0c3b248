"""Prompt files: JSONL / parquet, prompt or messages, the chat template and the thinking switch, formats,
templates and fingerprints, bad files."""

from __future__ import annotations

import json

import pytest

from megatron_lopd.datasets import DataSource, data_format
from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.generation.prompts import load_prompt_set, prompt_file_fingerprint


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
        ("p.jsonl", "", "holds no rows"),
        ("p.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n', r"p.jsonl:2: invalid JSON"),
        ("p.jsonl", '[1, 2]\n', r"p.jsonl:1: a list, not a JSON object"),
        ("p.jsonl", '{"id": 1, "text": "a"}\n', r"p.jsonl:1: no 'prompt' or 'messages' \(its keys: 'id', 'text'\)"),
        ("p.jsonl", '{"id": 1, "messages": [{"role": "user"}]}\n', "'messages' has a turn without a known role"),
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


def test_ids_default_to_the_row_number_and_directories_are_read_in_order(tmp_path, char_tokenizer):
    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "b.jsonl", [{"prompt": "3"}])
    _jsonl(tmp_path / "d" / "a.jsonl", [{"prompt": "1"}, {"id": "x", "prompt": "2"}])
    ps = load_prompt_set(tmp_path / "d", char_tokenizer)
    assert ps.ids == ["0", "x", "2"]
    assert [char_tokenizer.decode(t) for t in ps.token_ids] == [f"<|user|>{n}<|end|><|assistant|>" for n in "123"]
    # a directory's fingerprint covers every file's content
    before = ps.fingerprint
    _jsonl(tmp_path / "d" / "b.jsonl", [{"prompt": "4"}])
    assert load_prompt_set(tmp_path / "d", char_tokenizer).fingerprint != before


def test_formats_templates_and_their_fingerprints(tmp_path, char_tokenizer):
    rows = [{"uid": "a", "q": {"text": "1+1?"}}, {"uid": "b", "q": {"text": "2+2?"}}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    plain = DataSource(path, data_format("prompts", id_key="uid", prompt_key="q.text"))
    templated = DataSource(path, data_format("prompts", id_key="uid", prompt_key="q.text"), prompt_template="Q: {problem} A:")
    assert load_prompt_set(plain, char_tokenizer).ids == ["a", "b"]
    assert [char_tokenizer.decode(t) for t in load_prompt_set(templated, char_tokenizer).token_ids] == [
        "<|user|>Q: 1+1? A:<|end|><|assistant|>", "<|user|>Q: 2+2? A:<|end|><|assistant|>"]
    # the same file read another way is other prompts: another fingerprint; a plain path keeps the file's digest
    prints = {prompt_file_fingerprint(plain), prompt_file_fingerprint(templated), prompt_file_fingerprint(path)}
    assert len(prints) == 3 and load_prompt_set(templated, char_tokenizer).fingerprint == prompt_file_fingerprint(templated)
    # a chat is sent as it is: a template, which applies to plain-text prompts only, is refused rather than ignored
    chat = _jsonl(tmp_path / "c.jsonl", [{"prompt": "plain"}, {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match=r"c\.jsonl:2: a chat prompt, and the prompt template applies to plain-text prompts only"):
        load_prompt_set(DataSource(chat, data_format("prompts"), "T {problem}"), char_tokenizer)
    with pytest.raises(ConfigError, match="no {problem} placeholder"):
        DataSource(path, data_format("prompts"), prompt_template="no placeholder")


def test_lopd_generate_reads_a_published_layout(tmp_path, tiny_hf_dir, capsys):
    """`lopd generate --format openthoughts3`: the artifact's prompts are the human turns (the gpt turn is not sent)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.cli import main
    from megatron_lopd.generation.prompts import load_tokenizer, render_prompt

    rows = [{"difficulty": 3, "source": "s", "domain": "math",
             "conversations": [{"from": "human", "value": f"Add {i} and 1."}, {"from": "gpt", "value": "an answer we do not use"}]}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    out = tmp_path / "sft"
    args = ["generate", "--model", str(tiny_hf_dir), "--prompts", str(tmp_path / "train-00000-of-00001.parquet"), "--format", "openthoughts3",
            "--out", str(out), "--kind", "sft_data", "--backend", "hf", "--dtype", "float32", "--max-tokens", "4", "--no-progress"]
    assert main([*args, "--prompt-template", "Q: {problem}"]) == 2 and "a chat prompt, and the prompt template" in capsys.readouterr().err
    assert main(args) == 0
    art = RolloutArtifact.open(out)
    tok = load_tokenizer(tiny_hf_dir)
    assert [r.prompt_ids.tolist() for r in art] == [render_prompt(tok, [{"role": "user", "content": f"Add {i} and 1."}], None) for i in range(3)]
    assert [r.prompt_id for r in art] == ["0", "1", "2"]
    assert art.manifest.inputs["prompts_fingerprint"] != prompt_file_fingerprint(tmp_path / "train-00000-of-00001.parquet")
