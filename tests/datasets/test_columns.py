"""Rows -> examples (megatron_lopd/datasets/columns.py): keys, dotted paths, chats, ids, answers, errors."""

from __future__ import annotations

import pytest

from megatron_lopd.datasets.columns import ColumnMap, Example
from megatron_lopd.datasets.rows import Row
from megatron_lopd.errors import ArtifactError


def _row(data, position=0):
    return Row(data, f"f.jsonl:{position + 1}", position, tuple(data))


def test_dotted_keys_and_string_prompts():
    cols = ColumnMap(prompt_key="q.text", answer_key="reward_model.ground_truth", id_key="extra_info.index", messages_key=None)
    ex = cols.example(_row({"q": {"text": "What is 2+2?"}, "reward_model": {"ground_truth": 4}, "extra_info": {"index": "u-1"}}), with_answer=True)
    assert ex == Example(id="u-1", where="f.jsonl:1", text="What is 2+2?", messages=None, answer="4")
    assert cols.example(_row({"q.text": "literal dotted key", "extra_info": {"index": 3}}), with_answer=False).text == "literal dotted key"


def test_chats_role_content_and_sharegpt_with_the_answer_turn_dropped():
    cols = ColumnMap(prompt_key="conversations", messages_key=None)
    ex = cols.example(_row({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                              {"from": "gpt", "value": "<think>..</think>A"}]}, 4), with_answer=False)
    assert ex.messages == ({"role": "system", "content": "S"}, {"role": "user", "content": "Q1"})
    assert ex.text == "Q1" and ex.id == "4"  # no id field: the row's position
    chat = ColumnMap().example(_row({"id": 9, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                          {"role": "user", "content": "c"}]}), with_answer=False)
    assert chat.text == "a\n\nc" and len(chat.messages) == 3 and chat.id == "9"
    # the messages field wins over the prompt field; a null messages field falls back to the prompt
    both = ColumnMap().example(_row({"prompt": "p", "messages": [{"role": "user", "content": "m"}]}), with_answer=False)
    assert both.text == "m"
    assert ColumnMap().example(_row({"prompt": "p", "messages": None}), with_answer=False).text == "p"


@pytest.mark.parametrize(
    "cols, data, with_answer, match",
    [
        (ColumnMap(), {"id": 1, "text": "a"}, False,
         r"f\.jsonl:1: no 'prompt' or 'messages' \(its keys: 'id', 'text'\) \(fix: pass --prompt-key"),
        (ColumnMap(id_key="uid"), {"prompt": "a"}, False, r"f\.jsonl:1: no 'uid' \(its keys: 'prompt'\) \(fix: pass --id-key with one of them"),
        (ColumnMap(answer_key="reward_model.ground_truth"), {"prompt": "a", "reward_model": {}}, True,
         r"no 'reward_model\.ground_truth' \(its keys: 'prompt', 'reward_model'\) \(fix: pass --answer-key"),
        (ColumnMap(), {"prompt": "a", "answer": ""}, True, r"f\.jsonl:1: empty 'answer'"),
        (ColumnMap(), {"prompt": "a", "answer": ["2"]}, True, r"'answer' is a list, not a string or number"),
        (ColumnMap(), {"prompt": "a", "answer": True}, True, r"'answer' is a bool"),
        (ColumnMap(), {"prompt": "  "}, False, r"empty 'prompt'"),
        (ColumnMap(), {"id": 1.5, "prompt": "a"}, False, r"'id' is a float, not a string or an integer"),
        (ColumnMap(), {"messages": [{"role": "user"}]}, False, r"'messages' has a turn without a known role and text content"),
        (ColumnMap(), {"messages": [{"role": "wizard", "content": "x"}]}, False, r"without a known role"),
        (ColumnMap(), {"messages": [{"role": "assistant", "content": "x"}]}, False, r"'messages' has no user turn before its answer"),
        (ColumnMap(), {"messages": "hello"}, False, r"'messages' is not a non-empty chat list"),
    ],
)
def test_bad_rows_name_the_row_the_key_and_the_fix(cols, data, with_answer, match):
    with pytest.raises(ArtifactError, match=match):
        cols.example(_row(data), with_answer=with_answer)
