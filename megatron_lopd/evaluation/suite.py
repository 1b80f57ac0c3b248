"""Evaluation suites: several benchmarks, each with its own data format, grader and sampling, in one table.

    lopd eval --model HF_DIR --suite paper --out DIR \\
        --suite-data aime24=AIME24.parquet,aime25=AIME25_DIR,hmmt25=HMMT.parquet,lcb_v5=LCB_DIR,lcb_v6=LCB_DIR

Each benchmark is evaluated by `evaluate` into `DIR/NAME/`, so what holds for one evaluation holds
per benchmark: a rerun resumes it, other settings are refused, shards merge. Then `DIR/suite.json`
and `DIR/suite.md` list every benchmark's avg@K with its standard error, truncation rate and mean
length, beside the paper's numbers where it reports them. A benchmark that fails is listed as
failed with its one-line reason; the others go on. Benchmarks without data are listed as not run.
All benchmarks whose engine settings agree share one engine (the model is loaded once).

The `paper` suite is the Lightning OPD paper's table (DESIGN section 2): AIME 2024, AIME 2025 and
HMMT Feb 2025 at avg@64 with up to 32K response tokens, temperature 0.6, top-p 0.95, graded by
math-verify; LiveCodeBench v5 and v6 (contest-date windows 2024-08-01..2025-02-01 and
2025-02-01..2025-05-01) at avg@8 with the same sampling, graded by running the tests (the `code`
grader), as NVIDIA's AceReason-Nemotron reports these windows. A suite file (JSON / TOML / YAML:
`name`, `benchmarks: [{name, format, title, config: {EvalConfig fields}, paper: {...}}]`) defines
another suite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from megatron_lopd.datasets.formats import FORMATS, data_format
from megatron_lopd.datasets.source import DataSource, parse_named_source
from megatron_lopd.errors import ArtifactError, ConfigError, LopdError
from megatron_lopd.evaluation.evaluate import (MATH_PROMPT_TEMPLATE, SUMMARY_FILE, EvalConfig, EvalSummary, evaluate, load_problems,
                                               load_tokenizer, prompt_ids, read_results, result_differences)
from megatron_lopd.runtime.files import OutputLock, atomic_write, check_writable_dir
from megatron_lopd.runtime.shards import Shard

SUITE_JSON, SUITE_MD = "suite.json", "suite.md"
# What a run may change for every benchmark at once (smoke runs, engines): sampling and engine knobs,
# never a benchmark's data format, grader or prompt.
OVERRIDABLE = ("samples_per_problem", "max_tokens", "temperature", "top_p", "seed", "enable_thinking", "system_prompt", "backend", "dtype",
               "tensor_parallel", "max_model_len", "gpu_memory_utilization", "batch_samples", "code_workers", "sandbox_allow_unisolated")
_ENGINE_FIELDS = ("backend", "dtype", "tensor_parallel", "max_model_len", "gpu_memory_utilization")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# The paper's settings, as the table's columns name them.
PAPER_SETTINGS = {"qwen3_30b_a3b": "30B-A3B", "qwen3_8b": "8B", "qwen3_4b": "4B"}


@dataclass(frozen=True)
class PaperResult:
    """The paper's avg@K (percent) for one student setting: the SFT model and after Lightning OPD."""

    sft: float | None = None
    lightning_opd: float | None = None


@dataclass(frozen=True)
class Benchmark:
    """`name`: its directory, its `--suite-data` key and its row; `format` reads its data."""

    name: str = ""
    format: str = "problems"
    title: str = ""
    config: EvalConfig = EvalConfig()
    paper: dict[str, PaperResult] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str = ""
    benchmarks: list[Benchmark] = field(default_factory=list)

    def validate(self, where: str = "suite") -> None:
        if not self.benchmarks:
            raise ConfigError(f"{where} {self.name!r} has no benchmarks", "list them under `benchmarks`")
        seen = set()
        for b in self.benchmarks:
            if not _NAME.match(b.name) or b.name in seen:
                raise ConfigError(f"{where} {self.name!r}: benchmark name {b.name!r} is {'a duplicate' if b.name in seen else 'not a plain name'}",
                                  "give every benchmark a unique name of letters, digits, '_', '-' or '.'")
            if b.format not in FORMATS:
                raise ConfigError(f"{where} {self.name!r}: benchmark {b.name!r} has unknown format {b.format!r}", f"use one of {', '.join(FORMATS)}")
            seen.add(b.name)

    def benchmark(self, name: str) -> Benchmark:
        for b in self.benchmarks:
            if b.name == name:
                return b
        from megatron_lopd.config import did_you_mean

        raise ConfigError(f"suite {self.name!r} has no benchmark {name!r}", did_you_mean(name, [b.name for b in self.benchmarks]))


def paper_suite() -> Suite:
    """The Lightning OPD paper's evaluation (see the module docstring)."""
    math = EvalConfig(samples_per_problem=64, max_tokens=32768, temperature=0.6, top_p=0.95, grader="math", prompt_template=MATH_PROMPT_TEMPLATE)
    code = dataclasses.replace(math, samples_per_problem=8, grader="code", prompt_template=EvalConfig.prompt_template)
    moe = "qwen3_30b_a3b"
    return Suite("paper", [
        Benchmark("aime24", "aime24", "AIME 2024", math,
                  {moe: PaperResult(66.8, 71.0), "qwen3_8b": PaperResult(63.7, 69.9), "qwen3_4b": PaperResult(56.7, 68.1)}),
        Benchmark("aime25", "aime25", "AIME 2025", math, {moe: PaperResult(63.2, 66.3)}),
        Benchmark("hmmt25", "hmmt25", "HMMT Feb 2025", math, {moe: PaperResult(44.6, 48.3)}),
        Benchmark("lcb_v5", "lcb_v5", "LiveCodeBench v5", code, {moe: PaperResult(39.4, 60.8)}),
        Benchmark("lcb_v6", "lcb_v6", "LiveCodeBench v6", code, {moe: PaperResult(33.0, 54.4)}),
    ])


SUITES = {"paper": paper_suite}


def load_suite(suite: str | Path) -> Suite:
    """A built-in suite by name, or a suite file."""
    if str(suite) in SUITES:
        loaded = SUITES[str(suite)]()
    else:
        from megatron_lopd import config as typed_config

        path = Path(suite)
        if not path.is_file():
            raise ConfigError(f"no suite {str(suite)!r}", f"name a built-in suite ({', '.join(SUITES)}) or a suite file (.json, .toml, .yaml)")
        loaded = typed_config.from_dict(Suite, typed_config.load_file(path), where=str(path))
        loaded = loaded if loaded.name else dataclasses.replace(loaded, name=path.stem)
    loaded.validate(f"suite {suite}" if str(suite) not in SUITES else "suite")
    return loaded


@dataclass(frozen=True)
class SuiteRun:
    """One suite evaluation: the suite, the data of each benchmark that runs (the others are
    listed as not run), and settings (EvalConfig fields in `OVERRIDABLE`) applied to every benchmark."""

    suite: Suite
    data: dict[str, DataSource]
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [k for k in self.overrides if k not in OVERRIDABLE]
        if unknown:
            raise ConfigError(f"suite {self.suite.name!r}: {', '.join(unknown)} cannot be set for every benchmark",
                              f"each benchmark has its own data format, grader and prompt; set only {', '.join(OVERRIDABLE)}")
        if not self.data:
            raise ConfigError(f"suite {self.suite.name!r}: no benchmark has data",
                              f"pass --suite-data NAME=PATH for some of {', '.join(b.name for b in self.suite.benchmarks)}")
        for name in self.data:
            self.suite.benchmark(name)
        EvalConfig(**self.overrides).validate()  # a bad override (K < 1): one error before anything runs

    def config(self, benchmark: Benchmark) -> EvalConfig:
        return dataclasses.replace(benchmark.config, **self.overrides)

    def selected(self) -> list[Benchmark]:
        return [b for b in self.suite.benchmarks if b.name in self.data]


def suite_run(suite: str | Path | Suite, data: Iterable[str], overrides: Mapping[str, Any] | None = None) -> SuiteRun:
    """A SuiteRun from `--suite-data` items `NAME[:FORMAT]=PATH` (comma-separated lists too); a
    benchmark's data is read in its own format unless FORMAT names another."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    sources: dict[str, DataSource] = {}
    for item in (part for text in data for part in str(text).split(",") if part.strip()):
        name, fmt, path = parse_named_source(item, "--suite-data")
        benchmark = suite.benchmark(name)
        if name in sources:
            raise ConfigError(f"--suite-data names benchmark {name!r} twice", "give each benchmark one data path")
        sources[name] = DataSource(path, data_format(fmt or benchmark.format))
    return SuiteRun(suite, sources, {k: v for k, v in (overrides or {}).items() if v is not None})


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class BenchmarkResult:
    """One row of the table. `status`: done | failed | incomplete (shards still running) | not run (no data)."""

    name: str
    title: str
    status: str
    reason: str = ""
    data: str = ""
    format: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass
class SuiteReport:
    suite: str
    model_dir: str
    model_fingerprint: str
    overrides: dict[str, Any]
    benchmarks: list[BenchmarkResult]

    @property
    def complete(self) -> bool:
        """Every benchmark with data is done."""
        return all(b.status in ("done", "not run") for b in self.benchmarks)

    def failed(self) -> list[BenchmarkResult]:
        return [b for b in self.benchmarks if b.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "complete": self.complete}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteReport":
        return cls(d["suite"], d["model_dir"], d["model_fingerprint"], d["overrides"], [BenchmarkResult(**b) for b in d["benchmarks"]])

    def console_lines(self) -> list[str]:
        out = []
        for b in self.benchmarks:
            r = b.results
            if b.status == "done":
                out.append(f"{b.name}: avg@{r['samples_per_problem']} {100 * r['avg_at_k']:.1f} +- {100 * r['avg_at_k_stderr']:.1f} "
                           f"({r['num_problems']} problems, truncated {100 * r['truncation_rate']:.1f}%)")
            else:
                out.append(f"{b.name}: {b.status}{': ' + b.reason if b.reason else ''}")
        return out

    def markdown(self) -> str:
        named = list(dict.fromkeys([*PAPER_SETTINGS, *sorted(k for b in self.benchmarks for k in b.paper)]))
        settings = [s for s in named if any(s in b.paper for b in self.benchmarks)]
        head = ["benchmark", "problems", "avg@k (%)", "SE", "truncated", "mean tokens",
                *(f"paper {PAPER_SETTINGS.get(s, s)}: SFT -> Lightning OPD" for s in settings),
                "settings", "status"]
        rows = []
        for b in self.benchmarks:
            r, s = b.results, b.settings
            done = b.status == "done"
            cells = [f"{b.title or b.name} (`{b.name}`)",
                     str(r["num_problems"]) if done else "-",
                     f"{100 * r['avg_at_k']:.1f} (avg@{r['samples_per_problem']})" if done else "-",
                     f"{100 * r['avg_at_k_stderr']:.1f}" if done else "-",
                     f"{100 * r['truncation_rate']:.1f}%" if done else "-",
                     f"{r['mean_response_tokens']:,.0f}" if done else "-"]
            for setting in settings:
                p = b.paper.get(setting)
                cells.append(" -> ".join("-" if v is None else f"{v:.1f}" for v in (p["sft"], p["lightning_opd"])) if p else "")
            cells.append(f"k={s['samples_per_problem']}, {s['max_tokens']:,} tokens, T={s['temperature']}, top-p={s['top_p']}, "
                         f"{s['grader']}" if s else "")
            cells.append(f"{b.status}: {b.reason}" if b.reason else b.status)
            rows.append(cells)
        lines = [f"# Evaluation suite `{self.suite}`", "", f"Model: `{self.model_dir}` ({self.model_fingerprint or 'not loaded'})"]
        if self.overrides:
            lines.append(f"Settings changed for every benchmark: {', '.join(f'{k}={v}' for k, v in self.overrides.items())}")
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines += ["", "avg@k: mean correctness over all k samples of every problem (= pass@1); SE: its standard error over problems; "
                  "truncated: samples cut at the token budget (counted wrong). Paper numbers: Lightning OPD (arXiv 2604.13010), "
                  "avg@k in percent, for the student named in the column."]
        return "\n".join(lines) + "\n"


def _results(summary: EvalSummary) -> dict[str, Any]:
    return {"num_problems": summary.num_problems, "samples_per_problem": summary.samples_per_problem, "avg_at_k": summary.avg_at_k,
            "avg_at_k_stderr": summary.avg_at_k_stderr, "pass_at_k": {str(k): v for k, v in summary.pass_at_k.items()},
            "truncation_rate": summary.truncation_rate, "no_answer_rate": summary.no_answer_rate,
            "mean_response_tokens": summary.mean_response_tokens, "data_fingerprint": summary.data_fingerprint}


def _row(run: SuiteRun, benchmark: Benchmark, status: str, reason: str = "", summary: EvalSummary | None = None) -> BenchmarkResult:
    source = run.data.get(benchmark.name)
    config = run.config(benchmark)
    settings = {k: getattr(config, k) for k in ("samples_per_problem", "max_tokens", "temperature", "top_p", "grader")}
    return BenchmarkResult(
        benchmark.name, benchmark.title, status, reason, str(source.path) if source else "", source.format.name if source else benchmark.format,
        settings, _results(summary) if summary else {}, {k: dataclasses.asdict(v) for k, v in benchmark.paper.items()},
    )


def _merged(out: Path, shard_summary: EvalSummary) -> EvalSummary | None:
    """The merged result of a sharded benchmark, if every shard is done and it is this run's."""
    if not (out / SUMMARY_FILE).is_file():
        return None
    try:
        merged = read_results(out)[1]
    except ArtifactError:
        return None
    same = (merged.model_fingerprint, merged.data_fingerprint, merged.results()["config"]) == (
        shard_summary.model_fingerprint, shard_summary.data_fingerprint, shard_summary.results()["config"])
    return merged if same else None


# ---------------------------------------------------------------------------------------
# The run


def engine_key(config: EvalConfig) -> tuple:
    """What an engine is opened with: benchmarks that agree on it share one (sample seeds are per sample)."""
    return tuple(getattr(config, k) for k in _ENGINE_FIELDS)


class _SharedEngine:
    """One generation engine for the benchmarks whose engine settings agree, opened when the first
    of them has work (a finished suite never loads the model) and sized for the longest of them."""

    def __init__(self, model_dir: Path, config: EvalConfig, needed_tokens: int):
        self.model_dir, self.config, self.needed = model_dir, config, needed_tokens
        self.key = engine_key(config)
        self._backend = None

    def _open(self):
        if self._backend is None:
            from megatron_lopd.generation.backends import engine_context, load_backend
            from megatron_lopd.generation.base import inspect_model_dir

            c = self.config
            self._backend = load_backend(
                c.backend, self.model_dir, dtype=c.dtype, tensor_parallel=c.tensor_parallel, seed=c.seed,
                max_model_len=engine_context(inspect_model_dir(self.model_dir), c.max_model_len, self.needed),
                gpu_memory_utilization=c.gpu_memory_utilization,
            )
        return self._backend

    @property
    def name(self) -> str:
        return self._open().name

    @property
    def max_model_len(self) -> int:
        return self._open().max_model_len

    def generate(self, *args, **kwargs):
        return self._open().generate(*args, **kwargs)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, LopdError):
        return str(exc)
    if os.environ.get("LOPD_TRACEBACK"):
        traceback.print_exc()
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''} (LOPD_TRACEBACK=1 shows where)"


def run_suite(model_dir: str | Path, run: SuiteRun, out_dir: str | Path, *, shard: Shard = Shard(), progress: bool = True,
              overwrite: bool = False) -> SuiteReport:
    """Evaluate every benchmark of `run` that has data into `out_dir/NAME/`, then write
    `out_dir/suite.json` and `suite.md`. A failing benchmark is recorded with its reason; the
    others go on. With `shard`, this process evaluates its shard of every benchmark; the table
    lists a benchmark as done once all its shards are (the last shard merges it)."""
    model_dir = Path(model_dir)
    out = check_writable_dir(out_dir, "suite output", "--out")
    loaded: dict[str, list] = {}
    outcome: dict[str, tuple[str, str, EvalSummary | None]] = {}  # name -> (status, reason, summary)
    needed: dict[tuple, int] = {}  # engine settings -> longest prompt + max_tokens among their benchmarks

    def failed(benchmark: Benchmark, exc: Exception) -> None:  # one benchmark's failure: recorded, the others go on
        outcome[benchmark.name] = ("failed", _one_line(exc), None)
        print(f"suite {run.suite.name}: {benchmark.name} failed: {outcome[benchmark.name][1]}", file=sys.stderr, flush=True)

    tokenizer = None
    for benchmark in run.selected():  # every benchmark's data and settings, before the model is loaded
        config = run.config(benchmark)
        try:
            config.validate()
            problems = load_problems(run.data[benchmark.name])
            tokenizer = tokenizer or load_tokenizer(model_dir)
            key = engine_key(config)
            needed[key] = max(needed.get(key, 0), max(len(prompt_ids(tokenizer, p, config)) for p in problems) + config.max_tokens)
            loaded[benchmark.name] = problems
        except Exception as exc:
            failed(benchmark, exc)
    engine: _SharedEngine | None = None
    try:
        for benchmark in run.selected():
            if benchmark.name not in loaded:
                continue
            config = run.config(benchmark)
            if engine is None or engine.key != engine_key(config):
                if engine is not None:
                    engine.close()  # one engine at a time: GPU memory
                engine = _SharedEngine(model_dir, config, needed[engine_key(config)])
            try:
                summary = evaluate(model_dir, loaded[benchmark.name], config=config, backend=engine, out_dir=out / benchmark.name,
                                   shard=shard, progress=progress, overwrite=overwrite)
                outcome[benchmark.name] = ("done", "", summary)  # a shard's own summary: done once merged (see _final_row)
                print(f"suite {run.suite.name}: {summary.console_line(benchmark.name)}", file=sys.stderr, flush=True)
            except Exception as exc:
                failed(benchmark, exc)
    finally:
        if engine is not None:
            engine.close()
    fingerprints = [s.model_fingerprint for _, _, s in outcome.values() if s is not None]
    # Shards of a benchmark finish in any order and each writes the table: a shard's view of the others
    # is read from disk under a lock, so whichever writes last has seen every merge before it.
    with _TableLock(out):
        rows = [_final_row(run, b, outcome.get(b.name), out) for b in run.suite.benchmarks]
        report = SuiteReport(run.suite.name, str(model_dir), fingerprints[0] if fingerprints else "", dict(run.overrides), rows)
        write_suite(out, report)
    return report


def _final_row(run: SuiteRun, benchmark: Benchmark, outcome: tuple[str, str, EvalSummary | None] | None, out: Path) -> BenchmarkResult:
    if outcome is None:
        return _row(run, benchmark, "not run", "no data (--suite-data NAME=PATH)")
    status, reason, summary = outcome
    if summary is not None and summary.shard is not None:
        merged = _merged(out / benchmark.name, summary)
        if merged is None:
            return _row(run, benchmark, "incomplete", "waiting for the other shards (the last one merges)")
        summary = merged
    return _row(run, benchmark, status, reason, summary)


class _TableLock:
    """`DIR/.suite.lock`, waited for: the processes of a sharded suite write one table in turn."""

    def __init__(self, out: Path, wait_s: float = 300.0):
        self.lock, self.wait_s = OutputLock(out / ".suite.lock", "suite table", heartbeat=False), wait_s

    def __enter__(self):
        deadline = time.monotonic() + self.wait_s
        while (holder := self.lock.try_acquire()) is not None:
            if time.monotonic() > deadline:
                raise ArtifactError(f"{self.lock.path}: held by {holder} for over {self.wait_s:.0f} s", "remove the lock if no suite is running")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.lock.release()


def write_suite(out_dir: Path, report: SuiteReport) -> None:
    atomic_write(out_dir / SUITE_MD, report.markdown(), fsync=True)
    atomic_write(out_dir / SUITE_JSON, json.dumps(report.to_dict(), indent=2) + "\n", fsync=True)  # last: its presence marks a table


def read_suite(out_dir: str | Path) -> SuiteReport:
    path = Path(out_dir) / SUITE_JSON
    try:
        return SuiteReport.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: no readable suite table ({exc})", "run `lopd eval --suite ...` into that directory") from None


def verify_suite(out_dir: str | Path) -> str:
    """A finished suite: its table says every benchmark with data is done, and each one's results
    read back. Returns one line per benchmark, joined; raises ArtifactError otherwise."""
    out = Path(out_dir)
    report = read_suite(out)
    unfinished = [b for b in report.benchmarks if b.status not in ("done", "not run")]
    if unfinished:
        b = unfinished[0]
        raise ArtifactError(f"{out}: suite {report.suite}: {len(unfinished)} benchmark(s) not done ({b.name}: {b.status}"
                            f"{': ' + b.reason if b.reason else ''})", "fix the cause and rerun the suite: finished benchmarks are kept")
    for b in report.benchmarks:
        if b.status == "done":
            read_results(out / b.name)
    return "; ".join(report.console_lines())


def suite_differences(out_dir: str | Path, run: SuiteRun, model_fingerprint: str | None) -> list[str]:
    """How the finished suite in `out_dir` differs from running `run` now on the model
    `model_fingerprint` (None: not compared): one `NAME: key recorded -> now` line each."""
    out = Path(out_dir)
    report = read_suite(out)
    recorded = {b.name: b for b in report.benchmarks}
    diffs = []
    for benchmark in run.suite.benchmarks:
        ran_before = benchmark.name in recorded and recorded[benchmark.name].status != "not run"
        runs_now = benchmark.name in run.data
        if ran_before != runs_now:
            diffs.append(f"{benchmark.name}: {'evaluated' if ran_before else 'not run'} before, {'has' if runs_now else 'no'} data now")
        if not (ran_before and runs_now):
            continue
        try:
            diffs += [f"{benchmark.name}: {d}" for d in
                      result_differences(out / benchmark.name, model_fingerprint, load_problems(run.data[benchmark.name]), run.config(benchmark))]
        except LopdError as exc:
            diffs.append(f"{benchmark.name}: {exc.what}")
    return diffs
