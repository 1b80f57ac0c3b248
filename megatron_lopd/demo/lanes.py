"""How the demo's stages run (`Stage`, `run_plan`): one after the other in this process, or in
parallel lanes, one worker process per lane, each stage as soon as the stages it reads from
are done.

Why processes: the demo's models are tiny, so a training step costs mostly per-operation
overhead that a second thread hardly shortens (measured on 2 cores: 153 ms per step with 2
threads, 132 ms with 1), while two processes of one thread each run side by side at about
1.7x the throughput. Every stage runs with one thread, in-process (`--jobs 1`) or in a
lane, so a seed gives the same numbers whatever the number of lanes (a test runs both).

Each worker imports torch and megatron-core once and keeps its `Demo` (and teacher A's
backend, for the KL measurements) across stages; only the parent writes state.json. A
stage's output goes to `work/logs/demo/<stage>.log`; the console gets a line when a stage
starts and ends, and every `HEARTBEAT_S` one line with the running stages' progress.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

HEARTBEAT_S = 30.0
_STEP = re.compile(rb"step (\d+)/(\d+)")


@dataclass(frozen=True)
class Stage:
    """One step of the demo: `run` returns its results; `clear` is removed before a (re)run;
    `after` names the stages whose outputs it reads."""

    name: str
    what: str
    run: Callable[[], dict[str, Any]]
    clear: tuple[Path, ...] = ()
    after: tuple[str, ...] = ()

    def execute(self) -> dict[str, Any]:
        """Run from a clean start; the state record (seconds, CPU seconds, results)."""
        for path in self.clear:  # an interrupted stage starts over (pipeline stages resume inside instead)
            if path.exists():
                shutil.rmtree(path)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result = self.run()
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0, **result}


class StageRunner(Protocol):
    """What runs a plan of stages (`demo.run.Demo`, `demo.study.PaperLossStudy`)."""

    state: dict[str, Any]  # {"stages": {name: record}}: the finished stages
    jobs: int
    progress: bool
    log_dir: Path

    def stages(self) -> list[Stage]: ...
    def console(self, line: str) -> None: ...
    def save_state(self) -> None: ...
    def lane_runner(self) -> Callable[[], "StageRunner"]: ...
    def close(self) -> None: ...


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared
    machine, the part of the wall-clock that is the demo's own work."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _quiet_libraries() -> None:
    """A readable console: no per-file weight-loading bars, no known import-time warnings
    (megatron-core without TE/Apex, torch deprecations); the stages' own bars and lines stay."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for module in (r"megatron\.", r"torch\.", r"megatron_lopd\.runtime\.cuda_compat"):
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=module)


def prepare_process() -> None:
    """One thread per stage (the numbers do not depend on --jobs or on the core count; a tiny
    model gains little from a second thread), no tokenizer threads, a readable console."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    _quiet_libraries()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs() -> int:
    """One lane per usable CPU, at most 4 (the widest point of the demo's stage graph)."""
    return max(1, min(4, usable_cpus()))


class DemoStageError(RuntimeError):
    """A stage failed in a lane; the message names the stage, the error and the log."""


@contextlib.contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (file descriptors too: subprocesses, C libraries) to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _worker(build: Callable[[], Any], lane: int, tasks, results) -> None:
    """A lane: `build()`s its runner (a Demo, a study) once, then runs the stages it is sent until it gets None."""
    prepare_process()
    runner = build()
    try:
        while (task := tasks.get()) is not None:
            name, state, log = task
            runner.state = state
            with _output_to(Path(log)):
                try:
                    stage = next(st for st in runner.stages() if st.name == name)
                    outcome = {"record": stage.execute()}
                except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the demo
                    traceback.print_exc()
                    outcome = {"error": f"{type(exc).__name__}: {exc}"}
            results.put((lane, name, outcome))
    finally:
        runner.close()


def _progress(log: Path) -> str:
    """The last `step N/M` a stage's log shows (a training run prints one every 50 steps), else ''."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            found = _STEP.findall(f.read())
    except OSError:
        return ""
    return f"step {int(found[-1][0])}/{int(found[-1][1])}" if found else ""


def _record(runner: StageRunner, name: str, record: dict[str, Any]) -> None:
    """A finished stage: into the state, saved at once, one console line."""
    runner.state["stages"][name] = record
    runner.save_state()
    measured = record.get("measure")
    runner.console(f"        {name} done in {record['seconds']:.1f} s" + (f" (greedy pass@1 {100 * measured['pass1']:.1f}%)" if measured else ""))


def run_in_lanes(runner: StageRunner, todo: list[Stage], number: dict[str, str]) -> None:
    """Run `todo` (a topological order, most urgent first) in `runner.jobs` lanes, each a process
    with its own copy of the runner (`runner.lane_runner()`); each finished stage is recorded in
    runner.state at once. The first failure stops new stages, waits
    for the running ones (their results are kept for --resume) and raises DemoStageError."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch or megatron state inherited
    results, build = ctx.Queue(), runner.lane_runner()
    lanes = []
    for lane in range(min(runner.jobs, len(todo))):
        tasks = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(build, lane, tasks, results), name=f"lopd-demo-lane-{lane}")
        proc.start()
        lanes.append({"proc": proc, "tasks": tasks, "stage": None, "t0": 0.0, "log": None})
    pending, failure = list(todo), None
    started, beat = time.perf_counter(), time.perf_counter()
    try:
        while True:
            idle = [lane for lane in lanes if lane["stage"] is None]
            ready = [st for st in pending if all(d in runner.state["stages"] for d in st.after)] if failure is None else []
            for lane, stage in zip(idle, ready):
                pending.remove(stage)
                log = runner.log_dir / f"{stage.name}.log"
                lane.update(stage=stage, t0=time.perf_counter(), log=log)
                lane["tasks"].put((stage.name, runner.state, str(log)))
                runner.console(f"{number[stage.name]} {stage.what}")
            busy = [lane for lane in lanes if lane["stage"] is not None]
            if not busy:
                if pending and failure is None:
                    raise RuntimeError(f"demo stages {[st.name for st in pending]} wait for stages that never run (a bug in Stage.after)")
                break
            try:
                lane_index, name, outcome = results.get(timeout=5.0)
            except queue.Empty:
                dead = [lane for lane in busy if not lane["proc"].is_alive()]
                if dead:
                    lane = dead[0]
                    raise DemoStageError(f"demo stage {lane['stage'].name}: its worker process died (exit code {lane['proc'].exitcode}); "
                                         f"log: {lane['log']}; rerun with --resume")
                if runner.progress and time.perf_counter() - beat >= HEARTBEAT_S:
                    beat = time.perf_counter()
                    running = ", ".join(f"{lane['stage'].name} {time.perf_counter() - lane['t0']:.0f} s"
                                        + (f" ({p})" if (p := _progress(lane["log"])) else "") for lane in busy)
                    runner.console(f"        {time.perf_counter() - started:.0f} s: running {running}; "
                                 f"{len(runner.state['stages'])} stages done, {len(pending)} waiting")
                continue
            lane = lanes[lane_index]
            log = lane["log"]
            lane["stage"] = None
            if "error" in outcome:
                runner.console(f"        {name} FAILED: {outcome['error']} (log: {log})")
                failure = failure or DemoStageError(f"demo stage {name} failed: {outcome['error']}; traceback in {log}; "
                                                    "fix it and rerun with --resume (finished stages are kept)")
                continue
            _record(runner, name, outcome["record"])
        if failure is not None:
            raise failure
    finally:
        for lane in lanes:
            if lane["proc"].is_alive() and lane["stage"] is None:
                lane["tasks"].put(None)
        for lane in lanes:
            lane["proc"].join(timeout=30 if lane["stage"] is None else 0)
            if lane["proc"].is_alive():
                lane["proc"].terminate()
                lane["proc"].join(timeout=10)


def run_plan(runner: StageRunner, plan: list[Stage]) -> float:
    """The stages of `plan` not in runner.state yet: one after the other in this process
    (`runner.jobs` 1), else in lanes; every finished stage recorded at once. Returns the seconds it took."""
    width = max(len(st.name) for st in plan)
    number = {st.name: f"[{i:2d}/{len(plan)}] {st.name:<{width}}" for i, st in enumerate(plan, 1)}
    todo = []
    for st in plan:
        if st.name in runner.state["stages"]:
            runner.console(f"{number[st.name]} {st.what}: done before ({runner.state['stages'][st.name]['seconds']:.1f} s), skipped")
        else:
            todo.append(st)
    started = time.perf_counter()
    try:
        if runner.jobs <= 1 or len(todo) <= 1:
            for st in todo:
                runner.console(f"{number[st.name]} {st.what}")
                _record(runner, st.name, st.execute())
        else:
            run_in_lanes(runner, todo, number)
    finally:
        runner.close()
    return time.perf_counter() - started
