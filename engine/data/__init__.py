"""Hashtag datasets: synthesis, the offline builder, and the training/evaluation
loaders (DALI, or pure PyTorch).

    from engine import data
    data.synth("syn", n_images=1000, vocab_size=100, seed=0)          # a synthetic raw set
    report = data.build(data.BuildConfig(images="syn/images", metadata="syn/metadata.jsonl",
                                         out="ds", vocab_size="1.5k", synonyms="syn/synonyms.json",
                                         eval_set="syn/eval"))
    loader = data.make_train_loader("ds", batch_size=256, rank=r, world_size=w, seed=0,
                                    device="cuda", dtype=torch.bfloat16, resample=True)
    for batch in loader:       # one epoch; batch["images"] [B,224,224,3], batch["tags"] int32 [B,K]
        ...
    ckpt["data"] = loader.state_dict()   # later: loader.load_state_dict(ckpt["data"])

Submodules: builder (build, BuildConfig: the stages, driven on engines: local or Ray
Data), metadata (input formats: JSONL, CSV, Parquet, YFCC100M, webdataset tars), scan,
plan, write (the stages' tasks), engines, synthetic (synth), vocab, jpeg (validation),
dataset (format, HashtagDataset), sampling (order and randomness), loaders
(make_*_loader, the batch contract), pipeline_dali, loader_torch, cli.
Heavy imports (torch, torchvision, DALI) happen on first use.
"""

from __future__ import annotations

import importlib
import warnings

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on
# every call; they remain the PyTorch loader's decoder here (torchvision 0.26 on the
# GPU machine does not warn). Silence that one message, issued from that one module.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning, module=r"torchvision\.io\.image")

_EXPORTS = {
    "synth": "engine.data.synthetic",
    "synth_imagefolder": "engine.data.synthetic",
    "build": "engine.data.builder",
    "BuildConfig": "engine.data.builder",
    "BuildError": "engine.data.builder",
    "HashtagDataset": "engine.data.dataset",
    "make_train_loader": "engine.data.loaders",
    "make_eval_loader": "engine.data.loaders",
    "make_imagefolder_loader": "engine.data.loaders",
    "Loader": "engine.data.loaders",
    "resolve_backend": "engine.data.loaders",
    "IMAGENET_MEAN": "engine.data.sources",
    "IMAGENET_STD": "engine.data.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
