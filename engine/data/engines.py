"""Where the builder's tasks run: `local` (a process pool on this machine) or `ray`
(Ray Data on a cluster; a local one is started when no address is given).

Every stage of a build is a list of independent tasks (plain dicts) and one
top-level function that reads its inputs from files and writes its outputs to
files (engine.data.scan / plan / write). An engine only decides where each call
runs, so both engines run the very same code on the very same tasks, and the
outputs are byte-identical. Results come back to the driver as they finish, for
progress; they are small (counts, never rows).
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import sys
from typing import Callable, Iterator, Optional

ENGINES = ("local", "ray")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Call:
    """Runs fn on a task, returning its result with the worker's pid and peak memory."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, task):
        result = self.fn(task)
        return {"result": result, "pid": os.getpid(), "peak_rss": peak_rss_bytes()}


class LocalEngine:
    """A process pool, started at the first stage that has more than one task and kept
    for the following stages (a worker imports torch, pyarrow and DALI once per build)."""

    name = "local"

    def __init__(self, workers: int = 0, start_method: str = "auto"):
        self.workers = workers if workers > 0 else (os.cpu_count() or 1)
        self.start_method = start_method
        self.peak_rss: dict[int, int] = {}  # pid -> peak bytes, over every task run so far
        self._pool = None

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()  # the stages are over; terminate also ends a pool left by an error
            self._pool.join()
            self._pool = None

    def map(self, fn: Callable, tasks: list) -> Iterator:
        """fn over tasks, in subprocesses when workers > 1; yields results as they come."""
        call = _Call(fn)
        if self.workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                yield self._note(call(t))
            return
        if self._pool is None:
            import multiprocessing as mp

            from engine.data.scan import worker_init

            ctx = mp.get_context(_start_method(self.start_method))
            self._pool = ctx.Pool(self.workers, initializer=worker_init)
        for r in self._pool.imap_unordered(call, tasks):
            yield self._note(r)

    def _note(self, r: dict):
        self.peak_rss[r["pid"]] = max(self.peak_rss.get(r["pid"], 0), r["peak_rss"])
        return r["result"]


class RayEngine:
    """Each stage is a Ray Dataset of tasks mapped by the stage's function; Ray Data
    schedules the calls over the cluster's CPUs and retries a call whose worker dies."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, workers: int = 0):
        self.address = address
        self.workers = workers
        self.peak_rss: dict[int, int] = {}
        self._started = False

    def __enter__(self) -> "RayEngine":
        try:
            import ray
        except ImportError as e:
            raise RuntimeError(f"engine='ray' needs Ray Data: pip install 'ray[data]' ({e})") from None
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.workers if self.workers > 0 else (os.cpu_count() or 1), **kwargs)
            self._started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the builder draws one progress line per stage
        ctx.verbose_progress = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a log line per stage on the driver
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def map(self, fn: Callable, tasks: list) -> Iterator:
        if not tasks:
            return
        import ray

        call = _Call(fn)
        items = [{"task": pickle.dumps(t)} for t in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(lambda row: {"out": pickle.dumps(call(pickle.loads(row["task"])))}, num_cpus=1)
        for row in ds.iter_rows():
            r = pickle.loads(row["out"])
            self.peak_rss[r["pid"]] = max(self.peak_rss.get(r["pid"], 0), r["peak_rss"])
            yield r["result"]


def make_engine(name: str, workers: int = 0, start_method: str = "auto", address: Optional[str] = None):
    if name == "local":
        if address:
            raise ValueError("address is for engine='ray'; the local engine runs on this machine")
        return LocalEngine(workers, start_method)
    if name == "ray":
        return RayEngine(address, workers)
    raise ValueError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")


def _start_method(method: str) -> str:
    """spawn, unless the caller is a script that spawn would re-run: a spawned worker
    imports the main script, and an unguarded build() call there would start the
    build again in every worker. Such a caller gets fork (it has run no DALI
    pipeline, the one thing a forked worker must not inherit; see scan.worker_init)."""
    if method != "auto":
        return method
    import __main__

    path = getattr(__main__, "__file__", None)
    if path is None or getattr(__main__, "__spec__", None) is not None:  # interactive, or python -m
        return "spawn"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            guarded = "__main__" in f.read()
    except OSError:
        guarded = True
    if guarded:
        return "spawn"
    print(f"engine data build: {path} calls build() outside an `if __name__ == '__main__':` guard; "
          "forking the worker processes instead of spawning them", file=sys.stderr)
    return "fork"


def todo(tasks: list, out_key: str = "out") -> list:
    """The tasks whose output file does not exist yet (a resumed stage)."""
    return [t for t in tasks if not os.path.isfile(t[out_key])]


def stream_stage(engine, fn: Callable, tasks: list, desc: str, enabled: bool, total: int, initial: int = 0,
                 weight: Callable = lambda r: 1, note: Optional[Callable] = None) -> Iterator:
    """fn over tasks on the engine, yielding results as they come, with one progress
    line for the stage across the cluster; `note(result)` returns text shown after the
    bar (e.g. rejections by reason)."""
    from engine.data._progress import Progress

    with Progress(total, desc, enabled=enabled, initial=initial) as bar:
        for r in engine.map(fn, tasks):
            if note is not None:
                bar.note = note(r)
            bar.update(weight(r))
            yield r


def run_stage(*args, **kwargs) -> list:
    return list(stream_stage(*args, **kwargs))
