"""Stage states and the plan of one invocation: which outputs are done, stale (and what differs)
or pending, and what a run does, checked before anything runs or waits in a queue.

Each output is verified once per invocation: `stage_states` and `plan` take `known`, the states
this invocation computed already (a dict they add to), and the pre-checks, the runner and the
recipe's report are handed those states instead of verifying again. A state never outlives the
invocation that computed it (a later one may find other files).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_lopd.errors import ArtifactError, ConfigError, LopdError
from megatron_lopd.pipeline.stages import Stage, StageState, downstream, upstream


def stage_state(stage: Stage, producers: dict[str, StageState]) -> StageState:
    """Verify the output, then compare its recorded provenance with the config. A stage whose
    producer is stale, or must run again, is stale too: its output was made from what gets replaced."""
    verified, detail = stage.verify_output()
    if not verified:
        return StageState(stage.name, "pending", detail)
    reasons = []
    inputs_from = {p: producers[p].status for p in dict.fromkeys(stage.producers.values()) if p in producers}
    stale = [p for p, st in inputs_from.items() if st == "stale"]
    pending = [p for p, st in inputs_from.items() if st == "pending"]
    if stale:
        reasons.append(f"upstream {'stage' if len(stale) == 1 else 'stages'} {', '.join(stale)} {'is' if len(stale) == 1 else 'are'} stale")
    if pending:
        reasons.append(f"its input from {', '.join(pending)} is not done (it will be remade)")
    if stage.provenance is not None:
        try:
            reasons += stage.provenance()
        except LopdError as exc:
            reasons.append(f"its provenance cannot be read: {exc.what}")
        except Exception as exc:
            reasons.append(f"its provenance cannot be read: {type(exc).__name__}: {exc}")
    if reasons:
        return StageState(stage.name, "stale", detail, list(dict.fromkeys(reasons)))
    return StageState(stage.name, "done", detail)


def stage_states(stages: list[Stage], names: Optional[set[str]] = None, known: Optional[dict[str, StageState]] = None) -> dict[str, StageState]:
    """States of the named stages (default: all) and of every stage upstream of them, in order.
    `known`: the states this invocation computed already; reused (not verified again) and added to."""
    known = {} if known is None else known
    by_name = {s.name: s for s in stages}
    wanted = set(by_name) if names is None else set(names)
    for stage in reversed(stages):  # add the producers' producers
        if stage.name in wanted:
            wanted.update(stage.producers.values())
    for stage in stages:
        if stage.name in wanted and stage.name not in known:
            known[stage.name] = stage_state(stage, known)
    return {s.name: known[s.name] for s in stages if s.name in wanted}


class StaleError(ConfigError):
    """Finished outputs were made from other inputs or settings than the config asks now.
    `lines`: one line per stale stage with its differences."""

    def __init__(self, what: str, fix: str | None = None, states: Optional[dict[str, "StageState"]] = None):
        super().__init__(what, fix)
        self.lines = [f"  {n}: {'; '.join(st.reasons)}" for n, st in (states or {}).items() if st.status == "stale"]


@dataclass
class Plan:
    """What a run does: `todo` the selected stages to run (pending, or stale with --rerun-stale),
    `states` each stage's state, `stale` the stale outputs a rerun sets aside first."""

    todo: list[Stage]
    states: dict[str, StageState]
    stale: list[Stage]


def plan(stages: list[Stage], selected: list[Stage], *, rerun_stale: bool = False, known: Optional[dict[str, StageState]] = None) -> Plan:
    """Before anything runs or waits in a queue: external inputs exist, every input produced by a
    stage outside this run is done (verifies and matches the config), no selected output is stale
    (or, with `rerun_stale`, every stale output and all that depends on it is part of this run), and
    the consistency checks of the inputs that stay pass. Raises a LopdError; nothing is changed.
    `known`: as for `stage_states` (filled even when this raises)."""
    running = {s.name for s in selected}
    for stage in selected:
        for key, path in stage.inputs.items():
            if stage.producers.get(key) is None and not path.exists():
                raise ArtifactError(f"stage {stage.name}: input {key} {path} does not exist", f"fix the {key} path in the pipeline config")
    names = downstream(stages, running) if rerun_stale else running
    states = stage_states(stages, names, known)
    for stage in selected:
        for key, path in stage.inputs.items():
            producer = stage.producers.get(key)
            if producer is None or producer in running:
                continue
            state = states[producer]
            if state.status == "pending":
                raise ArtifactError(
                    f"stage {stage.name} needs {key} ({path}) from stage {producer}, which is not done: {state.detail}",
                    f"run stage {producer} first (or the whole pipeline)",
                )
            if state.status == "stale":
                raise StaleError(
                    f"stage {stage.name} needs {key} ({path}) from stage {producer}, which is stale: {'; '.join(state.reasons)}",
                    f"rerun stage {producer} too (--stages {producer},{stage.name} --rerun-stale), or restore the config it was made with",
                    states,
                )
    stale = [s for s in stages if states.get(s.name) is not None and states[s.name].status == "stale"]
    if stale and not rerun_stale:
        selected_stale = [s for s in stale if s.name in running]
        if selected_stale:
            first = selected_stale[0]
            raise StaleError(
                f"{len(selected_stale)} stage(s) are stale ({', '.join(s.name for s in selected_stale)}): their outputs were made "
                f"from other inputs or settings than this config asks; {first.name}: {'; '.join(states[first.name].reasons)}",
                "`lopd pipeline status` lists every difference; rerun them with --rerun-stale (each stale output is moved "
                "to <dir>.stale-<time>, nothing is deleted), restore the old config, or use another work_dir",
                states,
            )
        stale = []
    outside = [s.name for s in stale if s.name not in running]
    if outside:
        raise StaleError(
            f"rerunning {', '.join(s.name for s in stale if s.name in running)} makes the finished outputs of "
            f"{', '.join(outside)} stale, which are not selected",
            "select them too (or all stages), so that each output matches its inputs",
            states,
        )
    todo = [s for s in selected if states[s.name].status != "done"]
    rerun = {s.name for s in stale}
    for stage in todo:
        if stage.precheck is not None and not (upstream(stages, stage) & rerun):  # inputs that are remade are checked when they are
            stage.precheck(states)
    return Plan(todo, states, stale)


def set_aside(stages: Sequence[Stage], echo: Callable[[str], None] = print) -> list[Path]:
    """Move each stale stage's output directory to `<dir>.stale-<time>` (a rerun starts clean;
    nothing is deleted). Returns the new paths."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for stage in stages:
        paths = list(stage.outputs.values())
        roots = [q for q in paths if not any(q != r and r in q.parents for r in paths)]
        for path in roots:
            if not path.exists() and not path.is_symlink():
                continue
            target = path.with_name(f"{path.name}.stale-{stamp}")
            n = 1
            while target.exists():
                target, n = path.with_name(f"{path.name}.stale-{stamp}.{n}"), n + 1
            path.rename(target)
            echo(f"[pipeline] {stage.name}: stale output moved to {target}")
            moved.append(target)
    return moved
