"""Data sets in their published layouts: one reader, named formats, and the leakage check.

    rows.py           JSONL / parquet rows from a file or a directory of them (the one reader)
    columns.py        `ColumnMap`: which field is the id, the prompt (string or chat), the answer
    livecodebench.py  LiveCodeBench code_generation_lite rows -> prompts and code tests
    formats.py        named formats (`--format`): DAPO-Math-17k, OpenThoughts3, AIME, HMMT, LiveCodeBench
    source.py         `DataSource` (a path + its format) and the examples it holds
    check.py          repeated prompts and training/evaluation overlap (`lopd data check`)
"""

from megatron_lopd.datasets.check import LeakageReport, check_leakage, normalize_text
from megatron_lopd.datasets.columns import ColumnMap, Example
from megatron_lopd.datasets.formats import FORMATS, DataFormat, data_format
from megatron_lopd.datasets.livecodebench import DateWindow, LiveCodeBenchRows
from megatron_lopd.datasets.rows import Row, iter_rows
from megatron_lopd.datasets.source import DataSource, iter_examples, named_source, read_examples

__all__ = [
    "FORMATS", "ColumnMap", "DataFormat", "DataSource", "DateWindow", "Example", "LeakageReport", "LiveCodeBenchRows", "Row",
    "check_leakage", "data_format", "iter_examples", "iter_rows", "named_source", "normalize_text", "read_examples",
]
