"""The one reader (megatron_lopd/datasets/rows.py): JSONL, parquet, directories, bad files."""

from __future__ import annotations

import json

import pytest

from megatron_lopd.datasets.rows import iter_rows
from megatron_lopd.errors import ArtifactError

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def test_jsonl_rows_with_where_and_position(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2, "b": {"c": 3}}) + "\n")
    rows = list(iter_rows(path, "data file"))
    assert [r.data for r in rows] == [{"a": 1}, {"a": 2, "b": {"c": 3}}]
    assert [r.where for r in rows] == [f"data file {path}:1", f"data file {path}:3"]  # line numbers count the blank line
    assert [r.position for r in rows] == [0, 1] and rows[1].file_fields == ("a", "b")


def test_parquet_reads_only_the_columns_asked_for_and_keeps_nesting(tmp_path):
    table = pa.table({"id": [7, 8], "prompt": [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]],
                      "meta": [{"k": "a"}, {"k": "b"}], "big": ["long text", "more"]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=1)
    rows = list(iter_rows(tmp_path / "d.parquet", "data file", columns=["id", "prompt", "meta", "absent"]))
    assert [r.data for r in rows] == [{"id": 7, "prompt": [{"role": "user", "content": "x"}], "meta": {"k": "a"}},
                                      {"id": 8, "prompt": [{"role": "user", "content": "y"}], "meta": {"k": "b"}}]
    assert rows[1].where == f"data file {tmp_path / 'd.parquet'} row 1"
    assert rows[0].file_fields == ("id", "prompt", "meta", "big")  # every column, for error messages


def test_a_directory_is_its_data_files_in_name_order(tmp_path):
    (tmp_path / "test2.jsonl").write_text(json.dumps({"n": 2}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"n": 1}) + "\n")
    pq.write_table(pa.table({"n": [3]}), tmp_path / "test3.parquet")
    (tmp_path / "README.md").write_text("# not data")
    (tmp_path / ".hidden.jsonl").write_text("not json\n")
    rows = list(iter_rows(tmp_path, "data file"))
    assert [r.data["n"] for r in rows] == [1, 2, 3] and [r.position for r in rows] == [0, 1, 2]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.jsonl", None, r"data file .*missing\.jsonl does not exist \(fix: check the --data path\)"),
        ("d.txt", "x", r"unknown format '\.txt'"),
        ("d.jsonl", '{"a": 1}\n{"a": \n', r"d\.jsonl:2: invalid JSON"),
        ("d.jsonl", "[1, 2]\n", r"d\.jsonl:1: a list, not a JSON object"),
        ("d.jsonl", b'{"a": "\xff"}\n', r"d\.jsonl:1: not UTF-8 text"),
        ("d.parquet", "not parquet", "unreadable parquet"),
    ],
)
def test_bad_files_are_one_error_naming_the_place(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ArtifactError, match=match):
        list(iter_rows(path, "data file", "--data"))


def test_a_directory_without_data_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="is a directory without .jsonl, .json, .parquet files"):
        list(iter_rows(tmp_path, "data file", "--data"))
