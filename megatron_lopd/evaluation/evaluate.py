"""Evaluation: sample K responses per problem, grade them, report avg@K and pass@k.

Input: a data file read by a data format (`megatron_lopd.datasets`): by default `problems`,
JSONL or parquet with `id`, `problem` (or chat `messages`), `answer`; the published benchmark
layouts (AIME, HMMT, LiveCodeBench) are formats too (`lopd eval --format`).
Output directory:
- `samples.jsonl`: one line per sample (problem id and index, sample index, response
  text, extracted answer, correct, truncated, length in tokens, and the grader's `detail`
  where it gives one, e.g. the code grader's `wrong_answer`), in data order; a reference
  answer longer than `RECORDED_ANSWER_CHARS` (code tests) is recorded by its start and digest;
- `summary.json`: avg@K, pass@k (unbiased), mean response length, truncation rate,
  model and data fingerprints, the configuration;
- `manifest.json`: the provenance record every artifact carries.

With `shard=Shard(i, n)` a process evaluates problems i, i+n, i+2n, ... and writes
`DIR/shard-0000i-of-0000n/`; when the last shard is done, the shards are merged into
`DIR/` (or explicitly with `merge_shards(DIR)`). Sampling seeds depend on the global
problem index and the sample index only, so the merged result equals an unsharded run's.

Long runs write as they go: the output directory is checked writable and locked (one
writer; `.lopd.lock`) before the model is loaded, and every generate call's samples
(`batch_samples` of them) are committed to `progress/batch-NNNNNN.jsonl`, each file
written atomically and fsynced, beside `progress/settings.json` (model and data
fingerprints, every setting that changes results). A rerun with the same settings
resumes: finished problems are not sampled again and the final files equal an
uninterrupted run's (timing aside); `progress/` is removed once summary.json is written,
and a rerun of a finished evaluation returns it without loading the model. A rerun with
other settings is refused naming what differs; `overwrite=True` (`--overwrite`)
discards the earlier results instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from megatron_lopd.datasets.source import DataSource, read_examples
from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError
from megatron_lopd.evaluation.graders import GRADERS, Grader, grade_batch, make_grader, prepare_answers, strip_thinking
from megatron_lopd.evaluation.metrics import mean_pass_at_k, report_ks
from megatron_lopd.runtime.files import LOCK_NAME, OutputLock, atomic_write, check_writable_dir, os_error_fix, os_error_reason
from megatron_lopd.runtime.shards import Shard

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "manifest.json"
PROGRESS_DIR = "progress"  # committed batches of an unfinished run
SETTINGS_FILE = "settings.json"
NATIVE_FORMAT = "problems"
PROBLEM_PLACEHOLDER = "{problem}"
RECORDED_ANSWER_CHARS = 1000  # longer reference answers (a code problem's tests) are recorded by start + digest
# The instruction Qwen3 and most reasoning-model evaluations append to math problems.
MATH_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."


# Config fields that do not change results: runs differing only in these are equivalent.
# (max_model_len: a problem that does not fit is refused, never truncated.)
_RUNTIME_ONLY = ("batch_samples", "backend", "tensor_parallel", "max_model_len", "gpu_memory_utilization", "code_workers",
                 "sandbox_allow_unisolated")
# What a resumed run may change: not the backend, whose samplers differ at temperature > 0.
_RESUME_FREE = ("batch_samples", "tensor_parallel", "max_model_len", "gpu_memory_utilization", "code_workers", "sandbox_allow_unisolated")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. The paper's protocol is avg@64 at up to 32K response tokens
    (samples_per_problem=64, max_tokens=32768); greedy decoding is temperature=0."""

    samples_per_problem: int = 1
    max_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    grader: str = "math"  # math | exact | regex
    answer_pattern: str | None = None  # regex grader: the answer is the last match of group 1
    ignore_case: bool = False  # exact / regex graders
    enable_thinking: bool | None = None  # the chat template's thinking switch; None: template default
    prompt_template: str = PROBLEM_PLACEHOLDER  # for `problem` lines; `messages` lines are used as they are
    system_prompt: str | None = None
    backend: str = "vllm"  # vllm | hf
    dtype: str = "float32"
    tensor_parallel: int = 1
    max_model_len: int | None = None  # None: the longest prompt + max_tokens, up to the model's context
    gpu_memory_utilization: float | None = None  # vLLM's fraction of GPU memory (None: its 0.9)
    batch_samples: int = 4096  # samples per generate call: bigger is faster, smaller updates progress more often
    code_workers: int | None = None  # code grader: programs run side by side (None: `grading_workers`' default)
    # Code grader where this machine has no user namespaces: run programs without isolation (network, your files).
    sandbox_allow_unisolated: bool = False

    def validate(self) -> None:
        checks = (
            (self.samples_per_problem >= 1, f"samples per problem K={self.samples_per_problem} is below 1", "use --samples-per-problem >= 1"),
            (self.max_tokens >= 1, f"max_tokens={self.max_tokens} is below 1", "use --max-tokens >= 1"),
            (self.temperature >= 0, f"temperature={self.temperature} is negative", "use --temperature >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} is outside (0, 1]", "use 0 < --top-p <= 1"),
            (self.batch_samples >= 1, f"batch_samples={self.batch_samples} is below 1", "use --batch-samples >= 1"),
            (self.code_workers is None or self.code_workers >= 1, f"code_workers={self.code_workers} is below 1", "use --code-workers >= 1"),
            (
                PROBLEM_PLACEHOLDER in self.prompt_template,
                f"prompt template {self.prompt_template!r} has no {PROBLEM_PLACEHOLDER} placeholder",
                f"put {PROBLEM_PLACEHOLDER} where the problem text goes",
            ),
            (self.grader in GRADERS, f"unknown grader {self.grader!r}", f"use one of {', '.join(GRADERS)}"),
        )
        for ok, what, fix in checks:
            if not ok:
                raise ConfigError(what, fix)
        self.make_grader()  # the regex grader checks its pattern

    def make_grader(self) -> Grader:
        from megatron_lopd.evaluation.sandbox import SandboxConfig

        return make_grader(self.grader, answer_pattern=self.answer_pattern, ignore_case=self.ignore_case,
                           sandbox=SandboxConfig(allow_unisolated=self.sandbox_allow_unisolated))

    def sampling_params(self):
        from megatron_lopd.generation.base import SamplingParams

        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, n=self.samples_per_problem, seed=self.seed
        )


@dataclass(frozen=True)
class Problem:
    id: str
    answer: str
    problem: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def chat(self, config: EvalConfig) -> list[dict[str, str]]:
        if self.messages is not None:
            messages = [dict(m) for m in self.messages]
        else:
            messages = [{"role": "user", "content": config.prompt_template.replace(PROBLEM_PLACEHOLDER, self.problem)}]
        if config.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        return messages


# ---------------------------------------------------------------------------------------
# Data


def load_problems(data: DataSource | str | Path) -> list[Problem]:
    """Read an evaluation set (a path: the `problems` format). Rows without an id get their row number."""
    source = DataSource.of(data, NATIVE_FORMAT)
    if source.prompt_template is not None:
        raise ConfigError("an evaluation data source carries no prompt template", "set EvalConfig.prompt_template (--prompt-template) instead")
    examples = read_examples(source, with_answer=True, what="evaluation data", flag="--data")
    problems = [Problem(id=ex.id, answer=ex.answer, problem=None if ex.messages else ex.text, messages=ex.messages) for ex in examples]
    check_problems(problems, str(source.path))
    return problems


def check_problems(problems: Sequence[Problem], source: str = "problems") -> None:
    if not problems:
        raise ArtifactError(f"{source}: no problems", "give at least one problem to evaluate")
    seen: set[str] = set()
    for p in problems:
        if p.id in seen:
            raise ArtifactError(f"{source}: duplicate problem id {p.id!r}", "give every problem a unique id")
        seen.add(p.id)


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    """Content fingerprint of an evaluation set (ids, prompts, answers), independent of file layout."""
    h = hashlib.sha256(b"eval-data-v1")
    for p in problems:
        h.update(json.dumps(asdict(p), sort_keys=True, ensure_ascii=False).encode())
    return "data-" + h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------
# Prompts and decoding


def load_tokenizer(model_dir: str | Path):
    from megatron_lopd.generation.prompts import load_tokenizer as _load

    tokenizer = _load(model_dir)
    if not tokenizer.chat_template:
        raise ArtifactError(f"{model_dir}: the tokenizer has no chat template", "save a tokenizer with a chat template (tokenizer.chat_template)")
    return tokenizer


def prompt_ids(tokenizer, problem: Problem, config: EvalConfig) -> list[int]:
    """The chat template with the thinking switch, as token ids (the same rendering as generation's)."""
    from megatron_lopd.generation.prompts import render_prompt

    return render_prompt(tokenizer, problem.chat(config), config.enable_thinking)


class ResponseDecoder:
    """Token ids -> (full text for the record, final-answer text for grading).

    Reasoning is split off on token ids: tokenizers that mark `<think>`/`</think>` as
    special tokens would drop them when decoding with skip_special_tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.think_open, self.think_close = vocab.get("<think>"), vocab.get("</think>")

    def __call__(self, ids: list[int]) -> tuple[str, str]:
        full = self.tokenizer.decode(ids, skip_special_tokens=False)
        answer_ids = ids
        if self.think_close is not None and self.think_close in ids:
            answer_ids = ids[len(ids) - ids[::-1].index(self.think_close) :]
        elif self.think_open is not None and self.think_open in ids:
            answer_ids = []  # reasoning never finished: no answer
        return full, strip_thinking(self.tokenizer.decode(answer_ids, skip_special_tokens=True))


# ---------------------------------------------------------------------------------------
# Summary


@dataclass
class EvalSummary:
    """Results of one evaluation. `avg_at_k` is the mean correctness over all samples
    (avg@K, = pass@1); `pass_at_k[k]` is the unbiased pass@k averaged over problems."""

    num_problems: int
    samples_per_problem: int
    avg_at_k: float
    avg_at_k_stderr: float  # standard error over problems
    pass_at_k: dict[int, float]
    mean_response_tokens: float
    truncation_rate: float
    no_answer_rate: float
    model_fingerprint: str
    data_fingerprint: str
    model_dir: str = ""
    backend: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, int] | None = None  # set for a shard's own summary
    total_problems: int = 0  # problems in the whole data set (> num_problems for a shard)
    timing: dict[str, float] = field(default_factory=dict)  # elapsed_s, problems_per_s, tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        d[f"avg@{self.samples_per_problem}"] = self.avg_at_k  # the paper's name, for grep
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalSummary":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["pass_at_k"] = {int(k): v for k, v in d["pass_at_k"].items()}
        return cls(**d)

    def results(self) -> dict[str, Any]:
        """Everything but timing and where it ran: what must agree between equivalent runs."""
        d = self.to_dict()
        for key in ("timing", "shard", "backend", "model_dir"):
            d.pop(key)
        d["config"] = {k: v for k, v in d["config"].items() if k not in _RUNTIME_ONLY}
        return d

    def console_line(self, name: str = "eval") -> str:
        k = self.samples_per_problem
        passes = " ".join(f"pass@{kk} {v:.4f}" for kk, v in self.pass_at_k.items() if kk > 1)
        rate = self.timing.get("problems_per_s")
        return (
            f"{name}: avg@{k} {self.avg_at_k:.4f} +- {self.avg_at_k_stderr:.4f}"
            + (f" | {passes}" if passes else "")
            + f" | {self.num_problems} problems x {k} samples | mean length {self.mean_response_tokens:.0f} tokens"
            + f" | truncated {100 * self.truncation_rate:.1f}% | no answer {100 * self.no_answer_rate:.1f}%"
            + (f" | {rate:.2f} problems/s" if rate else "")
        )


def _by_problem(records: Iterable[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_problem: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_problem.setdefault(r["problem_index"], []).append(r)
    return by_problem


def summarize(records: Sequence[dict[str, Any]], *, samples_per_problem: int, **meta) -> EvalSummary:
    """Summary statistics from per-sample records (the same function for runs, shards and merges)."""
    by_problem = _by_problem(records)
    k = samples_per_problem
    for index, rs in by_problem.items():
        if sorted(r["sample"] for r in rs) != list(range(k)):
            raise ArtifactError(f"problem {index}: samples {sorted(r['sample'] for r in rs)}, expected 0..{k - 1}", "re-run the evaluation")
    if not by_problem:
        raise ArtifactError("no samples to summarize", "evaluate at least one problem")
    counts = [sum(r["correct"] for r in rs) for rs in by_problem.values()]
    per_problem = [c / k for c in counts]
    n = len(counts)
    mean = sum(per_problem) / n
    stderr = math.sqrt(sum((a - mean) ** 2 for a in per_problem) / (n - 1) / n) if n > 1 else 0.0
    total = len(records)
    return EvalSummary(
        num_problems=n,
        samples_per_problem=k,
        avg_at_k=mean,
        avg_at_k_stderr=stderr,
        pass_at_k={kk: mean_pass_at_k(counts, k, kk) for kk in report_ks(k)},
        mean_response_tokens=sum(r["length"] for r in records) / total,
        truncation_rate=sum(r["truncated"] for r in records) / total,
        no_answer_rate=sum(r["extracted"] is None for r in records) / total,
        **meta,
    )


# ---------------------------------------------------------------------------------------
# Files


def _output_error(exc: OSError, kept: str | None = None) -> ArtifactError:
    """An OSError while writing results as one line naming the path and the fix."""
    where = exc.filename if exc.filename is not None else "the output directory"
    fix = os_error_fix(exc)
    if kept:
        fix += f"; {kept}"
    return ArtifactError(f"{where}: {os_error_reason(exc)}", fix)


def write_results(out_dir: str | Path, records: Iterable[dict[str, Any]], summary: EvalSummary) -> Path:
    """samples.jsonl, then summary.json (written last: its presence marks a finished run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    atomic_write(out_dir / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), fsync=True)
    atomic_write(out_dir / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n", fsync=True)
    return out_dir


def read_results(out_dir: str | Path) -> tuple[list[dict[str, Any]], EvalSummary]:
    out_dir = Path(out_dir)
    try:
        summary = EvalSummary.from_dict(json.loads((out_dir / SUMMARY_FILE).read_text()))
        with open(out_dir / SAMPLES_FILE, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{out_dir}: unreadable evaluation results ({exc})", "re-run that evaluation (shard)") from None
    return records, summary


def _write_manifest(out_dir: Path, summary: EvalSummary) -> None:
    from megatron_lopd.provenance import Manifest, tokenizer_fingerprint

    producer = {"fingerprint": summary.model_fingerprint, "path": summary.model_dir}
    try:
        producer["tokenizer"] = tokenizer_fingerprint(summary.model_dir)
    except (ArtifactError, OSError):
        pass  # the model directory moved since the shards ran
    Manifest(
        kind="eval",
        fingerprint=hashlib.sha256(json.dumps(summary.results(), sort_keys=True).encode()).hexdigest()[:32],
        producer=producer,
        inputs={"data": summary.data_fingerprint},
        params=summary.config,
        extra={"avg_at_k": summary.avg_at_k, "samples_per_problem": summary.samples_per_problem},
    ).write(out_dir)


# ---------------------------------------------------------------------------------------
# Progress: committed batches, resume, settings


def _settings(model_fingerprint: str, data_fingerprint: str, total_problems: int, config: dict[str, Any]) -> dict[str, Any]:
    """What must agree for a rerun to resume (or reuse) an output: everything that changes results."""
    settings = {"model": model_fingerprint, "data": data_fingerprint, "problems": total_problems}
    settings.update({k: v for k, v in config.items() if k not in _RESUME_FREE})
    return json.loads(json.dumps(settings))  # as read back from disk


def _summary_settings(summary: EvalSummary) -> dict[str, Any]:
    return _settings(summary.model_fingerprint, summary.data_fingerprint, summary.total_problems, summary.config)


def _settings_diff(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key recorded -> wanted` for each setting that differs."""
    keys = list(wanted) + [k for k in recorded if k not in wanted]
    return [f"{k} {json.dumps(recorded.get(k))} -> {json.dumps(wanted.get(k))}" for k in keys if recorded.get(k) != wanted.get(k)]


def result_differences(out_dir: str | Path, model_fingerprint: str | None, problems: Sequence[Problem], config: EvalConfig) -> list[str]:
    """How the finished evaluation in `out_dir` differs from evaluating `problems` with `config` on
    the model `model_fingerprint` now (None: not compared): one `key recorded -> now` each, empty
    when a rerun would return it as it is. Raises ArtifactError when there is no finished result."""
    summary = _read_summary(Path(out_dir))
    recorded = _summary_settings(summary)
    wanted = _settings(model_fingerprint or summary.model_fingerprint, problems_fingerprint(problems), len(problems), asdict(config))
    return _settings_diff(recorded, wanted)


def _check_same_settings(where: Path, recorded: dict[str, Any], wanted: dict[str, Any]) -> None:
    diff = _settings_diff(recorded, wanted)
    if diff:
        shown = ", ".join(diff)
        raise ConsistencyError(
            f"{where}: holds an evaluation with other settings ({shown})",
            "rerun with the original settings to resume, pass --overwrite to discard it, or choose another --out",
        )


class _Progress:
    """`DIR/progress/`: settings.json, then one `batch-NNNNNN.jsonl` per generate call, each
    written atomically and fsynced, so a killed run loses at most the batch in flight. The
    directory is removed once samples.jsonl and summary.json are written."""

    def __init__(self, work: Path):
        self.work = work
        self.dir = work / PROGRESS_DIR
        self.next_batch = 0

    def start(self, settings: dict[str, Any], problems: Sequence[Problem], indices: Sequence[int], k: int) -> dict[int, list[dict]]:
        """Check the recorded settings, or record them for a fresh run; return the finished problems' records."""
        settings_path = self.dir / SETTINGS_FILE
        if not settings_path.is_file():
            shutil.rmtree(self.dir, ignore_errors=True)  # batches without settings: nothing to trust
            self.dir.mkdir()
            atomic_write(settings_path, json.dumps(settings, indent=2) + "\n", fsync=True)
            return {}
        try:
            recorded = json.loads(settings_path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{settings_path}: unreadable ({exc})", "pass --overwrite to start the evaluation afresh") from None
        _check_same_settings(self.work, recorded, settings)
        wanted = set(indices)
        done: dict[int, list[dict]] = {}
        for path in sorted(self.dir.glob("batch-*.jsonl")):
            self.next_batch = max(self.next_batch, int(path.stem.split("-")[1]) + 1)
            try:
                records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                for index, rs in _by_problem(records).items():
                    if index not in wanted or rs[0]["id"] != problems[index].id or [r["sample"] for r in rs] != list(range(k)):
                        raise ValueError(f"problem {index} does not belong here or is incomplete")
                    done[index] = rs
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise ArtifactError(f"{path}: unreadable progress ({exc})", "delete that file and rerun: its problems are evaluated again") from None
        return done

    def commit(self, records: list[dict[str, Any]]) -> None:
        path = self.dir / f"batch-{self.next_batch:06d}.jsonl"
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), fsync=True)
        self.next_batch += 1

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_summary(path: Path) -> EvalSummary:
    try:
        return EvalSummary.from_dict(json.loads((path / SUMMARY_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path / SUMMARY_FILE}: unreadable ({exc})", "pass --overwrite to evaluate afresh, or choose another --out") from None


def _discard(work: Path, merged_too: Path | None) -> None:
    """`--overwrite`: remove the evaluation files this tool writes (nothing else)."""
    for d in (work, merged_too):
        if d is None:
            continue
        for name in (SUMMARY_FILE, SAMPLES_FILE, MANIFEST_FILE):
            (d / name).unlink(missing_ok=True)
    shutil.rmtree(work / PROGRESS_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The run


def _model_fingerprint(model_dir: Path) -> str:
    from megatron_lopd.provenance import model_fingerprint

    try:
        return model_fingerprint(model_dir)
    except (OSError, ValueError) as exc:  # permissions, a corrupt config.json
        raise ArtifactError(f"{model_dir}: unreadable model directory ({exc})", "point at a complete Hugging Face model directory") from None


def evaluate(
    model_dir: str | Path,
    problems: Sequence[Problem],
    *,
    config: EvalConfig = EvalConfig(),
    backend=None,
    out_dir: str | Path | None = None,
    shard: Shard = Shard(),
    progress: bool = True,
    overwrite: bool = False,
) -> EvalSummary:
    """Evaluate `model_dir` on `problems` (this shard's part of them).

    `backend`: an open generation backend for `model_dir` to reuse (it stays open);
    by default one is loaded from `config` and closed afterwards. With `out_dir`, the
    results are written there (a shard's into its shard directory, merged once all
    shards are done). Returns the complete result (`shard is None`) when there is one:
    an unsharded run's, or the merge when this shard was the last to finish; else this
    shard's own summary.

    With `out_dir`: the directory is checked writable and locked (one writer) before the
    model is touched; every generate call's samples are committed to `progress/` as they
    come, and a rerun with the same settings resumes there (or returns a finished result
    without loading the model). Other settings are refused, unless `overwrite` discards
    the earlier results.
    """
    config.validate()
    check_problems(problems)
    grader = config.make_grader()
    model_dir = Path(model_dir)
    indices = shard.indices(len(problems))
    if not indices:
        raise ConfigError(f"shard {shard} gets no problems (only {len(problems)})", "use fewer shards than problems")
    if out_dir is None:
        return _evaluate(model_dir, problems, indices, config, grader, backend, shard, progress, None, overwrite)
    out = check_writable_dir(out_dir, "eval output", "--out")
    work = out if shard.count == 1 else check_writable_dir(out / shard.dirname, "eval shard output", "--out")
    what = "eval output" if shard.count == 1 else f"eval shard {shard} output"
    with OutputLock(work / LOCK_NAME, what):
        summary = _evaluate(model_dir, problems, indices, config, grader, backend, shard, progress, work, overwrite)
    if shard.count > 1 and not _missing_shards(out, shard.count):
        return _merge_unless_merging(out, summary)
    return summary


def _evaluate(model_dir, problems, indices, config, grader, backend, shard, progress, work, overwrite) -> EvalSummary:
    fingerprint = _model_fingerprint(model_dir)
    data_fingerprint = problems_fingerprint(problems)
    settings = _settings(fingerprint, data_fingerprint, len(problems), asdict(config))
    store: _Progress | None = None
    done: dict[int, list[dict]] = {}
    if work is not None:
        merged = work.parent if shard.count > 1 else None
        try:
            if overwrite:
                _discard(work, merged)
            if merged is not None and (merged / SUMMARY_FILE).is_file():
                _check_same_settings(merged, _summary_settings(_read_summary(merged)), settings)
            if (work / SUMMARY_FILE).is_file():  # finished: the same settings get the same result, without the model
                summary = _read_summary(work)
                _check_same_settings(work, _summary_settings(summary), settings)
                _Progress(work).remove()
                return summary
            store = _Progress(work)
            done = store.start(settings, problems, indices, config.samples_per_problem)
        except OSError as exc:
            raise _output_error(exc) from None
        if done:
            print(f"eval {work}: resuming: {len(done)} of {len(indices)} problems done", file=sys.stderr, flush=True)
    todo = [i for i in indices if i not in done]
    generated: list[dict] = []
    elapsed = 0.0
    backend_name = config.backend
    if todo:
        # every reference parsed before the model is loaded: a bad answer (code tests) fails at once
        prepared = dict(zip(todo, prepare_answers(grader, [(problems[i].id, problems[i].answer) for i in todo])))
        tokenizer = load_tokenizer(model_dir)
        prompts = [prompt_ids(tokenizer, problems[i], config) for i in todo]
        own_backend = backend is None
        if own_backend:
            from megatron_lopd.generation.backends import load_backend

            from megatron_lopd.generation.backends import engine_context
            from megatron_lopd.generation.base import inspect_model_dir

            needed = max(len(p) for p in prompts) + config.max_tokens
            backend = load_backend(
                config.backend, model_dir, dtype=config.dtype, tensor_parallel=config.tensor_parallel, seed=config.seed,
                max_model_len=engine_context(inspect_model_dir(model_dir), config.max_model_len, needed),
                gpu_memory_utilization=config.gpu_memory_utilization,
            )
        backend_name = getattr(backend, "name", config.backend)

        def commit(records: list[dict]) -> None:
            generated.extend(records)
            if store is not None:
                try:
                    store.commit(records)
                except OSError as exc:
                    finished = len(done) + len(generated) // config.samples_per_problem - len(records) // config.samples_per_problem
                    raise _output_error(exc, f"the {finished} problems committed so far are kept: rerun the same command to resume") from None

        try:
            _check_context(prompts, todo, problems, config.max_tokens, backend.max_model_len)
            elapsed = _generate_and_grade(
                backend, config.sampling_params(), prompts, todo, problems, prepared, grader, ResponseDecoder(tokenizer), config, progress,
                commit, len(indices), len(done),
            )
        finally:
            if own_backend:
                backend.close()
    records = sorted([r for rs in done.values() for r in rs] + generated, key=lambda r: (r["problem_index"], r["sample"]))
    tokens = sum(r["length"] for r in generated)
    timing = {"elapsed_s": elapsed}
    if todo and elapsed > 0:
        timing.update(problems_per_s=len(todo) / elapsed, tokens_per_s=tokens / elapsed)
    if done:
        timing["resumed_problems"] = len(done)
    summary = summarize(
        records,
        samples_per_problem=config.samples_per_problem,
        model_fingerprint=fingerprint,
        data_fingerprint=data_fingerprint,
        model_dir=str(model_dir),
        backend=backend_name,
        config=asdict(config),
        shard=asdict(shard) if shard.count > 1 else None,
        total_problems=len(problems),
        timing=timing,
    )
    if work is not None:
        try:
            if shard.count > 1:
                (work.parent / SUMMARY_FILE).unlink(missing_ok=True)  # a new shard result voids an earlier merge
            write_results(work, records, summary)
            if shard.count == 1:
                _write_manifest(work, summary)
            store.remove()
        except OSError as exc:
            raise _output_error(exc, "every sample is committed: rerun the same command to write the results") from None
    return summary


def _check_context(prompts, indices, problems, max_tokens: int, max_model_len: int) -> None:
    longest = max(range(len(prompts)), key=lambda j: len(prompts[j]))
    if len(prompts[longest]) + max_tokens > max_model_len:
        raise ConfigError(
            f"problem {problems[indices[longest]].id!r}: {len(prompts[longest])} prompt tokens + max_tokens {max_tokens} "
            f"exceed the model's context of {max_model_len}",
            "lower --max-tokens or raise --max-model-len (up to the model's max_position_embeddings)",
        )


def _generate_and_grade(backend, params, prompts, indices, problems, prepared, grader, decode, config, progress, commit, total, done) -> float:
    """Sample and grade `indices` batch by batch, handing each batch's records to `commit`; returns the seconds taken."""
    from tqdm.auto import tqdm

    from megatron_lopd.artifacts import FINISH_LENGTH

    per_call = max(1, config.batch_samples // config.samples_per_problem)
    start = time.perf_counter()
    tokens = correct = count = 0
    with tqdm(total=total, initial=done, unit="problem", desc="eval", disable=not progress, dynamic_ncols=True) as bar:
        for lo in range(0, len(indices), per_call):
            chunk = indices[lo : lo + per_call]
            outputs = backend.generate(prompts[lo : lo + per_call], params, prompt_indices=chunk)
            sampled: list[tuple[Problem, int, int, Any, str, bool]] = []  # problem, index, j, sample, full text, cut off
            graded: list[tuple[Any, str]] = []  # (prepared reference, final-answer text) of each sample
            for index, samples in zip(chunk, outputs):
                problem = problems[index]
                for j, sample in enumerate(samples):
                    full, answer_text = decode(sample.response_ids)
                    graded.append((prepared[index], answer_text))
                    sampled.append((problem, index, j, sample, full, sample.finish_reason == FINISH_LENGTH))
            batch: list[dict[str, Any]] = []
            for (problem, index, j, sample, full, truncated), verdict in zip(sampled, grade_batch(grader, graded, workers=grading_workers(config))):
                record = {
                    "id": problem.id,
                    "problem_index": index,
                    "sample": j,
                    "answer": recorded_answer(problem.answer),
                    "extracted": verdict.extracted,
                    # A response cut at max_tokens never gave its final answer: wrong, whatever it contains.
                    "correct": verdict.correct and not truncated,
                    "truncated": truncated,
                    "length": len(sample.response_ids),
                    "response": full,
                }
                if verdict.detail is not None:  # the code grader's reason (passed, wrong_answer, timeout, ...)
                    record["detail"] = verdict.detail
                batch.append(record)
                tokens += record["length"]
                correct += record["correct"]
            commit(batch)
            count += len(batch)
            bar.update(len(chunk))
            elapsed = time.perf_counter() - start
            bar.set_postfix(acc=f"{correct / count:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
    return time.perf_counter() - start


def grading_workers(config: EvalConfig) -> int:
    """Programs the code grader runs side by side: `code_workers`, else one per CPU this process may
    use (its affinity: a SLURM task's share), at most 8 (each may use 2 GiB). More than the CPUs
    gains nothing (benchmarks/bench_code_grader.py) and lets wall-clock limits fire on busy CPUs."""
    return config.code_workers or max(1, min(8, len(os.sched_getaffinity(0))))


def recorded_answer(answer: str) -> str:
    """The reference as samples.jsonl records it: whole, or (code tests, often megabytes, repeated for
    each of K samples) its start and digest; the data file and its fingerprint keep the whole."""
    if len(answer) <= RECORDED_ANSWER_CHARS:
        return answer
    digest = hashlib.sha256(answer.encode()).hexdigest()[:16]
    return f"{answer[:200]}... [{len(answer):,} characters, sha256 {digest}]"


def run_eval(
    model_dir: str | Path,
    data: DataSource | str | Path,
    out_dir: str | Path,
    *,
    config: EvalConfig = EvalConfig(),
    shard: Shard = Shard(),
    progress: bool = True,
    overwrite: bool = False,
) -> EvalSummary:
    """`lopd eval`: load the data (a path: the `problems` format), evaluate, write. Returns what `evaluate` returns."""
    config.validate()  # before reading anything: K < 1 fails fast
    return evaluate(model_dir, load_problems(data), config=config, out_dir=out_dir, shard=shard, progress=progress, overwrite=overwrite)


# ---------------------------------------------------------------------------------------
# Shards


def _shard_dirs(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("shard-*-of-*") if p.is_dir())


def _missing_shards(out_dir: Path, count: int) -> list[str]:
    return [Shard(i, count).dirname for i in range(count) if not (out_dir / Shard(i, count).dirname / SUMMARY_FILE).is_file()]


def _merge_unless_merging(out_dir: Path, shard_summary: EvalSummary) -> EvalSummary:
    """The last shard to finish merges; of two finishing at once, one merges and the other returns its own summary."""
    lock = OutputLock(out_dir / LOCK_NAME, "eval output")
    if lock.try_acquire() is not None:
        print(f"eval {out_dir}: another process is merging the shards", file=sys.stderr, flush=True)
        return shard_summary
    try:
        return _merge(out_dir)
    finally:
        lock.release()


def merge_shards(out_dir: str | Path) -> EvalSummary:
    """Combine `out_dir/shard-*-of-N/` into `out_dir/samples.jsonl` + `summary.json`.

    Refuses missing shards and shards that evaluated a different model, data set or
    configuration. The merged files are identical to an unsharded run's (timing aside).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not _shard_dirs(out_dir):
        raise ArtifactError(f"{out_dir}: no shard-*-of-* directories to merge", "run `lopd eval --shard I/N --out DIR` for every shard first")
    check_writable_dir(out_dir, "eval output", "--merge")
    with OutputLock(out_dir / LOCK_NAME, "eval output"):
        return _merge(out_dir)


def _merge(out_dir: Path) -> EvalSummary:
    dirs = _shard_dirs(out_dir)
    if not dirs:
        raise ArtifactError(f"{out_dir}: no shard-*-of-* directories to merge", "run `lopd eval --shard I/N --out DIR` for every shard first")
    counts = {int(d.name.rsplit("-of-", 1)[1]) for d in dirs}
    if len(counts) != 1:
        raise ArtifactError(f"{out_dir}: shards of different splits ({sorted(counts)} shards)", "remove the shard directories of the old split")
    count = counts.pop()
    missing = _missing_shards(out_dir, count)
    if missing:
        raise ArtifactError(f"{out_dir}: {len(missing)} of {count} shards not finished ({', '.join(missing[:4])}...)", "run the missing shards, then merge")
    parts = [read_results(out_dir / Shard(i, count).dirname) for i in range(count)]
    first = parts[0][1]
    for i, (_, s) in enumerate(parts):
        mismatch = [
            key
            for key, a, b in (
                ("model", s.model_fingerprint, first.model_fingerprint),
                ("data", s.data_fingerprint, first.data_fingerprint),
                ("configuration", s.results()["config"], first.results()["config"]),
                ("number of problems", s.total_problems, first.total_problems),
            )
            if a != b
        ]
        if mismatch:
            raise ConsistencyError(
                f"{out_dir}: shard {i} evaluated a different {' and '.join(mismatch)} than shard 0",
                "re-run all shards with the same model, data and settings (delete stale shard directories)",
            )
    records = sorted((r for recs, _ in parts for r in recs), key=lambda r: (r["problem_index"], r["sample"]))
    found = sorted({r["problem_index"] for r in records})
    if found != list(range(first.total_problems)):
        raise ArtifactError(f"{out_dir}: the shards cover {len(found)} of {first.total_problems} problems", "re-run the shards")
    elapsed = max(s.timing.get("elapsed_s", 0.0) for _, s in parts) or float("nan")
    summary = summarize(
        records,
        samples_per_problem=first.samples_per_problem,
        model_fingerprint=first.model_fingerprint,
        data_fingerprint=first.data_fingerprint,
        model_dir=first.model_dir,
        backend=first.backend,
        config=first.config,
        shard=None,
        total_problems=first.total_problems,
        timing={
            "elapsed_s": elapsed,  # shards run side by side: the slowest one's time
            "problems_per_s": first.total_problems / elapsed,
            "tokens_per_s": sum(r["length"] for r in records) / elapsed,
            "shards": count,
        },
    )
    try:
        write_results(out_dir, records, summary)
        _write_manifest(out_dir, summary)
    except OSError as exc:
        raise _output_error(exc, "the shards' results are kept: `lopd eval --merge DIR` merges them again") from None
    return summary
