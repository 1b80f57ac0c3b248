"""Real file-system faults for tests: a full and a read-only file system (small tmpfs mounts).

Mounting needs root (CAP_SYS_ADMIN), which CI containers here have; elsewhere the tests skip.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, *, size_kb: int = 256, read_only: bool = False, fill: bool = False, leave_kb: int = 0):
    """Mount a tmpfs of ``size_kb`` at ``path``; ``fill``: then fill it up, leaving ``leave_kb`` free."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        if fill:
            fd = os.open(path / ".filler", os.O_WRONLY | os.O_CREAT, 0o644)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.truncate(path / ".filler", max(0, os.path.getsize(path / ".filler") - leave_kb * 1024))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
