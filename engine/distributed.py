"""The lifetime of the engine's process groups: an orderly teardown, and ranks spawned on one
machine (`engine demo`, the multi-rank tests).

Why teardown needs care (gloo, torch 2.14). A collective's Work keeps a copy of the calling
thread's thread-local state. Inside a backward pass that state holds a Python object (autograd
stashes a `contextvars.Context` there), so the gloo worker thread that drops the last
reference to such a Work must take the GIL. `destroy_process_group` only forgets a group: the
C++ group and its worker threads live on while anything still refers to it (a head or an
optimizer that kept it, an autograd graph or exception cycle that no collection has freed yet,
Triton's CPU interpreter, which after a kernel's first launch keeps references to objects its
callers held). If the
interpreter then finalises while a worker thread is still finishing its last Work (a rank
exits a few milliseconds after its last collective, on a loaded machine), that thread asks for
the GIL, is ended by `pthread_exit` inside a `noexcept` destructor, and the process dies with
"terminate called without an active exception" (SIGABRT) after its work was done.

So: `shutdown()` frees the cycles and waits for every rank before destroying the group, and
the processes this module spawns leave with `os._exit` once their results are written, never
running the interpreter's finalisation beside live gloo threads.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def shutdown(*groups, orderly: bool = True) -> None:
    """Destroys `groups` (sub-groups this process created), then the default group.

    orderly: every rank got here normally; the ranks meet in a barrier first, so none
    leaves while a peer is still inside a collective with it. After an error, a peer may be
    gone or stuck, and a barrier would wait for it until the timeout: skip it."""
    if not dist.is_initialized():
        return
    # Cycles (autograd graphs, exception tracebacks) may hold the only other references to a
    # group; freeing them now lets destroy_process_group join its worker threads.
    gc.collect()
    if orderly and dist.get_world_size() > 1:
        dist.barrier()
    for group in groups:
        if group is not None:
            dist.destroy_process_group(group)
    dist.destroy_process_group()
    gc.collect()


class RanksFailed(RuntimeError):
    """A spawned rank raised, died or did not finish in time."""


def _rank_main(rank: int, world: int, rendezvous: str, job: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        job(rank, world, *args)
    except BaseException:
        # torch.multiprocessing reports the traceback to the parent; the peers' collectives fail
        # or time out, so no barrier here.
        shutdown(orderly=False)
        raise
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(job: Callable, world: int, workdir: str, *args, timeout_s: float = 300.0) -> None:
    """Runs job(rank, world, *args) on `world` gloo ranks on this machine (spawned processes,
    a file rendezvous in `workdir`); raises RanksFailed if a rank raises, dies or hangs.

    A job passes results back through files; it must be importable (a module-level function)."""
    os.makedirs(workdir, exist_ok=True)
    rendezvous = os.path.join(workdir, f".rendezvous-{os.getpid()}-{time.monotonic_ns()}")
    ctx = mp.start_processes(_rank_main, args=(world, rendezvous, job, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise RanksFailed(f"{getattr(job, '__name__', job)} on {world} ranks did not finish in "
                                  f"{timeout_s:.0f} s: a rank hung")
    except mp.ProcessException as e:
        raise RanksFailed(f"{getattr(job, '__name__', job)} on {world} ranks failed: "
                          f"{''.join(traceback.format_exception_only(e)).strip()}") from e
    finally:
        if os.path.exists(rendezvous):
            os.remove(rendezvous)
