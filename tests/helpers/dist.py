"""Run a function on W CPU processes joined by a gloo process group, with bounded waits.

``run_workers(fn, W, *args)`` spawns W processes; each sets one thread, joins a gloo group
(MASTER_ADDR=127.0.0.1, a free port) with a 60 s collective timeout, runs
``fn(rank, W, *args)`` and reports its return value or traceback. The first failure
terminates the other workers (they may be blocked in a collective), and a run that outlives
``timeout`` seconds is killed, so a hang cannot stall the test suite. ``fn`` must be a
module-level function (it is pickled by reference).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

__all__ = ["free_port", "run_workers"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world: int, *args, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on ``world`` gloo processes -> the W return values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world)) - set(out))
                dead = [r for r in missing if procs[r].exitcode is not None]
                if dead:
                    raise AssertionError(f"ranks {dead} of {world} exited (codes "
                                         f"{[procs[r].exitcode for r in dead]}) without reporting") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {missing} of {world} did not finish within {timeout} s") from None
                continue
            if not ok:
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()) if len(out) == world else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [out[r] for r in range(world)]
