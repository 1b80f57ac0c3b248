"""A real local SLURM for the launch tests: installed with apt-get, started, torn down by PID.

Daemons (munged, MariaDB + slurmdbd for `sacct`, slurmctld, slurmd) are started by
`start_local_slurm.sh` under `setsid`, each PID recorded under `<root>/run/`;
`stop_local_slurm.sh` kills exactly those PIDs. Nothing is written to /etc: every client
call gets `SLURM_CONF` from `LocalSlurm.env()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
# One binary per package: a missing one means the package is missing.
_BINARIES = (
    "/usr/sbin/slurmctld",
    "/usr/sbin/slurmd",
    "/usr/bin/sbatch",
    "/usr/sbin/munged",
    "/usr/sbin/slurmdbd",
    "/usr/sbin/mariadbd",
)
_POLICY_RC = Path("/usr/sbin/policy-rc.d")


def missing_binaries() -> list[str]:
    return [b for b in _BINARIES if not os.access(b, os.X_OK)]


def ensure_installed(log: Path) -> str | None:
    """Install the Debian packages when missing. Returns None when SLURM is usable, else the reason why not."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed ({', '.join(missing_binaries())} missing) and installing needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get (not a Debian system)"
    # No systemd here: a policy-rc.d that refuses service starts keeps the packages' postinst
    # scripts from trying to start daemons (we start our own, by PID).
    own_policy = not _POLICY_RC.exists()
    if own_policy:
        _POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        _POLICY_RC.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        with open(log, "w") as out:
            for cmd in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
            ):
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900).returncode
                if rc != 0:
                    return f"`{' '.join(cmd)}` failed (exit {rc}); see {log}: {_tail(log)}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"installing SLURM failed: {exc}"
    finally:
        if own_policy:
            _POLICY_RC.unlink(missing_ok=True)
    missing = missing_binaries()
    return f"after apt-get install still missing: {', '.join(missing)}" if missing else None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class LocalSlurm:
    """One local SLURM cluster. `cpus`/`gpus` are advertised (fake GPUs) so that 8-GPU scripts schedule."""

    root: Path
    cpus: int = 16
    gpus: int = 8
    partitions: tuple[str, ...] = ("debug",)
    nodes: int = 1
    started: bool = field(default=False, init=False)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(
            SLURM_CONF=str(self.root / "etc" / "slurm.conf"),
            SLURM_LOCAL_ROOT=str(self.root),
            SLURM_LOCAL_ETC="0",
            SLURM_LOCAL_CPUS=str(self.cpus),
            SLURM_LOCAL_GPUS=str(self.gpus),
            SLURM_LOCAL_PARTITIONS=" ".join(self.partitions),
            SLURM_LOCAL_NODES=str(self.nodes),
        )
        return env

    def start(self) -> None:
        # A cluster left behind under the same root (a killed test session) is stopped by its
        # recorded PIDs and purged, so every session starts from empty state.
        self.stop(purge=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.started = True
        proc = subprocess.run(
            ["bash", str(HERE / "start_local_slurm.sh")], env=self.env(), capture_output=True, text=True, timeout=180
        )
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"start_local_slurm.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def stop(self, purge: bool = False) -> str:
        if not (self.root / "run").is_dir():
            return ""
        env = self.env()
        if purge:
            env["PURGE"] = "1"
        proc = subprocess.run(
            ["bash", str(HERE / "stop_local_slurm.sh")], env=env, capture_output=True, text=True, timeout=180
        )
        self.started = False
        return proc.stdout + proc.stderr

    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ client helpers
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def cancel(self, *job_ids: str) -> None:
        """Cancel jobs a failed test left behind, so that they do not block the next test."""
        if job_ids:
            self.run("scancel", *[str(j) for j in job_ids], check=False)

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (kept for MinJobAge=600 s after the job ends)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def state(self, job_id: str) -> str:
        """Current state of a job (scontrol knows recent jobs; sacct is the fallback)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for tok in proc.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        proc = self.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False)
        return (proc.stdout.strip().splitlines() or ["UNKNOWN"])[0].split()[0]

    def wait(self, job_id: str, timeout: float = 300, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in until:
                return state
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} still {self.state(job_id)} after {timeout:.0f}s")

    def jobs(self, first: int = 0) -> list[dict[str, str]]:
        """Accounting records (sacct) of the jobs with id >= first, in id order."""
        fields = ("JobID", "JobName", "State", "Start", "End", "ExitCode")
        # A state filter with an explicit window: without one, sacct leaves out jobs that never
        # started (e.g. CANCELLED because a dependency failed).
        states = "PD,R,RQ,CA,CD,F,TO,NF,PR,OOM,BF,DL"
        proc = self.run("sacct", "-n", "-X", "-P", "-S", "2000-01-01", "-E", "now", "-s", states, "-o", ",".join(fields))
        rows = [dict(zip(fields, line.split("|"))) for line in proc.stdout.strip().splitlines() if line]
        rows = [r for r in rows if r["JobID"].split("_")[0].isdigit() and int(r["JobID"].split("_")[0]) >= first]
        for r in rows:
            r["State"] = r["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            r["stage"] = r["JobName"].rsplit(".", 1)[-1]  # nemo-run names jobs <account>-<suffix>.<task>
        return sorted(rows, key=lambda r: int(r["JobID"].split("_")[0]))

    def next_job_id(self) -> int:
        ids = [int(r["JobID"].split("_")[0]) for r in self.jobs()]
        return max(ids, default=0) + 1
