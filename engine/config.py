"""Configuration of a training run: dataclasses, named presets, `--set` overrides.

    from engine.config import get_preset, apply_overrides, validate
    cfg = get_preset("tiny")                                   # a fresh Config
    cfg = apply_overrides(cfg, ["train.steps=50", "optim.base_lr=0.2", "model.layers=[1,1,1,1]"])
    validate(cfg, world_size=2)                                # ConfigError naming the field

A Config has five sections (model, data, head, optim, train); `--set section.field=value`
coerces the value to the field's type (int, float, bool, str, list[int], Optional[...]).
Every error names the offending field. `to_dict` / `from_dict` round-trip through JSON;
the resolved config is written beside a run's outputs (RUN_DIR/config.json).

Presets:
- `paper-32x{8,16,32,48}d-{1.5k,8.5k,17k}`: Mahajan et al. 2018 (DESIGN.md): ResNeXt-101
  32xCd, batch 8,064 at 24 images per GPU (gradient accumulation makes up the batch on fewer
  GPUs), SGD + Nesterov 0.9, weight decay 1e-4, lr 0.1 x 8064/256 after a linear warm-up
  from 0.1, halved at equally spaced steps, per-GPU batch norm, bf16, channels_last.
- `resnext50-1.5k`: ResNeXt-50 32x4d, batch 256/GPU-node scale runs.
- `tiny`: a ResNeXt with one block per stage, 4 groups of width 4, 32 px images: minutes
  on a CPU (the demo). `test`: the same, tinier batches, for the test suite.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.architectures import ARCHITECTURES


class ConfigError(ValueError):
    """A bad configuration; the message names the field (section.field)."""


# --------------------------------------------------------------------------- sections


FUSED_MODES = ("none", "bn_act", "conv")


@dataclass
class ModelConfig:
    # An engine.architectures name (resnext50_32x4d, resnext101_32x{4,8,16,32,48}d), or
    # "custom": then layers, groups and width_per_group define it.
    name: str = "resnext101_32x8d"
    layers: list[int] = field(default_factory=list)  # custom only: blocks per stage, 4 numbers
    groups: int = 32  # custom only: cardinality
    width_per_group: int = 8  # custom only: base width
    # How the blocks' batch norms run (the state dict is the same in every mode): "none"
    # (plain PyTorch), "bn_act" (BN + add + ReLU in one op), "conv" (fused into the 1x1
    # convolutions and the grouped 3x3, engine.ops.conv_bn_bottleneck).
    fused: str = "bn_act"
    channels_last: bool = True
    compile: bool = False  # torch.compile the data-parallel trunk
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune | max-autotune-no-cudagraphs
    cuda_graphs: bool = False  # capture the trunk's forward+backward as CUDA graphs (GPU, static shapes)
    # Training shapes are fixed, so cuDNN's per-shape algorithm search pays for itself after one
    # step; off only to compare with cuDNN's heuristics or for bitwise-repeatable convolutions.
    cudnn_benchmark: bool = True
    sync_bn: bool = False  # SyncBatchNorm across ranks (the paper: per-GPU statistics); needs fused=false
    zero_init_residual: bool = False
    init: str = ""  # start from these weights: an engine checkpoint/run dir or a torchvision state dict


@dataclass
class DataConfig:
    dataset: str = ""  # a built hashtag dataset (engine data build); not needed with synthetic=true
    synthetic: bool = False  # random device-resident input, one fixed batch (throughput benchmarks)
    synthetic_vocab: int = 1000  # vocabulary of the synthetic input
    backend: str = "auto"  # auto | dali | torch
    image_size: int = 224
    resample: bool = True  # draw by inverse-sqrt hashtag frequency (the paper) instead of a shuffled pass
    samples_per_epoch: int = 0  # 0: the dataset size
    max_tags: int = 0  # tags per image kept (padding width K); 0: the dataset's maximum
    scale_min: float = 0.08  # RandomResizedCrop's smallest area fraction
    num_workers: int = -1  # PyTorch loader processes; -1: one per core
    num_threads: int = 0  # DALI CPU threads; 0: DALI's default
    hw_decoder_load: float = 0.65
    prefetch: int = 2


@dataclass
class HeadConfig:
    vocab_size: int = 0  # 0: the dataset's vocabulary; else it must match the dataset
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    sample_fraction: float = 1.0  # < 1: Partial FC-style sampled softmax (engine.heads.HashtagHead)
    backend: str = ""  # "": the dispatcher's choice; reference | triton


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (torch) | apex_sgd (apex FusedSGD) | apex_lamb (apex FusedLAMB)
    base_lr: float = 0.1  # per reference_batch images: lr = base_lr * batch_size / reference_batch
    reference_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    no_decay_bn_bias: bool = False  # no weight decay on BN parameters and biases
    fused: bool = True  # torch's fused SGD kernel (sgd only)
    lamb_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_start: float = 0.0  # lr at step 0 as a fraction of the peak lr
    schedule: str = "step"  # step | cosine | constant (after the warm-up)
    decay_factor: float = 0.1  # step: lr multiplied by this at each milestone
    milestones: list[int] = field(default_factory=list)  # step: explicit milestones (optimizer steps)
    num_decays: int = 0  # step, no milestones: this many decays, equally spaced after the warm-up
    min_lr_factor: float = 0.0  # cosine: final lr as a fraction of the peak


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000  # optimizer steps
    batch_size: int = 256  # global images per optimizer step (all ranks, all accumulation steps)
    micro_batch: int = 0  # images per rank per forward; 0: batch_size / world size (no accumulation)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on a GPU, fp32 on a CPU) | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cuda | cpu
    dist_backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo
    dist_timeout_s: int = 1800  # a collective waiting longer (a rank died) ends the job
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16: dtype of the trunk's gradient all-reduce
    bucket_cap_mb: int = 25  # DDP bucket size
    log_every: int = 20  # steps per metrics line (JSONL, TensorBoard, stdout)
    ckpt_every: int = 1000  # steps per checkpoint; 0: only at the end and on preemption
    keep_last: int = 3  # checkpoints kept
    checkpoints: bool = True  # false: write none at all (benchmarks)
    resume: str = "auto"  # auto (latest checkpoint in out_dir, if any) | never | a checkpoint path
    halt_after: int = 0  # stop (with a checkpoint) after this many steps of this run; 0: never
    max_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    progress: bool = True  # progress bar on rank 0
    tensorboard: bool = True  # TensorBoard event files when torch.utils.tensorboard imports
    peak_tflops: float = 0.0  # per-device peak for the MFU; 0: from a table of known GPUs


SECTIONS = ("model", "data", "head", "optim", "train")


@dataclass
class Config:
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- presets

PAPER_WIDTHS = (8, 16, 32, 48)
PAPER_VOCABS = {"1.5k": 1500, "8.5k": 8500, "17k": 17000}
# Images processed by the paper's longest schedules: 2 epochs of 3.5B images. The paper set
# each run's length by interpolating between 120 epochs of ImageNet-1k and that (its
# supplement lists the schedules); override train.steps for another dataset size.
PAPER_IMAGES = 7_000_000_000
PAPER_BATCH = 8064
TINY_ARCH = dict(layers=[1, 1, 1, 1], groups=4, width_per_group=4)


def _paper(width: int, vocab: str) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name=f"resnext101_32x{width}d", fused="bn_act", channels_last=True)
    cfg.data = DataConfig(dataset=f"datasets/ig-{vocab}", image_size=224, resample=True)
    cfg.head = HeadConfig(vocab_size=0)
    steps = PAPER_IMAGES // PAPER_BATCH
    cfg.optim = OptimConfig(
        name="sgd", base_lr=0.1, reference_batch=256, momentum=0.9, nesterov=True, weight_decay=1e-4,
        # Warm-up from 0.1 to 0.1 x 8064 / 256 (Goyal et al.'s gradual warm-up), then halved at
        # equally spaced steps (20 halvings over the run).
        warmup_steps=steps // 40, warmup_start=256 / PAPER_BATCH, schedule="step", decay_factor=0.5,
        num_decays=20,
    )
    cfg.train = TrainConfig(out_dir=f"runs/paper-32x{width}d-{vocab}", steps=steps, batch_size=PAPER_BATCH,
                            micro_batch=24, precision="bf16", log_every=50, ckpt_every=2000, keep_last=3)
    return cfg


def _resnext50() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name="resnext50_32x4d")
    cfg.data = DataConfig(dataset="datasets/ig-1.5k")
    cfg.optim = OptimConfig(warmup_steps=500, warmup_start=0.1, schedule="cosine")
    cfg.train = TrainConfig(out_dir="runs/resnext50-1.5k", steps=50_000, batch_size=2048, micro_batch=128,
                            log_every=50, ckpt_every=2000)
    return cfg


def _tiny() -> Config:
    """Minutes on 2 CPU cores: the demo."""
    cfg = Config()
    cfg.model = ModelConfig(name="custom", fused="none", channels_last=True, zero_init_residual=True,
                            **copy.deepcopy(TINY_ARCH))
    cfg.data = DataConfig(dataset="", image_size=32, backend="auto", num_workers=0, num_threads=1, prefetch=2,
                          scale_min=0.35)
    cfg.optim = OptimConfig(base_lr=0.1, warmup_steps=20, warmup_start=0.1, schedule="cosine", weight_decay=5e-5,
                            no_decay_bn_bias=True)
    cfg.train = TrainConfig(out_dir="runs/tiny", steps=300, batch_size=32, precision="fp32", device="auto",
                            log_every=25, ckpt_every=100, keep_last=2)
    return cfg


def _test() -> Config:
    """Seconds on a CPU: the test suite."""
    cfg = _tiny()
    cfg.data.num_workers = 0
    cfg.optim.warmup_steps = 5
    cfg.optim.schedule = "constant"
    cfg.train = TrainConfig(out_dir="runs/test", steps=40, batch_size=16, precision="fp32", device="cpu",
                            log_every=1, ckpt_every=0, keep_last=2, progress=False, tensorboard=False)
    return cfg


PRESETS: dict[str, Any] = {"resnext50-1.5k": _resnext50, "tiny": _tiny, "test": _test}
for _w in PAPER_WIDTHS:
    for _v in PAPER_VOCABS:
        PRESETS[f"paper-32x{_w}d-{_v}"] = (lambda w=_w, v=_v: _paper(w, v))


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"preset: unknown preset {name!r}{hint} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    cfg.preset = name
    return cfg


# --------------------------------------------------------------------------- overrides


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section_and_field(cfg: Config, key: str):
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{key}: expected section.field (sections: {', '.join(SECTIONS)})")
    section, name = parts
    if section not in SECTIONS:
        close = difflib.get_close_matches(section, SECTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: unknown section {section!r}{hint} (sections: {', '.join(SECTIONS)})")
    obj = getattr(cfg, section)
    types = _field_types(type(obj))
    if name not in types:
        close = difflib.get_close_matches(name, types, n=3)
        hint = f"; did you mean {', '.join(section + '.' + c for c in close)}?" if close else ""
        raise ConfigError(f"{key}: unknown field {name!r} of section {section!r}{hint}")
    return obj, name, types[name]


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def coerce(key: str, tp, value):
    """`value` (a string from the command line, or a JSON value) as type `tp`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return coerce(key, args[0], value)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (str,)
        if isinstance(value, str):
            text = value.strip()
            if not text:
                items = []
            elif text.startswith("["):
                try:
                    items = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise ConfigError(f"{key}: cannot read {value!r} as a list") from None
            else:
                items = [v for v in text.split(",") if v.strip()]
        else:
            items = value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(f"{key}[{i}]", item, v) for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(str(value).replace("_", "")) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: fields of type {tp} cannot be set")


def set_value(cfg: Config, key: str, value) -> None:
    obj, name, tp = _section_and_field(cfg, key)
    setattr(obj, name, coerce(key, tp, value))


def apply_overrides(cfg: Config, overrides) -> Config:
    """`overrides`: "section.field=value" strings, or a {section.field: value} mapping.
    Returns a new Config."""
    cfg = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else overrides
    for item in items:
        if isinstance(item, str):
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected section.field=value")
            key, value = item.split("=", 1)
        else:
            key, value = item
        set_value(cfg, key.strip(), value)
    return cfg


def from_dict(d: dict, base: Optional[Config] = None) -> Config:
    """A Config from nested dicts (config.json): unknown sections or fields are errors."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    for section, values in d.items():
        if section == "preset":
            cfg.preset = str(values or "")
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (sections: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of fields")
        for name, value in values.items():
            set_value(cfg, f"{section}.{name}", value)
    return cfg


def load(preset: Optional[str] = None, overrides=(), config_file: Optional[str] = None) -> Config:
    """A preset (or the defaults), then a JSON config file, then overrides."""
    cfg = get_preset(preset) if preset else Config()
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {config_file}: {e}") from None
        cfg = from_dict(d, cfg)
    return apply_overrides(cfg, overrides)


def to_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=1)


# --------------------------------------------------------------------------- validation

CHOICES = {
    "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "data.backend": ("auto", "dali", "torch"),
    "head.backend": ("", "reference", "triton", "cuda"),
    "optim.name": ("sgd", "apex_sgd", "apex_lamb"),
    "optim.schedule": ("step", "cosine", "constant"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.dist_backend": ("auto", "nccl", "gloo"),
    "train.grad_reduce_dtype": ("fp32", "bf16"),
}


def _fail(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


def accumulation(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) for this world size."""
    t = cfg.train
    micro = t.micro_batch or t.batch_size // world_size
    return micro, t.batch_size // (micro * world_size) if micro else 0


def validate(cfg: Config, world_size: int = 1, *, check_paths: bool = True) -> None:
    """Every check that needs no model, data or process group: raises ConfigError naming
    the field. Run on every rank before any work."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            _fail(key, f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    m, d, h, o, t = cfg.model, cfg.data, cfg.head, cfg.optim, cfg.train
    if m.name == "custom":
        if len(m.layers) != 4 or any(n < 1 for n in m.layers):
            _fail("model.layers", f"a custom model needs 4 positive block counts, got {m.layers}")
        if m.groups < 1:
            _fail("model.groups", f"must be positive, got {m.groups}")
        if m.width_per_group < 1:
            _fail("model.width_per_group", f"must be positive, got {m.width_per_group}")
    elif m.name not in ARCHITECTURES:
        close = difflib.get_close_matches(m.name, [*ARCHITECTURES, "custom"], n=2)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        _fail("model.name", f"unknown model {m.name!r}{hint} (known: {', '.join(ARCHITECTURES)}, custom)")
    if m.fused not in FUSED_MODES:
        _fail("model.fused", f"must be one of {', '.join(FUSED_MODES)}, got {m.fused!r}")
    if m.sync_bn and m.fused != "none":
        _fail("model.sync_bn", "SyncBatchNorm replaces the fused blocks' batch norms: set model.fused=none with it")
    if m.cuda_graphs and m.compile:
        _fail("model.cuda_graphs", "use either model.cuda_graphs or model.compile (compile_mode=reduce-overhead "
                                   "captures CUDA graphs itself)")
    if m.cuda_graphs and t.device == "cpu":
        _fail("model.cuda_graphs", "CUDA graphs need train.device=cuda")
    if m.cuda_graphs and m.sync_bn:
        _fail("model.cuda_graphs", "SyncBatchNorm's collectives cannot be captured here: set model.sync_bn=false")
    if m.init and check_paths and not os.path.exists(m.init):
        _fail("model.init", f"{m.init!r} does not exist")

    if d.synthetic:
        if d.synthetic_vocab < world_size:
            _fail("data.synthetic_vocab", f"must be at least the world size ({world_size}), got {d.synthetic_vocab}")
    else:
        if not d.dataset:
            _fail("data.dataset", "no dataset given: a directory built by `engine data build` "
                                  "(or data.synthetic=true for random input)")
        if check_paths:
            if not os.path.isdir(d.dataset):
                _fail("data.dataset", f"{d.dataset!r} does not exist; build one with `engine data build "
                                      f"--images ... --metadata ... --out {d.dataset}`")
            if not os.path.isfile(os.path.join(d.dataset, "dataset.json")):
                _fail("data.dataset", f"{d.dataset!r} is not a built dataset (no dataset.json; an unfinished "
                                      "build?); build it with `engine data build`")
    if d.image_size < 8:
        _fail("data.image_size", f"must be at least 8, got {d.image_size}")
    if not 0 < d.scale_min <= 1:
        _fail("data.scale_min", f"must be in (0, 1], got {d.scale_min}")
    if d.max_tags < 0:
        _fail("data.max_tags", f"must be >= 0, got {d.max_tags}")
    if d.samples_per_epoch < 0:
        _fail("data.samples_per_epoch", f"must be >= 0, got {d.samples_per_epoch}")

    if h.vocab_size < 0:
        _fail("head.vocab_size", f"must be >= 0, got {h.vocab_size}")
    if 0 < h.vocab_size < world_size:
        _fail("head.vocab_size", f"the vocabulary-parallel head needs at least one class per rank "
                                 f"({world_size} ranks), got {h.vocab_size}")
    if not 0 < h.sample_fraction <= 1:
        _fail("head.sample_fraction", f"must be in (0, 1], got {h.sample_fraction}")
    if not 0 <= h.label_smoothing < 1:
        _fail("head.label_smoothing", f"must be in [0, 1), got {h.label_smoothing}")
    if h.z_loss < 0:
        _fail("head.z_loss", f"must be >= 0, got {h.z_loss}")

    if o.base_lr <= 0:
        _fail("optim.base_lr", f"must be positive, got {o.base_lr}")
    if o.reference_batch < 1:
        _fail("optim.reference_batch", f"must be positive, got {o.reference_batch}")
    if not 0 <= o.momentum < 1:
        _fail("optim.momentum", f"must be in [0, 1), got {o.momentum}")
    if o.nesterov and o.momentum == 0 and o.name != "apex_lamb":
        _fail("optim.nesterov", "Nesterov momentum needs optim.momentum > 0")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.warmup_steps < 0:
        _fail("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.warmup_steps > t.steps:
        _fail("optim.warmup_steps", f"{o.warmup_steps} is longer than the run (train.steps={t.steps})")
    if not 0 <= o.warmup_start <= 1:
        _fail("optim.warmup_start", f"must be in [0, 1], got {o.warmup_start}")
    if not 0 < o.decay_factor <= 1:
        _fail("optim.decay_factor", f"must be in (0, 1], got {o.decay_factor}")
    if sorted(o.milestones) != o.milestones or any(s < 1 for s in o.milestones):
        _fail("optim.milestones", f"must be increasing positive step numbers, got {o.milestones}")
    if o.num_decays < 0:
        _fail("optim.num_decays", f"must be >= 0, got {o.num_decays}")
    if not 0 <= o.min_lr_factor <= 1:
        _fail("optim.min_lr_factor", f"must be in [0, 1], got {o.min_lr_factor}")
    if len(o.lamb_betas) != 2 or not all(0 <= b < 1 for b in o.lamb_betas):
        _fail("optim.lamb_betas", f"expected two numbers in [0, 1), got {o.lamb_betas}")

    if t.steps < 1:
        _fail("train.steps", f"must be at least 1, got {t.steps}")
    if t.batch_size < 1:
        _fail("train.batch_size", f"must be at least 1, got {t.batch_size}")
    if t.batch_size % world_size and not t.micro_batch:  # with a micro-batch, the check below says more
        _fail("train.batch_size", f"{t.batch_size} is not divisible by the world size ({world_size} ranks); "
                                  f"use a multiple of {world_size}")
    if t.micro_batch < 0:
        _fail("train.micro_batch", f"must be >= 0, got {t.micro_batch}")
    micro, _ = accumulation(cfg, world_size)
    if t.batch_size % (micro * world_size):
        _fail("train.micro_batch" if t.micro_batch else "train.batch_size",
              f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch x world size "
              f"({micro} x {world_size} = {micro * world_size}); the accumulation steps must be a whole number "
              f"(world sizes that work at micro-batch {micro}: "
              f"{', '.join(str(w) for w in range(1, t.batch_size // micro + 1) if t.batch_size % (micro * w) == 0)})")
    if micro < 2 and not m.sync_bn:
        _fail("train.micro_batch", f"{micro} image(s) per rank per forward: batch norm in training needs at least "
                                   "2 (raise train.batch_size or train.micro_batch)")
    for key in ("log_every", "dist_timeout_s", "bucket_cap_mb", "keep_last", "max_nonfinite"):
        if getattr(t, key) < 1:
            _fail(f"train.{key}", f"must be at least 1, got {getattr(t, key)}")
    for key in ("ckpt_every", "halt_after"):
        if getattr(t, key) < 0:
            _fail(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if not t.out_dir:
        _fail("train.out_dir", "must not be empty")
    if t.resume not in ("auto", "never") and check_paths and not os.path.exists(t.resume):
        _fail("train.resume", f"{t.resume!r} does not exist (auto, never, or a checkpoint directory)")
    if t.peak_tflops < 0:
        _fail("train.peak_tflops", f"must be >= 0, got {t.peak_tflops}")
