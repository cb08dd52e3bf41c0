import os
from collections import Counter

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be on before
# any @triton.jit function is created, so before engine.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests that compile kernels for sm_90 (the compile gate, its one-off checks) run
# Triton's compiler in subprocesses, which inherit this: a cache outside the clone survives
# a fresh clone and `make clean`, so only kernels whose source or options changed are compiled
# again (Triton keys each entry by both, and by its own version). Minutes cold, seconds warm.
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(
    os.environ.get("ENGINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "engine"), "triton"))

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Tests marked slow first: pytest-xdist (make test: --dist loadfile --no-loadscope-reorder)
    # hands out files in the order of their first test, so the long files start early, the
    # short ones fill in at the end, and the workers finish together.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # A developer's ENGINE_BACKEND must not change what the tests check.
    monkeypatch.delenv("ENGINE_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _seeded():
    # Every test draws the same inputs whatever ran before it.
    torch.manual_seed(0)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (item(), float(), bool(), ...): each
    one is a host sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    """HostReads, the class: `with host_reads() as mode: ...; mode.reads`."""
    return HostReads


@pytest.fixture
def backend_calls(monkeypatch):
    """Counts (op, backend) for every dispatched call: which implementation really ran."""
    from engine.ops.dispatch import REGISTRY
    calls = Counter()
    for op_name, op in REGISTRY.items():
        for backend_name, backend in op.backends.items():
            def counted(*args, _impl=backend.impl, _key=(op_name, backend_name), **kwargs):
                calls[_key] += 1
                return _impl(*args, **kwargs)
            monkeypatch.setattr(backend, "impl", counted)
    return calls


@pytest.fixture(scope="session")
def make_dataset(tmp_path_factory):
    """make_dataset(name, n_images=..., vocab_size=..., seed=..., sides=(min, max), shard_size=...):
    a built hashtag dataset of clean synthetic images (no broken files, duplicates or eval
    lists), its directory path; for tests that train on data rather than test the builder."""
    from engine.data import BuildConfig, build, synth

    def make(name, *, n_images, vocab_size, seed, sides, shard_size):
        root = tmp_path_factory.mktemp(name)
        raw = synth(str(root / "raw"), n_images=n_images, vocab_size=vocab_size, seed=seed, min_side=sides[0],
                    max_side=sides[1], bad_files=False, n_duplicates=0, n_eval=0, n_eval_overlap=0, progress=False)
        build(BuildConfig(images=raw["images"], metadata=raw["metadata"], out=str(root / "ds"), vocab_size=vocab_size,
                          synonyms=raw["synonyms"], shard_size=shard_size, workers=1, progress=False))
        return str(root / "ds")

    return make
