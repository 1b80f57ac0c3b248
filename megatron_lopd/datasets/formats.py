"""Named data formats: how to read each published data set the paper uses, chosen with `--format NAME`.

Each format is a reader of rows (a `ColumnMap`, or the LiveCodeBench reader) plus what the
published files need beyond it. `lopd`'s own layouts are formats too: `prompts` (what `lopd
generate` reads by default) and `problems` (what `lopd eval` reads by default). The `source` of
each format names the published data set and file layout it was written for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_lopd.datasets.columns import ColumnMap
from megatron_lopd.datasets.livecodebench import DateWindow, LiveCodeBenchRows
from megatron_lopd.errors import ConfigError


@dataclass(frozen=True)
class DataFormat:
    """`reader` turns a row into an example; `unique_prompts`: the published file repeats its
    prompts (DAPO-Math-17k holds each of its ~17.9K prompts about 100 times), so a row whose
    prompt and answer equal an earlier row's is dropped (and the count reported)."""

    name: str
    reader: ColumnMap | LiveCodeBenchRows
    source: str
    unique_prompts: bool = False

    def spec(self) -> dict[str, Any]:
        """What decides the examples read from a file (part of a data fingerprint)."""
        return {"format": self.name, "reader": type(self.reader).__name__, **dataclasses.asdict(self.reader),
                "unique_prompts": self.unique_prompts}


def _columns(name: str, source: str, unique_prompts: bool = False, **keys) -> DataFormat:
    return DataFormat(name, ColumnMap(**{"messages_key": None, **keys}), source, unique_prompts)


def _livecodebench(name: str, start: str | None, end: str | None, what: str) -> DataFormat:
    window = DateWindow(start, end)
    return DataFormat(name, LiveCodeBenchRows(window), f"livecodebench/code_generation_lite (test*.jsonl), {what}")


# LiveCodeBench releases as contest-date windows, as the paper's neighbours report them
# (NVIDIA's AceReason-Nemotron: "v5 (2024/08/01 - 2025/02/01)", "v6 (2025/02/01 - 2025/05/01)").
LCB_V5 = ("2024-08-01", "2025-02-01")
LCB_V6 = ("2025-02-01", "2025-05-01")

FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat("prompts", ColumnMap(prompt_key="prompt"), "lopd prompt files: id (optional), prompt (string or chat) or messages (chat)"),
    DataFormat("problems", ColumnMap(prompt_key="problem"), "lopd evaluation files: id (optional), problem (string or chat) or messages, answer"),
    _columns("dapo_math_17k", "BytedTsinghua-SIA/DAPO-Math-17k (parquet): prompt (chat), reward_model.ground_truth, extra_info.index; "
             "every prompt repeated ~100 times", unique_prompts=True,
             prompt_key="prompt", answer_key="reward_model.ground_truth", id_key="extra_info.index"),
    _columns("dapo_math_17k_processed", "open-r1/DAPO-Math-17k-Processed (parquet): prompt (string), solution, extra_info.index",
             prompt_key="prompt", answer_key="solution", id_key="extra_info.index"),
    _columns("dapo_math_17k_slime", "zhuzilin/dapo-math-17k (dapo-math-17k.jsonl; the OPD prompts of the official Lightning OPD code): "
             "prompt (chat), label", prompt_key="prompt", answer_key="label"),
    _columns("openthoughts3", "open-thoughts/OpenThoughts3-1.2M (parquet): conversations [{from, value}]; the human turn is the prompt",
             prompt_key="conversations"),
    _columns("aime24", "HuggingFaceH4/aime_2024 (parquet): id, problem, answer", prompt_key="problem", answer_key="answer", id_key="id"),
    _columns("aime24_maxwell", "Maxwell-Jia/AIME_2024 (aime_2024_problems.parquet): ID, Problem, Answer",
             prompt_key="Problem", answer_key="Answer", id_key="ID"),
    _columns("aime25", "opencompass/AIME2025 (aime2025-I.jsonl, aime2025-II.jsonl): question, answer",
             prompt_key="question", answer_key="answer"),
    _columns("aime25_yentinglin", "yentinglin/aime_2025 (parquet): id, problem, answer", prompt_key="problem", answer_key="answer", id_key="id"),
    _columns("hmmt25", "MathArena/hmmt_feb_2025 (parquet): problem_idx, problem, answer", prompt_key="problem", answer_key="answer",
             id_key="problem_idx"),
    _livecodebench("lcb", None, None, "every contest date"),
    _livecodebench("lcb_v5", *LCB_V5, f"v5: contest dates {LCB_V5[0]} to {LCB_V5[1]}"),
    _livecodebench("lcb_v6", *LCB_V6, f"v6: contest dates {LCB_V6[0]} to {LCB_V6[1]}"),
)}


def data_format(name: str, *, id_key: str | None = None, prompt_key: str | None = None, messages_key: str | None = None,
                answer_key: str | None = None, lcb_window: str | None = None) -> DataFormat:
    """Format `name`, with the given keys (`--id-key` ...) or LiveCodeBench window replacing its own.
    `messages_key` "none" turns the chat field off."""
    if name not in FORMATS:
        raise ConfigError(f"unknown data format {name!r}", f"use one of {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    keys = {k: v for k, v in dict(id_key=id_key, prompt_key=prompt_key, messages_key=messages_key, answer_key=answer_key).items() if v is not None}
    if keys:
        if not isinstance(fmt.reader, ColumnMap):
            flags = ", ".join("--" + k.replace("_", "-") for k in keys)
            raise ConfigError(f"{flags} cannot change format {name!r}: its rows are read field by field by the LiveCodeBench reader",
                              f"drop {flags}")
        if "messages_key" in keys and keys["messages_key"].lower() in ("", "none"):
            keys["messages_key"] = None
        fmt = dataclasses.replace(fmt, reader=dataclasses.replace(fmt.reader, **keys))
    if lcb_window is not None:
        if not isinstance(fmt.reader, LiveCodeBenchRows):
            raise ConfigError(f"--lcb-window applies to the LiveCodeBench formats, not {name!r}", "use --format lcb, lcb_v5 or lcb_v6, or drop --lcb-window")
        fmt = dataclasses.replace(fmt, reader=LiveCodeBenchRows(DateWindow.parse(lcb_window)))
    return fmt
