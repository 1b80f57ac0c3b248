"""cli/__init__.py: what a user sees when the file system says no. A full disk, a read-only
output and a file where a directory belongs are one line naming the path and the fix, with a
non-zero exit, in `convert` and `train` (generate, score and eval have their own tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LOPD = str(Path(sys.executable).parent / "lopd")


def _lopd(*args: str) -> tuple[int, list[str]]:
    proc = subprocess.run([LOPD, *map(str, args)], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lopd ")]
    return proc.returncode, lines


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (root only; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_os_errors_are_one_line(tmp_path, tiny_hf_dir, tiny_disk):
    ckpt = tmp_path / "ckpt"
    assert _lopd("convert", "from-hf", "--hf-dir", tiny_hf_dir, "--out", ckpt)[0] == 0
    (tmp_path / "file").write_text("x")

    # full disk in the middle of writing the export
    rc, lines = _lopd("convert", "to-hf", "--checkpoint", ckpt, "--out", tiny_disk / "hf")
    assert rc == 2 and len(lines) == 1, lines
    assert "No space left on device (fix: free space on that file system or write elsewhere)" in lines[0]
    assert lines[0].startswith(f"lopd convert: error: {tiny_disk}") or "writing under" in lines[0]

    # a file where the output directory belongs; a path under a file; a place nobody may write
    rc, lines = _lopd("convert", "from-hf", "--hf-dir", tiny_hf_dir, "--out", tmp_path / "file")
    assert rc == 2 and lines == [f"lopd convert: error: checkpoint output --out {tmp_path / 'file'} is a file, not a directory "
                                 "(fix: pass a directory path to --out)"]
    rc, lines = _lopd("convert", "to-hf", "--checkpoint", ckpt, "--out", tmp_path / "file" / "hf")
    assert rc == 2 and len(lines) == 1 and "Not a directory (fix: a file stands where a directory is expected" in lines[0], lines
    rc, lines = _lopd("convert", "from-hf", "--hf-dir", tiny_hf_dir, "--out", "/sys/fs/lopd-ckpt")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("lopd convert: error: checkpoint output --out /sys/fs/lopd-ckpt: ")
    assert lines[0].endswith("(fix: choose a directory you can write, or fix its permissions)")

    # train: the run dir is checked before any model or data is read
    rc, lines = _lopd("train", "--config", "tiny_cpu", "run_dir=/sys/fs/lopd-run", f"model.start_from={tiny_hf_dir}",
                      f"data.store={tmp_path / 'no-store'}")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lopd train: error: run_dir /sys/fs/lopd-run: "), lines
    assert lines[0].endswith("(fix: choose a directory you can write, or fix its permissions)")
    rc, lines = _lopd("train", "--config", "tiny_cpu", f"run_dir={tmp_path / 'file'}", f"model.start_from={tiny_hf_dir}",
                      f"data.store={tmp_path / 'no-store'}")
    assert rc == 2 and lines == [f"lopd train: error: run_dir={tmp_path / 'file'} is a file (fix: pass a directory path as run_dir)"]
