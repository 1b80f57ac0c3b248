"""Long evaluations survive their output and their process: `--out` is checked writable before
the model is loaded, samples are committed batch by batch, a rerun of the same command resumes
(finished problems are not sampled again, the result is identical to an uninterrupted run's), a
rerun with other settings is refused naming them, two writers of one output are refused, and
OS errors (full disk, a file where a directory belongs) are one line, not a traceback.

Real components throughout: the tiny trained adder (conftest) on the transformers backend,
sampling at temperature 1 so that every sample depends on its seed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_lopd.cli import main
from megatron_lopd.errors import ConsistencyError
from megatron_lopd.evaluation import EvalConfig, Shard, evaluate, load_problems, read_results

PATTERN = r"#(-?\d+)"
K, BATCH = 3, 6  # 2 problems per generate call: 10 batches for the 20 problems
SETTINGS = dict(samples_per_problem=K, max_tokens=8, temperature=1.0, top_p=1.0, seed=5, grader="regex", answer_pattern=PATTERN,
                backend="hf", batch_samples=BATCH)
ROOT = Path(__file__).resolve().parents[2]


def cli_args(model, data, out, *extra):
    return ["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--backend", "hf", "-k", str(K),
            "--temperature", "1.0", "--top-p", "1.0", "--max-tokens", "8", "--seed", "5", "--grader", "regex",
            "--answer-pattern", PATTERN, "--batch-samples", str(BATCH), "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(adder_model_dir, adder_data, tmp_path_factory):
    """An uninterrupted CLI run: what every resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    assert main(cli_args(adder_model_dir, adder_data[0], out)) == 0
    records, summary = read_results(out)
    assert len(records) == K * len(adder_data[1])
    assert 0 < summary.avg_at_k < 1  # sampled: some right, some wrong
    return (out / "samples.jsonl").read_bytes(), summary


class Recorder:
    """Records which problems the real transformers backend samples (and that a backend was loaded)."""

    def __init__(self, monkeypatch):
        from megatron_lopd.generation import backends
        from megatron_lopd.generation.hf_backend import HfBackend

        self.generated: list[int] = []
        self.loads = 0
        real_generate, real_load = HfBackend.generate, backends.load_backend

        def generate(backend, prompts, params, prompt_indices=None):
            self.generated.extend(prompt_indices)
            return real_generate(backend, prompts, params, prompt_indices=prompt_indices)

        def load_backend(*args, **kwargs):
            self.loads += 1
            return real_load(*args, **kwargs)

        monkeypatch.setattr(HfBackend, "generate", generate)
        monkeypatch.setattr(backends, "load_backend", load_backend)


def _one_error_line(capsys) -> str:
    """The error as the last and only error line on stderr (progress bars of model loading aside), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("lopd eval: error: ") and err.strip().endswith(lines[0]), err
    return lines[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lopd.lock"}


# ----------------------------------------------------------------------------- unwritable outputs


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_unwritable_out_fails_in_one_line_before_the_model_is_loaded(case, adder_model_dir, adder_data, tmp_path, monkeypatch, capsys, request):
    from megatron_lopd.generation import backends

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(backends, "load_backend", no_loading)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    if case == "file":
        out, expect = blocker, f"{blocker} is a file, not a directory"
    elif case == "under_file":
        out, expect = blocker / "eval", f"{blocker / 'eval'}: Not a directory"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        if os.geteuid() != 0:
            ro.chmod(0o555)
            expect = f"{ro / 'eval'}: Permission denied"
        elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
            request.addfinalizer(lambda: subprocess.run(["umount", str(ro)], check=True))
            expect = f"{ro / 'eval'}: Read-only file system"
        else:
            pytest.skip("root writes into read-only directories and cannot mount a read-only file system here")
        out = ro / "eval"
    assert main(cli_args(adder_model_dir, adder_data[0], out)) == 2
    line = _one_error_line(capsys)
    assert expect in line and "--out" in line and "(fix: " in line
    assert blocker.read_text() == "a file\n"


def test_full_disk_mid_run_is_one_line_and_the_committed_batches_resume(adder_model_dir, adder_data, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if str(dst).startswith(str(out)) and not Path(dst).name.startswith(".lopd"):
            calls.append(dst)
            if len(calls) > 2:  # the disk fills up after two commits
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(cli_args(adder_model_dir, adder_data[0], out)) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "No space left on device" in line and "free space" in line and "rerun" in line
    monkeypatch.setattr(os, "replace", real_replace)

    recorder = Recorder(monkeypatch)
    assert main(cli_args(adder_model_dir, adder_data[0], out)) == 0
    assert "resuming" in capsys.readouterr().err
    done_before = len(adder_data[1]) - len(recorder.generated)
    assert done_before > 0 and recorder.generated == list(range(done_before, len(adder_data[1])))
    assert (out / "samples.jsonl").read_bytes() == reference[0]
    assert read_results(out)[1].results() == reference[1].results()


# ----------------------------------------------------------------------------- crash and resume

KILL_AFTER_2_BATCHES = textwrap.dedent(
    """
    import ast, os, signal, sys
    from megatron_lopd.evaluation import EvalConfig, evaluate, load_problems
    from megatron_lopd.generation.backends import load_backend

    model, data, out, settings = sys.argv[1], sys.argv[2], sys.argv[3], ast.literal_eval(sys.argv[4])
    backend = load_backend("hf", model, dtype="float32", seed=settings["seed"])
    real_generate, calls = backend.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two batches are committed: die without any cleanup
            os.kill(os.getpid(), signal.SIGKILL)
        return real_generate(*args, **kwargs)

    backend.generate = generate
    evaluate(model, load_problems(data), config=EvalConfig(**settings), backend=backend, out_dir=out, progress=False)
    """
)


def test_killed_run_resumes_to_the_identical_result_and_other_settings_are_refused(
    adder_model_dir, adder_data, reference, tiny_hf_dir, tmp_path, monkeypatch, capsys
):
    data, rows = adder_data
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_2_BATCHES, str(adder_model_dir), str(data), str(out), repr(SETTINGS)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "samples.jsonl").exists() and not (out / "summary.json").exists()
    assert (out / ".lopd.lock").exists()  # the dead process's lock: taken over below

    # Other settings into the same --out: refused in one line naming what differs, before loading the model.
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    before = _tree(out)
    recorder = Recorder(monkeypatch)
    for extra, named in (
        (["--temperature", "0.7"], "temperature"),
        (["-k", "2"], "samples_per_problem"),
        (["--grader", "exact"], "grader"),
        (["--seed", "6"], "seed"),
        (["--model", str(tiny_hf_dir)], "model"),
        (["--data", str(other_data)], "data"),
    ):
        assert main(cli_args(adder_model_dir, data, out, *extra)) == 2, extra
        line = _one_error_line(capsys)
        differs = line.split(f"{out}: holds an evaluation with other settings (", 1)[1]
        assert differs.startswith(f"{named} ") and "--overwrite" in line, (extra, line)
    assert recorder.loads == 0 and _tree(out) == before

    # The same command resumes: only the unfinished problems are sampled, the result is the uninterrupted run's.
    assert main(cli_args(adder_model_dir, data, out)) == 0
    err = capsys.readouterr().err
    assert f"resuming: 4 of {len(rows)} problems done" in err
    assert recorder.generated == list(range(4, len(rows))) and recorder.loads == 1
    assert (out / "samples.jsonl").read_bytes() == reference[0]
    assert read_results(out)[1].results() == reference[1].results()
    assert not (out / ".lopd.lock").exists()  # released
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "samples.jsonl", "summary.json"]  # progress cleaned up

    # Once finished: the same command samples nothing; other settings are still refused; --overwrite starts afresh.
    recorder.generated.clear()
    assert main(cli_args(adder_model_dir, data, out)) == 0
    assert recorder.generated == [] and recorder.loads == 1  # a finished run: not even the model is loaded
    assert (out / "samples.jsonl").read_bytes() == reference[0]
    assert main(cli_args(adder_model_dir, data, out, "--temperature", "0.7")) == 2
    assert "temperature 1.0 -> 0.7" in _one_error_line(capsys)
    assert main(cli_args(adder_model_dir, data, out, "-k", "2", "--overwrite")) == 0
    assert recorder.generated == list(range(len(rows)))
    assert len(read_results(out)[0]) == 2 * len(rows)


class Crash(RuntimeError):
    pass


def test_sharded_run_resumes_and_merges_to_the_unsharded_result(adder_model_dir, adder_data, reference, tmp_path):
    from megatron_lopd.generation.backends import load_backend

    problems = load_problems(adder_data[0])
    config = EvalConfig(**SETTINGS)
    backend = load_backend("hf", adder_model_dir, dtype="float32", seed=5)
    real_generate = backend.generate
    try:
        calls = []

        def crashing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise Crash("node lost")
            return real_generate(*args, **kwargs)

        backend.generate = crashing
        with pytest.raises(Crash):
            evaluate(adder_model_dir, problems, config=config, backend=backend, out_dir=tmp_path, shard=Shard(0, 2), progress=False)
        shard0 = tmp_path / Shard(0, 2).dirname
        assert not (shard0 / "summary.json").exists() and not (shard0 / ".lopd.lock").exists()
        generated = []

        def recording(prompts, params, prompt_indices=None):
            generated.extend(prompt_indices)
            return real_generate(prompts, params, prompt_indices=prompt_indices)

        backend.generate = recording
        s1 = evaluate(adder_model_dir, problems, config=config, backend=backend, out_dir=tmp_path, shard=Shard(1, 2), progress=False)
        assert s1.shard == {"index": 1, "count": 2} and not (tmp_path / "summary.json").exists()
        generated.clear()
        merged = evaluate(adder_model_dir, problems, config=config, backend=backend, out_dir=tmp_path, shard=Shard(0, 2), progress=False)
        assert generated == Shard(0, 2).indices(len(problems))[2:]  # shard 0's first batch (2 problems) was kept
        # A shard of other settings into the same --out is refused.
        with pytest.raises(ConsistencyError, match="temperature 1.0 -> 0.5"):
            evaluate(adder_model_dir, problems, config=EvalConfig(**{**SETTINGS, "temperature": 0.5}), backend=backend, out_dir=tmp_path,
                     shard=Shard(1, 2), progress=False)
    finally:
        backend.close()
    assert merged.shard is None and merged.results() == reference[1].results()
    assert (tmp_path / "samples.jsonl").read_bytes() == reference[0]


# ----------------------------------------------------------------------------- one writer

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from megatron_lopd.runtime.files import OutputLock
    OutputLock(sys.argv[1], "test").acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_two_writers_of_one_output_are_refused(adder_model_dir, adder_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shard0 = out / Shard(0, 2).dirname
    shard0.mkdir(parents=True)
    holders = [subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(d / ".lopd.lock")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
               for d in (out, shard0)]
    try:
        for h in holders:
            assert h.stdout.readline().strip() == "held"
        recorder = Recorder(monkeypatch)
        assert main(cli_args(adder_model_dir, adder_data[0], out)) == 2
        line = _one_error_line(capsys)
        assert f"in use by pid {holders[0].pid}" in line and str(out) in line
        assert main(cli_args(adder_model_dir, adder_data[0], out, "--shard", "0/2")) == 2
        assert f"in use by pid {holders[1].pid}" in _one_error_line(capsys)
        assert recorder.loads == 0
        # Another shard of the same output is a different writer: it runs (the merge waits for shard 0).
        assert main(cli_args(adder_model_dir, adder_data[0], out, "--shard", "1/2")) == 0
        assert (out / Shard(1, 2).dirname / "summary.json").is_file() and not (out / "summary.json").exists()
    finally:
        for h in holders:
            h.kill()
            h.wait()
