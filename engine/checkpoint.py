"""Checkpoints: written atomically, the last K kept, the newest loadable one found.

A checkpoint is a directory RUN_DIR/checkpoints/step_NNNNNNNN/:

    model.pt          {"model": state dict}: the trunk and the full hashtag head as `fc`,
                      torchvision's ResNet keys (loads into torchvision / engine.models as is)
    shared.pt         what every rank holds the same: the trunk's optimiser state and param
                      groups, scheduler, grad scaler, step and counters (rank 0 writes it)
    rank_NNNNN.pt     what differs per rank: the optimiser state of its vocabulary slice of
                      the head, its data-loader position, its RNG states
    config.json       the resolved run configuration
    meta.json         step, world size, and each file's size; written last

Atomicity: every file is written into RUN_DIR/checkpoints/.tmp-step_NNNNNNNN/ and fsynced;
then rank 0 writes meta.json, fsyncs the directory and renames it to step_NNNNNNNN (one
atomic rename on POSIX file systems), then fsyncs the parent. A reader only considers
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
import time
from typing import Callable, Optional

import numpy as np
import torch

FORMAT = "engine-checkpoint/1"
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
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


def save_checkpoint(root: str, step: int, *, rank: int = 0, world_size: int = 1, rank_state: dict,
                    shared: Optional[dict] = None, model: Optional[dict] = None, config: Optional[dict] = None,
                    keep_last: int = 3, barrier: Callable[[], None] = _no_barrier) -> str:
    """Writes checkpoint `step` under `root` on every rank (a collective when world_size > 1:
    `barrier` synchronises the ranks). Rank 0 passes `shared`, `model` and `config`. Returns
    the checkpoint's path once it is complete (on every rank)."""
    final = os.path.join(root, step_name(step))
    tmp = os.path.join(root, ".tmp-" + step_name(step))
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of writers that were killed
            if name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    _write_file(os.path.join(tmp, rank_file(rank)), rank_state)
    if rank == 0:
        if shared is None or model is None:
            raise ValueError("save_checkpoint: rank 0 must pass shared and model")
        _write_file(os.path.join(tmp, "shared.pt"), shared)
        _write_file(os.path.join(tmp, "model.pt"), model)
        if config is not None:
            _write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=1))
    barrier()
    if rank == 0:
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        expected = {rank_file(r) for r in range(world_size)} | {"shared.pt", "model.pt"}
        missing = expected - set(files)
        if missing:
            raise RuntimeError(f"checkpoint {step}: files {sorted(missing)} were not written (is {root} on a file "
                               "system every node shares?)")
        meta = {"format": FORMAT, "step": step, "world_size": world_size, "files": files,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. preempted right after a save)
            _remove_tree(final, root)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
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


def load_file(path: str, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(path: str, rank: int = 0, world_size: Optional[int] = None, *, model: bool = True,
                    shared: bool = True) -> dict:
    """{"meta", "model", "shared", "rank", "config"} of a complete checkpoint, for `rank`."""
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no valid meta.json)")
    if world_size is not None and meta["world_size"] != world_size:
        raise ValueError(f"checkpoint {path} was written by {meta['world_size']} ranks, this job has {world_size}: "
                         "an exact resume needs the same world size (start a new run from its weights with "
                         f"--set model.init={path})")
    out = {"meta": meta, "path": path}
    out["rank"] = load_file(os.path.join(path, rank_file(rank)))
    if shared:
        out["shared"] = load_file(os.path.join(path, "shared.pt"))
    if model:
        out["model"] = load_file(os.path.join(path, "model.pt"))["model"]
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            out["config"] = json.load(f)
    return out


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


def load_weights(path: str) -> tuple[dict, Optional[dict]]:
    """(state dict with torchvision ResNet keys, the run's model config or None) from an
    engine checkpoint, a run directory (its newest checkpoint), or a state dict file
    (torchvision / WSL-Images / timm `*.fb_wsl_ig1b_ft_in1k`, optionally under a
    "state_dict" or "model" key; "module." and "_orig_mod." prefixes are removed)."""
    if os.path.isdir(path):
        ckpt = resolve_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: no complete engine checkpoint in it")
        sd = load_file(os.path.join(ckpt, "model.pt"))["model"]
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
