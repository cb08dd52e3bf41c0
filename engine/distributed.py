"""The engine's process groups: joining them (torchrun's environment, or a group the caller
made), the trunk's DDP gradient hook, an orderly teardown, and ranks spawned on one machine
(`engine demo`, the multi-rank tests).

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

import datetime
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import Config


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


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"
    group: object = None  # the trunk's data-parallel group (None: the default group)
    head_group: object = None  # the head's vocabulary-parallel group: the same ranks, its own communicator
    owned: bool = False  # this module initialised the default group (and destroys it)
    collective_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def close(self, orderly: bool = True) -> None:
        """Destroys the head's group, and the default group when this module created it."""
        head_group, self.head_group = self.head_group, None
        if self.owned:
            shutdown(head_group, orderly=orderly)
        elif head_group is not None:
            if orderly:
                dist.barrier(group=head_group)
            dist.destroy_process_group(head_group)


def init_distributed(cfg: Config) -> DistInfo:
    """Uses an initialised default group (tests, notebooks), else the torchrun environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from its rendezvous), else one process."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    owned = False
    if not dist.is_initialized() and env_world > 1:
        backend = cfg.train.dist_backend if cfg.train.dist_backend != "auto" else ("nccl" if on_gpu else "gloo")
        kwargs = {}
        if on_gpu:
            torch.cuda.set_device(local_rank)
            if backend == "nccl":
                kwargs["device_id"] = torch.device("cuda", local_rank)
        timeout = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
        store = _elastic_store(env_world, timeout)
        if store is not None:
            kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=env_world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        owned = True
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return DistInfo(local_rank=local_rank, owned=owned, backend="none")
    backend = dist.get_backend()
    info = DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, backend=backend,
                    owned=owned)
    info.head_group = dist.new_group(backend=backend)
    if on_gpu and "nccl" in backend:
        torch.cuda.set_device(local_rank)
        info.collective_device = torch.device("cuda", local_rank)
    return info


def _elastic_store(world: int, timeout: datetime.timedelta):
    """Under torchrun, the agent's store with a prefix per restart attempt. torch 2.14 reuses
    the agent's store across elastic restarts without one, so a restarted rank could read
    the dead previous worker's gloo address and fail to connect (seen on CPU with gloo)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"/engine/attempt_{attempt}", store)


@dataclass
class SumHookState:
    group: object
    dtype: str = "fp32"


def sum_allreduce_hook(state: SumHookState, bucket):
    """DDP communication hook: all-reduce SUM (no division by the world size), optionally
    in bf16 on the wire. The vocabulary-parallel head already gives each rank's features
    the gradient of the global mean, so the sum is the trunk's true gradient."""
    buf = bucket.buffer()
    wire = buf.to(torch.bfloat16) if state.dtype == "bf16" and buf.dtype != torch.bfloat16 else buf
    fut = dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=state.group, async_op=True).get_future()

    def done(f):
        out = f.value()[0]
        if out is not buf:
            buf.copy_(out)
        return buf

    return fut.then(done)
