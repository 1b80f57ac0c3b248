"""The demo's parallel lanes (megatron_lopd/demo/lanes.py): order, overlap, logs, failures.

`ToyRunner` speaks the runner protocol of `Demo` (stages, state, console, save_state,
lane_runner, close, log_dir, jobs, progress) with stages that sleep, fail or kill their
worker, so the scheduler is checked in seconds; the demo's own stages run through the same
code in tests/demo/test_run.py's slow test (two lanes against one, identical numbers).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import pytest

from megatron_lopd.demo.lanes import DemoStageError, Stage, run_in_lanes, run_plan


class ToyRunner:
    def __init__(self, root: str, plan: str, jobs: int = 2):
        self.root, self.plan, self.jobs, self.progress = Path(root), plan, jobs, False
        self.state: dict = {"stages": {}}
        self.lines: list[str] = []

    def console(self, line: str) -> None:
        self.lines.append(line)

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "state.json").write_text(json.dumps(self.state))

    def lane_runner(self):
        return functools.partial(ToyRunner, str(self.root), self.plan, self.jobs)

    def close(self) -> None:
        pass

    def stages(self) -> list[Stage]:
        def sleep(name: str, seconds: float):
            def run():
                print(f"{name} says hello")  # must land in the stage's log
                t0 = time.time()
                time.sleep(seconds)
                return {"start": t0, "end": time.time(), "pid": os.getpid()}
            return run

        def fail():
            raise ValueError("boom")

        second = {"ok": sleep("b", 1.5), "fail": fail, "die": lambda: os._exit(3)}[self.plan]
        return [
            Stage("a", "first", sleep("a", 0.2)),
            Stage("b", "second", second, (), ("a",)),
            Stage("c", "beside b", sleep("c", 1.5), (), ("a",)),
            Stage("d", "last", sleep("d", 0.1), (), ("b", "c")),
        ]


def _numbers(runner: ToyRunner) -> dict[str, str]:
    return {st.name: f"[{i}/4] {st.name}" for i, st in enumerate(runner.stages(), 1)}


def test_lanes_keep_the_order_overlap_and_log(tmp_path):
    runner = ToyRunner(str(tmp_path), "ok")
    run_in_lanes(runner, runner.stages(), _numbers(runner))
    st = runner.state["stages"]
    assert list(st) == ["a", "b", "c", "d"] or list(st) == ["a", "c", "b", "d"]
    assert st["a"]["end"] <= min(st["b"]["start"], st["c"]["start"]) and max(st["b"]["end"], st["c"]["end"]) <= st["d"]["start"]
    assert st["b"]["start"] < st["c"]["end"] and st["c"]["start"] < st["b"]["end"] and st["b"]["pid"] != st["c"]["pid"]  # side by side
    assert json.loads((tmp_path / "state.json").read_text()) == runner.state  # saved after every stage
    assert "b says hello" in (tmp_path / "logs" / "b.log").read_text() and not any("hello" in line for line in runner.lines)
    assert runner.lines[0] == "[1/4] a first" and any(line.strip().startswith("d done in") for line in runner.lines)

    # One lane, in this process: the same stages, the same order constraints, nothing to redo on a second call.
    serial = ToyRunner(str(tmp_path / "serial"), "ok", jobs=1)
    run_plan(serial, serial.stages())
    assert list(serial.state["stages"]) == ["a", "b", "c", "d"] and {r["pid"] for r in serial.state["stages"].values()} == {os.getpid()}
    serial.lines.clear()
    run_plan(serial, serial.stages())
    assert len(serial.lines) == 4 and all("skipped" in line for line in serial.lines)


@pytest.mark.parametrize("plan, message", [
    ("fail", r"demo stage b failed: ValueError: boom; traceback in .*b\.log; fix it and rerun with --resume"),
    ("die", r"demo stage b: its worker process died \(exit code 3\); log: .*b\.log; rerun with --resume"),
])
def test_a_failed_stage_stops_the_plan_and_keeps_what_finished(tmp_path, plan, message):
    runner = ToyRunner(str(tmp_path), plan)
    with pytest.raises(DemoStageError, match=message):
        run_in_lanes(runner, runner.stages(), _numbers(runner))
    st = runner.state["stages"]
    assert "a" in st and "b" not in st and "d" not in st  # d needs b: never started
    if plan == "fail":
        assert "c" in st  # the stage running beside the failure finished and is kept for --resume
        assert "ValueError: boom" in (tmp_path / "logs" / "b.log").read_text()
        assert any("b FAILED: ValueError: boom" in line for line in runner.lines)
    assert json.loads((tmp_path / "state.json").read_text()) == runner.state
