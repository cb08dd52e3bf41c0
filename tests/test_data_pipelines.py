"""Training and evaluation loaders: the batch contract on both backends, rank
sharding, exact resume, and agreement between DALI and the PyTorch loader."""

import numpy as np
import pytest
import torch

from engine import data
from engine.data.builder import BuildConfig, build
from engine.data.dataset import HashtagDataset
from engine.data.synthetic import synth, synth_imagefolder

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI, WHY = True, ""
except Exception as e:  # ImportError, or a broken install
    HAVE_DALI, WHY = False, f"nvidia.dali is not importable ({e}); pip install nvidia-dali-cuda130"

needs_dali = pytest.mark.skipif(not HAVE_DALI, reason=WHY)
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]
SIZE = 32
MEAN = torch.tensor(data.IMAGENET_MEAN) * 255
STD = torch.tensor(data.IMAGENET_STD) * 255
LO, HI = (0 - MEAN) / STD, (255 - MEAN) / STD


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    raw = synth(str(root / "raw"), n_images=48, vocab_size=12, seed=1, progress=False, n_duplicates=0,
                n_eval_overlap=0, n_eval=0)
    build(BuildConfig(images=raw["images"], metadata=raw["metadata"], out=str(root / "ds"), vocab_size=50,
                      shard_size=16, workers=1, progress=False))
    return str(root / "ds")


def _train(ds, backend, **kw):
    args = dict(batch_size=8, device="cpu", size=SIZE, backend=backend, num_workers=0, num_threads=2, seed=3)
    args.update(kw)
    return data.make_train_loader(ds, **args)


def _collect(loader, n=None):
    out = []
    for b in loader:
        out.append({k: v.clone() for k, v in b.items()})
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_train_batch_contract(ds, backend, dtype):
    loader = _train(ds, backend, dtype=dtype)
    dataset = HashtagDataset(ds)
    assert loader.backend_name == backend and len(loader) == dataset.num_samples // 8
    batches = _collect(loader, 2)
    for b in batches:
        assert set(b) == {"images", "tags", "ids"}
        x = b["images"]
        assert x.shape == (8, SIZE, SIZE, 3) and x.dtype == dtype and x.device.type == "cpu" and x.is_contiguous()
        xf = x.float()
        assert torch.isfinite(xf).all()
        tol = 0.02 if dtype != torch.float32 else 1e-5
        assert (xf >= LO - tol).all() and (xf <= HI + tol).all()
        assert xf.std() > 0.1  # real pictures, not a constant
        assert b["tags"].dtype == torch.int32 and b["tags"].shape == (8, dataset.max_tags)
        assert b["ids"].dtype == torch.int64 and b["ids"].shape == (8,)
        for row, i in zip(b["tags"], b["ids"]):
            t = dataset.tags_of(int(i))
            assert row[: len(t)].tolist() == t.tolist() and (row[len(t):] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nchw_layout_is_a_channels_last_view(ds, backend):
    b = next(iter(_train(ds, backend, layout="NCHW")))
    x = b["images"]
    assert x.shape == (8, 3, SIZE, SIZE) and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_disjoint_and_cover_the_epoch(ds, backend):
    n = HashtagDataset(ds).num_samples
    ids = [torch.cat([b["ids"] for b in _collect(_train(ds, backend, rank=r, world_size=2, resample=False,
                                                        batch_size=4))]) for r in range(2)]
    a, b = set(ids[0].tolist()), set(ids[1].tolist())
    assert len(a) == len(ids[0]) and len(b) == len(ids[1]) and not a & b
    assert len(a | b) == 2 * ((n // 2) // 4) * 4 and n - len(a | b) < 2 * 4
    # Resampled epochs: disjoint positions of one seeded draw, so the two ranks differ.
    r0 = torch.cat([b["ids"] for b in _collect(_train(ds, backend, rank=0, world_size=2, batch_size=4))])
    r1 = torch.cat([b["ids"] for b in _collect(_train(ds, backend, rank=1, world_size=2, batch_size=4))])
    assert len(r0) == len(r1) == len(ids[0]) and not torch.equal(r0, r1)


def test_resampling_favours_rare_hashtags(ds):
    dataset = HashtagDataset(ds)
    loader = _train(ds, "torch", samples_per_epoch=4000, batch_size=200)
    seq_ids = np.concatenate([loader.seq.batch(s).ids for s in range(len(loader))])
    freq = np.bincount(seq_ids, minlength=dataset.num_samples) / len(seq_ids)
    np.testing.assert_allclose(freq, dataset.weight / dataset.weight.sum(), atol=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_gives_identical_next_batches(ds, backend):
    loader = _train(ds, backend)
    steps = len(loader)
    _collect(loader, 3)
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (0, 3)
    rest = _collect(loader) + _collect(loader, 2)  # the end of epoch 0, then into epoch 1
    assert len(rest) == steps - 3 + 2 and loader.epoch == 1
    fresh = _train(ds, backend)
    fresh.load_state_dict(state)
    again = _collect(fresh) + _collect(fresh, 2)
    for a, b in zip(rest, again):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["tags"], b["tags"])
        assert torch.equal(a["images"], b["images"])
    with pytest.raises(ValueError, match="seed"):
        _train(ds, backend, seed=4).load_state_dict(state)


@needs_dali
def test_state_moves_between_backends(ds):
    dali = _train(ds, "dali")
    _collect(dali, 2)
    state = dali.state_dict()
    a = _collect(dali, 2)
    torch_loader = _train(ds, "torch")
    torch_loader.load_state_dict(state)
    b = _collect(torch_loader, 2)
    for x, y in zip(a, b):
        assert torch.equal(x["ids"], y["ids"]) and torch.equal(x["tags"], y["tags"])
        assert (x["images"] - y["images"]).abs().mean() < 0.02


def _agree(a, b, mean_tol=0.01, max_tol=0.15):
    d = (a.float() - b.float()).abs()
    assert d.mean() < mean_tol and d.max() < max_tol, (float(d.mean()), float(d.max()))


@needs_dali
def test_eval_pipelines_agree_between_dali_and_torch(ds):
    n = HashtagDataset(ds).num_samples
    kw = dict(batch_size=10, device="cpu", size=SIZE, num_workers=0)
    dali = _collect(data.make_eval_loader(ds, backend="dali", **kw))
    ref = _collect(data.make_eval_loader(ds, backend="torch", **kw))
    assert [len(b["ids"]) for b in dali] == [10] * (n // 10) + ([n % 10] if n % 10 else [])
    assert torch.equal(torch.cat([b["ids"] for b in dali]), torch.arange(n))
    for a, b in zip(dali, ref):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["tags"], b["tags"])
        _agree(a["images"], b["images"])
    # Same decoder (libjpeg-turbo on both sides), different resize kernels: close, not equal.


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_ranks_split_the_dataset(ds, backend):
    n = HashtagDataset(ds).num_samples
    ids = [torch.cat([b["ids"] for b in _collect(data.make_eval_loader(
        ds, batch_size=7, rank=r, world_size=3, device="cpu", size=SIZE, backend=backend, num_workers=0))])
        for r in range(3)]
    assert torch.equal(torch.cat(ids), torch.arange(n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_imagefolder_loader_labels(tmp_path, backend):
    root = synth_imagefolder(str(tmp_path / "folder"), num_classes=3, per_class=4, seed=0)
    loader = data.make_imagefolder_loader(root, 5, device="cpu", size=SIZE, backend=backend, num_workers=0)
    assert loader.classes == ["class_00", "class_01", "class_02"]
    batches = _collect(loader)
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and labels.dtype == torch.int64
    assert batches[0]["images"].shape == (5, SIZE, SIZE, 3)
    train = data.make_imagefolder_loader(root, 4, train=True, device="cpu", size=SIZE, backend=backend, num_workers=0)
    got = torch.cat([b["ids"] for b in _collect(train)])
    assert sorted(got.tolist()) == list(range(12))


@needs_dali
def test_imagefolder_dali_and_torch_agree(tmp_path):
    root = synth_imagefolder(str(tmp_path / "folder"), num_classes=2, per_class=3, seed=1)
    kw = dict(device="cpu", size=SIZE, num_workers=0)
    a = _collect(data.make_imagefolder_loader(root, 3, backend="dali", **kw))
    b = _collect(data.make_imagefolder_loader(root, 3, backend="torch", **kw))
    for x, y in zip(a, b):
        assert torch.equal(x["labels"], y["labels"])
        _agree(x["images"], y["images"])


def test_torch_loader_with_worker_processes(ds):
    a = _collect(_train(ds, "torch", num_workers=2), 3)
    b = _collect(_train(ds, "torch", num_workers=0), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["ids"], y["ids"]) and torch.equal(x["images"], y["images"])


def test_auto_backend_falls_back_with_a_message(ds, monkeypatch, capsys):
    import engine.data.jpeg as jpeg_mod
    import engine.data.loaders as loaders

    monkeypatch.setattr(jpeg_mod, "dali_available", lambda: "nvidia.dali is not importable (test)")
    monkeypatch.setattr(loaders, "_warned_fallback", False)
    loader = _train(ds, "auto")
    assert loader.backend_name == "torch"
    assert "using the PyTorch loader" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="nvidia-dali"):
        _train(ds, "dali")


def test_bad_loader_arguments(ds, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_train_loader(str(tmp_path / "nope"), 8, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        _train(ds, "tensorflow")
    with pytest.raises(ValueError, match="rank 2"):
        _train(ds, "torch", rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        _train(ds, "torch", batch_size=1000)
    with pytest.raises(ValueError, match="layout"):
        _train(ds, "torch", layout="CHW")
    with pytest.raises(FileNotFoundError, match="image folder"):
        data.make_imagefolder_loader(str(tmp_path / "nofolder"), 4, device="cpu")


@pytest.mark.gpu
@needs_dali
def test_dali_mixed_decode_on_gpu(ds):
    loader = data.make_train_loader(ds, 8, device="cuda", size=SIZE, backend="dali", seed=3)
    b = next(iter(loader))
    assert b["images"].device.type == "cuda" and b["images"].dtype == torch.bfloat16
    assert b["images"].shape == (8, SIZE, SIZE, 3) and b["tags"].device.type == "cuda"
    cpu = next(iter(_train(ds, "dali")))
    assert torch.equal(b["ids"], cpu["ids"])
    _agree(b["images"].float().cpu(), cpu["images"], mean_tol=0.05, max_tol=1.0)  # nvJPEG vs libjpeg-turbo


@needs_dali
def test_gpu_graph_is_well_formed_without_a_gpu(ds):
    """The mixed-decode graph (GPU decode, resize, normalise, tags to the GPU) is
    defined and serialised here, which checks every operator and argument; running
    it needs a GPU (test_dali_mixed_decode_on_gpu)."""
    loader = _train(ds, "dali")
    text = loader._impl.make_pipeline(mixed=True, device_id=None).serialize()
    assert b"decoders__ImageSlice" in text and b"mixed" in text and b"hw_decoder_load" in text


@needs_dali
def test_torch_workers_fork_safely_after_dali(ds, tmp_path):
    """A DALI pipeline left as garbage in the parent must not be finalised in a forked
    DataLoader worker (its destructor would wait forever for threads the child does
    not have). Here each child collects garbage as soon as it is forked; without the
    guard in the PyTorch loader this hangs."""
    import subprocess
    import sys

    script = tmp_path / "fork_after_dali.py"
    script.write_text(
        "import gc, os, sys\n"
        "from engine import data\n"
        "ds = sys.argv[1]\n"
        "loader = data.make_train_loader(ds, 8, device='cpu', size=32, backend='dali')\n"
        "next(iter(loader))\n"
        "cycle = {'loader': loader}; cycle['self'] = cycle\n"
        "gc.disable(); del loader, cycle\n"  # a DALI pipeline lives on as cyclic garbage
        "os.register_at_fork(after_in_child=gc.collect)\n"  # the children collect at once
        "t = data.make_train_loader(ds, 8, device='cpu', size=32, backend='torch', num_workers=2)\n"
        "print(sum(len(b['ids']) for b in t))\n"
    )
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, str(script), ds], capture_output=True, text=True, timeout=180,
                       cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == len(_train(ds, "torch")) * 8
