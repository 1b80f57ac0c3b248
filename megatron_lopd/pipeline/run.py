"""Running stages: one (`run_stage`: skipped when done, its output verified afterwards), or the
selected ones in order (`run_local`, behind `lopd pipeline run` and each job the recipes submit),
and every stage's status (`status`)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_lopd.errors import ArtifactError, ConfigError, LopdError
from megatron_lopd.pipeline.config import CONFIG_NAME, PipelineConfig
from megatron_lopd.pipeline.launch import slurm_node_topology, stage_environ, visible_gpus
from megatron_lopd.pipeline.plan import Plan, StaleError, plan, set_aside, stage_states
from megatron_lopd.pipeline.stages import Stage, StageState, build_stages, select_stages

# Runs one command given as its `lopd` arguments (or a whole argv) and returns its exit code.
Execute = Callable[[list[str]], int]


@dataclass
class StageResult:
    name: str
    status: str  # "done" (ran now / verifies), "skipped" (already done), "failed", "cancelled"; status(): "stale", "pending"
    detail: str = ""
    seconds: float = 0.0


class StageFailed(LopdError):
    """A stage's command failed or its output did not verify afterwards."""

    exit_code = 1


def run_stage(stage: Stage, log_dir: Path | None = None, echo: Callable[[str], None] = print, *,
              state: Optional[StageState] = None, execute: Optional[Execute] = None) -> StageResult:
    """Run one stage unless its output is done; verify the output afterwards. A `fresh_output`
    stage's unfinished output is removed first (only what `stage.owns` proves is its own).

    `state`: the stage's state this invocation computed already (`plan`); the output is not
    verified again. Without it, an output that verifies is done. `execute`: runs each command's
    `lopd` arguments in this process (e.g. with progress bars; no torchrun) instead of as a
    subprocess in the stage's environment (`log_dir` then receives nothing)."""
    if state is None:
        verified, detail = stage.verify_output()
        state = StageState(stage.name, "done" if verified else "pending", detail)
    if state.status == "done":
        echo(f"[pipeline] {stage.name}: already done ({state.detail}), skipped")
        return StageResult(stage.name, "skipped", state.detail)
    if stage.env.container_image and "SLURM_JOB_ID" not in os.environ:
        raise ConfigError(
            f"stage {stage.name} names container image {stage.env.container_image!r}; the local runner starts no containers",
            f"run it with the SLURM executor, or set envs.{stage.name}.venv / python instead",
        )
    if execute is not None and stage.uses_torchrun():
        raise ConfigError(f"stage {stage.name} starts torchrun ranks, which cannot run in this process", "run it as subprocesses (no execute)")
    node_rank, master_addr, master_port = slurm_node_topology() if stage.uses_torchrun() or stage.nnodes > 1 else (0, "127.0.0.1", 29500)
    if stage.fresh_output and stage.output.exists():
        from megatron_lopd.runtime.files import remove_owned_dir

        if stage.owns is None:
            raise ArtifactError(f"stage {stage.name}: {stage.output} exists and is not a finished output", f"move it away, then rerun stage {stage.name}")
        echo(f"[pipeline] {stage.name}: removing the unfinished output {stage.output}")
        remove_owned_dir(stage.output, stage.owns, "partial HF export", flag=f"stage {stage.name}")
    log = log_dir / f"{stage.name}.log" if log_dir is not None and execute is None else None
    if execute is None:
        waves, run_wave = stage.launches(node_rank, master_addr, master_port, visible_gpus()), _side_by_side(stage_environ(stage.env), log)
    else:  # in this process: one command after the other (the demo: one engine)
        waves = [[(args, env) for _step, args, env in wave] for wave in stage.waves()]
        run_wave = lambda wave: [execute(argv) for argv, _env in wave]  # noqa: E731
    t0 = time.monotonic()
    for i, wave in enumerate(waves):
        for argv, env in wave:
            echo(f"[pipeline] {stage.name}: {' '.join(f'{k}={v}' for k, v in env.items())}{' ' if env else ''}{shlex.join(argv)}")
        codes = run_wave(wave)
        failed = [(argv, rc) for (argv, _env), rc in zip(wave, codes) if rc != 0]
        engines_on_every_node = i == 0 and stage.nnodes > 1 and not stage.uses_torchrun()
        if engines_on_every_node:  # node 0 runs the rest once every node's engines ended
            _engines_barrier(stage, node_rank, failed[0][1] if failed else 0, echo)
        if failed:
            (argv, rc), where = failed[0], f"; log: {log}" if log else ""
            more = f" ({len(failed)} of {len(wave)} processes failed)" if len(wave) > 1 else ""
            raise StageFailed(f"stage {stage.name}: `{argv[0]} {' '.join(argv[1:3])} ...` exited with {rc}{more}{where}", "fix the cause and rerun: finished stages are skipped")
        if engines_on_every_node and node_rank != 0:
            break
    if node_rank != 0:
        return StageResult(stage.name, "done", "non-zero node rank", time.monotonic() - t0)
    try:
        detail = stage.check()
    except LopdError as exc:
        raise StageFailed(f"stage {stage.name} finished but its output does not verify: {exc.what}", exc.fix) from None
    seconds = time.monotonic() - t0
    echo(f"[pipeline] {stage.name}: done in {seconds:.1f}s ({detail})")
    return StageResult(stage.name, "done", detail, seconds)


def _side_by_side(environ: dict[str, str], log: Optional[Path]) -> Callable[[list], list[int]]:
    """Runs a wave's (argv, environment) processes side by side with `environ` (+ each one's own),
    their output appended to `log`; returns their exit codes. The first failure stops the others
    (SIGTERM; chunks and shards are written whole, so a rerun finishes their work)."""
    def run_wave(wave: list) -> list[int]:
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "a")
        try:
            procs = [subprocess.Popen(argv, env={**environ, **env}, stdout=out, stderr=subprocess.STDOUT if out else None)
                     for argv, env in wave]
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    for p in procs:
                        if p.poll() is None:
                            p.terminate()
                time.sleep(0.2)
            return [p.returncode for p in procs]
        finally:
            if out is not None:
                out.close()

    return run_wave


def _engines_barrier(stage: Stage, node_rank: int, rc: int, echo: Callable[[str], None], poll_s: float = 5.0) -> None:
    """Multi-node engine stages: each node records how its engines ended; node 0 waits for every
    node before the steps that need all of them (finalizing a store). A node's failure fails it."""
    from megatron_lopd.runtime.files import atomic_write

    life = f"{os.environ.get('SLURM_JOB_ID', 'local')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    root = stage.output.parent / f".{stage.name}-engines" / life
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / f"node-{node_rank}", str(rc))
    if node_rank != 0 or rc != 0:
        return
    started = last = time.monotonic()
    while True:
        ended = {p.name: p.read_text().strip() for p in root.glob("node-*")}
        failed = sorted(name for name, code in ended.items() if code != "0")
        if failed:
            raise StageFailed(f"stage {stage.name}: the engines of {', '.join(failed)} failed", "see that node's log; rerun: finished work is kept")
        if len(ended) == stage.nnodes:
            return
        if time.monotonic() - last > 60:
            echo(f"[pipeline] {stage.name}: waiting for {stage.nnodes - len(ended)} node(s) to finish ({time.monotonic() - started:.0f} s)")
            last = time.monotonic()
        time.sleep(poll_s)


def lopd_in_process(args: list[str]) -> int:
    """An `Execute` that runs `lopd ARGS` in this process: the installed `lopd` program, found by its
    entry point as a subprocess finds it on PATH (the pipeline runs `lopd` commands; it does not
    import the CLI, which imports the pipeline)."""
    from importlib.metadata import entry_points

    (lopd,) = entry_points(group="console_scripts", name="lopd")
    return lopd.load()(args)


def run_local(config: PipelineConfig, stages: Sequence[str] | str | None = None, *, log_dir: Path | None = None,
              echo: Callable[[str], None] = print, rerun_stale: bool = False, execute: Optional[Execute] = None) -> list[StageResult]:
    """Run the selected stages (default: all) in order as subprocesses, skipping finished ones.

    A finished output made from other inputs or settings than `config` asks (stale) is refused,
    or with `rerun_stale` moved aside and made again with everything downstream of it. The
    config is recorded in `<work_dir>/pipeline.json` only once these checks passed.

    Stops at the first failure: later stages are reported "cancelled" and `StageFailed`
    is raised after the summary is printed.
    """
    config = config.absolute()
    all_stages = build_stages(config)
    selected = select_stages(all_stages, stages)
    try:
        checked = plan(all_stages, selected, rerun_stale=rerun_stale)
    except StaleError as exc:
        echo("[pipeline] stale outputs (what they record vs what this config asks):\n" + "\n".join(exc.lines))
        raise
    return run_planned(config, checked, selected, log_dir=log_dir, echo=echo, execute=execute)


def run_planned(config: PipelineConfig, checked: Plan, stages: Sequence[Stage], *, log_dir: Path | None = None,
                echo: Callable[[str], None] = print, execute: Optional[Execute] = None) -> list[StageResult]:
    """`run_local` once `plan` has `checked` the (absolute) `config`: set the stale outputs aside,
    record the config, then run `stages` in order with the states the plan found."""
    set_aside(checked.stale, echo)
    config.save(Path(config.work_dir) / CONFIG_NAME)
    results: list[StageResult] = []
    for i, stage in enumerate(stages):
        try:
            results.append(run_stage(stage, log_dir, echo, state=checked.states[stage.name], execute=execute))
        except StageFailed as exc:
            results.append(StageResult(stage.name, "failed", exc.what))
            results += [StageResult(s.name, "cancelled", f"after {stage.name} failed") for s in stages[i + 1:]]
            echo(format_results(results))
            raise
    echo(format_results(results))
    return results


def status(config: PipelineConfig) -> list[StageResult]:
    """Each stage: "done" (output verifies and matches the config), "stale" (verifies, but its
    recorded inputs or settings differ from the config: the differences) or "pending" (why)."""
    return state_results(stage_states(build_stages(config.absolute())))


def state_results(states: dict[str, StageState]) -> list[StageResult]:
    """Stage states as results: the differences of a stale output, why a pending one is not done."""
    return [StageResult(name, st.status, "; ".join(st.reasons) if st.status == "stale" else st.detail) for name, st in states.items()]


def format_results(results: Sequence[StageResult]) -> str:
    width = max((len(r.name) for r in results), default=5)
    return "\n".join(f"  {r.name:<{width}}  {r.status:<9} {r.detail}" for r in results)
