"""Checkpoints: written atomically, the last K kept, the newest loadable one found.

A checkpoint is a directory RUN_DIR/checkpoints/step_NNNNNNNN/:

    shared.pt         what every rank holds the same: the trunk's weights, its optimiser
                      state and the param groups, scheduler, grad scaler, step and counters
                      (rank 0 writes it)
    rank_NNNNN.pt     what differs per rank: its vocabulary slice of the hashtag head and
                      that slice's optimiser state, the data position (the optimizer step:
                      the same on every rank), its RNG states
    config.json       the resolved run configuration
    meta.json         step, world size, global batch, micro-batch, the head's slices, and
                      each file's size; written last

No rank gathers the head: each writes its slice, in parallel, and a job of another world
size reads the rows it owns from the files that hold them (`read_rows`). `engine export
RUN_DIR` writes the torchvision-format model.pt (trunk + full `fc`) when a user wants one.
Format 1 (engine-checkpoint/1: the gathered head in model.pt, no trunk in shared.pt) still
loads, at its own world size.

Writes run in the background (`Writer`): the step loop waits only for a copy of the state
to host memory; a thread per rank writes its files, and rank 0's thread, once every rank's
file is in place, commits the checkpoint. Why our own writer and not
torch.distributed.checkpoint's async_save: its commit is a collective of the process group
(run from the background, it would interleave with the training step's collectives on
gloo), its files are not the torch.load-able state dicts `engine eval` and users read,
and it knows nothing of the head's slices; here the commit needs no collective at all.

Atomicity: every file is written into RUN_DIR/checkpoints/.tmp-step_NNNNNNNN/ under a
.part name, fsynced and renamed to its final name, so a present file is a complete one;
when all are present rank 0 writes meta.json, fsyncs the directory and renames it to
step_NNNNNNNN (one atomic rename on POSIX file systems), then fsyncs the parent. A reader only considers
step_* directories whose meta.json lists files that are all present with the recorded
sizes, so a process killed at any point leaves either the new checkpoint complete or no
trace of it besides a .tmp-* directory, which the next save removes. Older checkpoints
beyond `keep_last` are renamed to .trash-* before they are deleted, so a half-deleted one
is never mistaken for a checkpoint. Multi-node runs need RUN_DIR on a shared file system.

All files hold only tensors and plain Python containers: they load with
torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch

FORMAT = "engine-checkpoint/2"
FORMAT_1 = "engine-checkpoint/1"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def step_name(step: int) -> str:
    return "step_%08d" % step


def rank_file(rank: int) -> str:
    return "rank_%05d.pt" % rank


# --------------------------------------------------------------------------- low-level I/O


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: str, obj) -> None:
    """torch.save to `path`, flushed and fsynced before returning."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove_tree(path: str, root: str) -> None:
    """Rename to .trash-* first (atomic: it stops being a checkpoint at once), then delete."""
    trash = os.path.join(root, ".trash-%s-%d-%d" % (os.path.basename(path), os.getpid(), time.monotonic_ns()))
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- finding checkpoints


def read_meta(path: str) -> Optional[dict]:
    """meta.json of a complete checkpoint, or None when `path` is not one (missing, being
    written, truncated, a file missing or of the wrong size)."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, FORMAT_1):
        return None
    for name, size in meta.get("files", {}).items():
        try:
            if os.path.getsize(os.path.join(path, name)) != size:
                return None
        except OSError:
            return None
    return meta


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and read_meta(os.path.join(root, name)) is not None:
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under `root` (a checkpoints/ directory or a run
    directory holding one), or None."""
    if os.path.isdir(os.path.join(root, "checkpoints")):
        root = os.path.join(root, "checkpoints")
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str) -> Optional[str]:
    """A checkpoint directory itself, or the newest one in a run / checkpoints directory."""
    if read_meta(path) is not None:
        return path
    return latest_checkpoint(path)


# --------------------------------------------------------------------------- saving


def _no_barrier() -> None:
    pass


def to_host(obj):
    """A copy of `obj` whose tensors live in host memory and share nothing with the originals
    (training goes on updating those in place while the copy is written)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class Writer:
    """One rank's checkpoint writer (module docstring). `save` copies the state to host memory
    and returns; the files are written by a thread (inline with background=False). A save
    first waits for the previous one, so one copy at most is in host memory. `wait()` blocks
    until this rank's part (on rank 0: the commit) is done and raises what the thread raised.
    No collective is involved: rank 0 finds the other ranks' files in the directory."""

    def __init__(self, root: str, rank: int = 0, world_size: int = 1, *, keep_last: int = 3,
                 background: bool = True, timeout_s: float = 1800.0):
        self.root, self.rank, self.world_size = root, rank, world_size
        self.keep_last, self.background, self.timeout_s = keep_last, background, timeout_s
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.host_copy_s = 0.0  # the last save's copy to host memory (the step loop's wait)

    def save(self, step: int, files: dict, meta: Optional[dict] = None, config: Optional[dict] = None) -> str:
        """files: {name: object} this rank writes, rank_NNNNN.pt of its rank among them; rank 0
        also passes `meta` (extra meta.json fields) and `config`. Returns the final path."""
        self.wait()
        t0 = time.perf_counter()
        if self.background:  # inline, nothing changes the state while it is written
            files = to_host(files)
        self.host_copy_s = time.perf_counter() - t0
        if rank_file(self.rank) not in files:
            raise ValueError(f"Writer.save: rank {self.rank} must write {rank_file(self.rank)}")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            current = ".tmp-" + step_name(step)
            for name in os.listdir(self.root):  # leftovers of writers that were killed
                if name.startswith((".tmp-", ".trash-")) and name != current:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if not self.background:
            self._write(step, files, meta, config)
        else:
            self._thread = threading.Thread(target=self._run, args=(step, files, meta, config),
                                            name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        return os.path.join(self.root, step_name(step))

    def wait(self, timeout_s: Optional[float] = None) -> None:
        """timeout_s: give up waiting after it (leaving the write to finish or die with the process)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"the background checkpoint write failed: {error}") from error

    def _run(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # re-raised by wait(), in the training thread
            self._error = e

    def _write(self, step: int, files: dict, meta: Optional[dict], config: Optional[dict]) -> None:
        tmp = os.path.join(self.root, ".tmp-" + step_name(step))
        os.makedirs(tmp, exist_ok=True)
        for name, obj in files.items():
            part = os.path.join(tmp, name + ".part")
            _write_file(part, obj)
            os.replace(part, os.path.join(tmp, name))
        if self.rank == 0:
            if config is not None:
                _write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=1))
            expected = {rank_file(r) for r in range(self.world_size)} | set(files)
            self._commit(step, tmp, expected, meta or {})

    def _commit(self, step: int, tmp: str, expected: set, extra: dict) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not expected <= set(os.listdir(tmp)):
            if time.monotonic() > deadline:
                missing = sorted(expected - set(os.listdir(tmp)))
                raise RuntimeError(f"checkpoint {step}: files {missing} were not written in {self.timeout_s:.0f} s "
                                   f"(a rank died, or {self.root} is not on a file system every node shares)")
            time.sleep(0.01)
        names = sorted(n for n in os.listdir(tmp) if not n.endswith(".part"))
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in names}
        meta = {"format": FORMAT, "step": step, "world_size": self.world_size, **extra, "files": files,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        final = os.path.join(self.root, step_name(step))
        if os.path.exists(final):  # the same step saved again (e.g. preempted right after a save)
            _remove_tree(final, self.root)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        prune(self.root, self.keep_last)


def save_checkpoint(root: str, step: int, *, rank: int = 0, world_size: int = 1, rank_state: dict,
                    shared: Optional[dict] = None, model: Optional[dict] = None, config: Optional[dict] = None,
                    keep_last: int = 3, barrier: Callable[[], None] = _no_barrier, meta: Optional[dict] = None) -> str:
    """Writes checkpoint `step` under `root` on every rank and returns once it is complete
    (a collective when world_size > 1: `barrier` synchronises the ranks). Rank 0 passes
    `shared` (and optionally `model`, a model.pt, and `config`)."""
    files = {rank_file(rank): rank_state}
    if rank == 0:
        if shared is None:
            raise ValueError("save_checkpoint: rank 0 must pass shared")
        files["shared.pt"] = shared
        if model is not None:
            files["model.pt"] = model
    writer = Writer(root, rank, world_size, keep_last=keep_last, background=False)
    barrier()  # every rank past the previous commit before rank 0 clears leftovers
    final = writer.save(step, files, meta=meta, config=config)
    barrier()
    return final


def prune(root: str, keep_last: int) -> list[str]:
    """Deletes all but the newest `keep_last` complete checkpoints; returns the deleted paths."""
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep_last]] if keep_last > 0 else []
    for path in doomed:
        _remove_tree(path, root)
    return doomed


# --------------------------------------------------------------------------- loading


def load_file(path: str, map_location="cpu", mmap: bool = False):
    """mmap: page in only what is read (a rank file's data position and RNG state, not its head slice)."""
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def load_checkpoint(path: str, rank: int = 0, world_size: Optional[int] = None, *, model: bool = True,
                    shared: bool = True) -> dict:
    """{"meta", "shared", "rank", "config", and "model" where the checkpoint holds a model.pt}
    of a complete checkpoint, for `rank` ("rank" is None where the checkpoint has no file of
    that rank). A format-1 checkpoint loads at its own world size only."""
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no valid meta.json)")
    if meta["format"] == FORMAT_1 and world_size is not None and meta["world_size"] != world_size:
        raise ValueError(f"checkpoint {path} was written by {meta['world_size']} ranks, this job has {world_size}: "
                         f"its format ({FORMAT_1}) resumes at its own world size only (start a new run from its "
                         f"weights with --set model.init={path})")
    out = {"meta": meta, "path": path}
    own = os.path.join(path, rank_file(rank))
    out["rank"] = load_file(own) if rank_file(rank) in meta["files"] else None
    if shared:
        out["shared"] = load_file(os.path.join(path, "shared.pt"))
    if model and "model.pt" in meta["files"]:
        out["model"] = load_file(os.path.join(path, "model.pt"))["model"]
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            out["config"] = json.load(f)
    return out


class _Whole:
    """A tensor of a rank file that is not one row per class (kept whole, not concatenated)."""

    def __init__(self, value):
        self.value = value


def _rows(tree, lo: int, hi: int, size: int):
    """`tree` with every tensor of `size` leading rows cut to rows [lo, hi); others wrapped in _Whole."""
    if isinstance(tree, torch.Tensor):
        # Copies: nothing may keep the memory-mapped file's pages (pruned later) alive.
        return tree[lo:hi].clone() if tree.dim() >= 1 and tree.shape[0] == size else _Whole(tree.clone())
    if isinstance(tree, dict):
        return {k: _rows(v, lo, hi, size) for k, v in tree.items()}
    return tree


def read_rows(path: str, key: str, start: int, stop: int) -> dict:
    """Rows [start, stop) of the vocabulary-sharded entry `key` of the rank files of a format-2
    checkpoint (the head's slice and its optimiser state), from whichever files hold them:
    a job of any world size reads its slice. Files are memory-mapped: only the rows read
    are paged in. Tensors without one row per class (a step count) come from the first file."""
    meta = read_meta(path)
    if meta is None or meta["format"] != FORMAT:
        raise ValueError(f"{path}: not a complete {FORMAT} checkpoint")
    parts = []
    for r, (lo, hi) in enumerate(meta["head_slices"]):
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        tree = torch.load(os.path.join(path, rank_file(r)), map_location="cpu", weights_only=True, mmap=True)[key]
        parts.append(_rows(tree, a - lo, b - lo, hi - lo))
    if not parts:
        raise ValueError(f"{path}: no rank file holds rows [{start}, {stop})")
    return _merge_rows(parts)


def _merge_rows(parts: list):
    first = parts[0]
    if isinstance(first, dict):
        return {k: _merge_rows([p[k] for p in parts]) for k in first}
    if isinstance(first, _Whole):
        return first.value
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return first


# --------------------------------------------------------------------------- RNG and optimiser state


def rng_state(device: Optional[torch.device] = None) -> dict:
    """The RNG states of this process as tensors and plain containers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _py_state_to_plain(random.getstate()),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_py_state_from_plain(state["python"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _py_state_to_plain(s):
    version, internal, gauss = s
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _py_state_from_plain(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])


def split_optimizer_state(state_dict: dict, local_ids: set) -> tuple[dict, dict]:
    """An optimiser state dict cut into (shared: param groups + the state of every param not
    in `local_ids`, local: the state of the params in `local_ids`), by param index."""
    shared = {"param_groups": state_dict["param_groups"],
              "state": {i: s for i, s in state_dict["state"].items() if i not in local_ids}}
    local = {"state": {i: s for i, s in state_dict["state"].items() if i in local_ids}}
    return shared, local


def merge_optimizer_state(shared: dict, local: dict) -> dict:
    return {"param_groups": shared["param_groups"], "state": {**shared["state"], **local["state"]}}


# --------------------------------------------------------------------------- weights for transfer / init


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "model."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_state(ckpt: str) -> dict:
    """The torchvision-format state dict (trunk + full `fc`) of a complete checkpoint: its
    model.pt, or (format 2) the trunk from shared.pt and the head's slices concatenated."""
    meta = read_meta(ckpt)
    if meta is None:
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no valid meta.json)")
    if "model.pt" in meta["files"]:
        return load_file(os.path.join(ckpt, "model.pt"))["model"]
    trunk = torch.load(os.path.join(ckpt, "shared.pt"), map_location="cpu", weights_only=True, mmap=True)["trunk"]
    head = read_rows(ckpt, "head", 0, meta["num_classes"])
    return {**{k: v.clone() for k, v in trunk.items()}, **{"fc." + k: v for k, v in head.items()}}


def export_model(run_or_checkpoint: str, out: Optional[str] = None) -> str:
    """Writes the newest checkpoint's model as a torchvision-format {"model": state dict}
    file (default: model.pt beside the checkpoints, in the run directory); returns its path."""
    ckpt = resolve_checkpoint(run_or_checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"{run_or_checkpoint}: no complete engine checkpoint in it")
    if out is None:
        parent = os.path.dirname(ckpt)
        out = os.path.join(os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent,
                           "model.pt")
    tmp = out + ".part"
    _write_file(tmp, {"model": model_state(ckpt)})
    os.replace(tmp, out)
    return out


def load_weights(path: str) -> tuple[dict, Optional[dict]]:
    """(state dict with torchvision ResNet keys, the run's model config or None) from an
    engine checkpoint, a run directory (its newest checkpoint), or a state dict file
    (torchvision / WSL-Images / timm `*.fb_wsl_ig1b_ft_in1k`, optionally under a
    "state_dict" or "model" key; "module." and "_orig_mod." prefixes are removed)."""
    if os.path.isdir(path):
        ckpt = resolve_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no complete engine checkpoint in it")
        sd = model_state(ckpt)
        model_cfg = None
        cfg_path = os.path.join(ckpt, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                model_cfg = json.load(f).get("model")
        return sd, model_cfg
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read a state dict from it ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return _strip_prefixes(obj), None


def infer_architecture(sd: dict) -> dict:
    """{layers, groups, width_per_group} of a torchvision-style ResNet/ResNeXt state dict."""
    layers = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise ValueError(f"the state dict has no layer{stage}.* keys: not a ResNet/ResNeXt trunk")
        layers.append(max(blocks) + 1)
    w = sd.get("layer1.0.conv2.weight")
    if w is None or w.dim() != 4:
        raise ValueError("the state dict has no layer1.0.conv2.weight: not a bottleneck ResNet/ResNeXt")
    width, per_group = int(w.shape[0]), int(w.shape[1])
    return {"layers": layers, "groups": width // per_group, "width_per_group": per_group}


# --------------------------------------------------------------------------- CLI: engine export


def add_arguments(parser) -> None:
    parser.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", help="the file to write (default: RUN_DIR/model.pt)")


def run(args) -> int:
    try:
        out = export_model(args.path, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"engine export: error: {e}", flush=True)
        return 2
    print(f"engine export: wrote {out} (trunk + full fc, torchvision ResNet keys)")
    return 0
