"""Code grader throughput: sandboxed programs graded per second, at several worker counts.

    python benchmarks/bench_code_grader.py [--programs 200] [--tests 1] [--workers 1,2,4,8] [--out results.json]

Every program is trivial (`print(<its number>)`, each test expecting that line), so the
figure is the sandbox's and the grader's own cost per program: a fork from the fork
server, fresh user / pid / mount / network namespaces, the harness, the comparison. The
same programs are graded at each worker count (`grade_batch`, as `lopd eval --code-workers`
does), after a warm-up that starts the fork server. Reported per worker count: programs/s
(wall clock) and the CPU time one program costs, this process's plus the sandbox's (the
fork server and everything it forked, from /proc), which bounds throughput on idle cores
at cores / CPU-per-program. The machine's load average is printed too: other work on the
machine takes cores from the sandboxes and shows up as lower programs/s, not as more CPU.
Exits 1 if any program was graded wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lopd.evaluation.graders import CodeGrader, grade_batch  # noqa: E402
from megatron_lopd.evaluation.sandbox import SandboxConfig  # noqa: E402


def cpu_seconds(server_pid: int) -> tuple[float, float]:
    """(this process, the fork server with all it forked and reaped) CPU seconds so far."""
    fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
    server = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime, server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--tests", type=int, default=1, help="tests per program (all in one sandboxed process)")
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    grader = CodeGrader(SandboxConfig())
    items = []
    for i in range(args.programs):
        answer = json.dumps({"tests": [{"input": "", "output": f"{i}\n"}] * args.tests})
        items.append((grader.prepare(answer), f"```python\nprint({i})\n```"))
    grade_batch(grader, items[:4], workers=2)  # warm-up: the fork server starts
    server_pid = grader._sandbox.fork_server_pid
    print(f"{args.programs} trivial programs x {args.tests} test(s); {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.2f}; isolated: {grader._sandbox.isolated}")
    rows, failed = [], False
    for workers in (int(w) for w in args.workers.split(",")):
        own0, server0 = cpu_seconds(server_pid)
        start = time.perf_counter()
        verdicts = grade_batch(grader, items, workers=workers)
        elapsed = time.perf_counter() - start
        own1, server1 = cpu_seconds(server_pid)
        wrong = sum(not v.correct for v in verdicts)
        failed |= wrong > 0
        row = {
            "workers": workers,
            "programs_per_s": args.programs / elapsed,
            "cpu_ms_per_program": 1000 * ((own1 - own0) + (server1 - server0)) / args.programs,
            "evaluator_cpu_ms_per_program": 1000 * (own1 - own0) / args.programs,
            "wrong": wrong,
            "load_average": os.getloadavg()[0],
        }
        rows.append(row)
        print(f"workers {workers}: {row['programs_per_s']:6.1f} programs/s | CPU per program {row['cpu_ms_per_program']:5.1f} ms "
              f"(evaluator {row['evaluator_cpu_ms_per_program']:.1f} ms) | load average {row['load_average']:.2f}"
              + (f" | {wrong} GRADED WRONG" if wrong else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"programs": args.programs, "tests": args.tests, "cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
