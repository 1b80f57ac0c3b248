"""Run a function on N gloo ranks (separate processes) and collect what each returns.

Process start-up plus `import megatron.core` costs ~5 s per launch, so each test that
uses this should check many things in one launch. `fn` must be a module-level function
(it is pickled into spawned processes); it receives the rank-local keyword arguments and
runs after torch.distributed is initialised via the project's runtime module.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, kwargs: dict, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle serialises tensors by value: torch's queue pickler would pass them via
        # shared memory, which is gone once this process exits before the parent reads them.
        queue.put((rank, True, pickle.dumps(fn(**kwargs))))
    except BaseException:  # report everything, including SystemExit from a CLI
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron_lopd.runtime import destroy_distributed

                destroy_distributed()
            except Exception:
                pass


def run_distributed(fn, world_size: int = 2, timeout: float = 600.0, **kwargs) -> list:
    """Returns [result of rank 0, result of rank 1, ...]; raises with the rank's traceback.

    `free_port` closes its socket before rank 0 binds the port, so another process can take it
    in between (seen once in CI: EADDRINUSE at the rendezvous). Only that failure is retried,
    with a fresh port, at most twice; every other failure is raised at once."""
    for _ in range(2):
        try:
            return _run_distributed_once(fn, world_size, timeout, **kwargs)
        except AssertionError as err:
            if "EADDRINUSE" not in str(err):
                raise
    return _run_distributed_once(fn, world_size, timeout, **kwargs)


def _run_distributed_once(fn, world_size: int, timeout: float, **kwargs) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, kwargs, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks are likely stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
