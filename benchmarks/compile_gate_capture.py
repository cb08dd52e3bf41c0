"""The compile gate's launches (benchmarks/compile_gate.py): which Triton kernels the engine
launches on a GPU, at which configurations and with which argument specialisation.

The real launchers run on fake CUDA tensors (torch's FakeTensorMode allocates nothing and
needs no device) with every Triton launch intercepted. Each intercepted launch is reduced to what Triton specialises on (argument
dtypes, 16-byte alignment of pointers, integers equal to 1 or divisible by 16, 32 or
64 bits, constexprs, warps and stages) exactly as Triton's own launcher does, and
deduplicated by that key. The launches come from:
  conv_bn      the fused bottleneck's training forward and backward (with each choice of
               its grouped 3x3: reference, Triton at each tile span) and the folded
               inference forward: kernels/conv_bn.py, bn_stats.py and grouped_conv.py;
  bn_act       forward (training, eval) and backward of every batch norm of the
               bn_act-fused model, both layouts;
  hashtag_ce   forward and backward of the head at full vocabularies and 8-rank slices.
over ResNeXt-101 32x8d / 32x16d / 32x48d at 224 px, batches 64, 100 and 256 (100: rows not
a multiple of 16), the head at D = 2048, B = 512..4096, V = 1.5k, 8.5k, 17k, 1M, in bf16,
fp16 and fp32.
"""

from __future__ import annotations

import contextlib
import json

# What the launchers that size their grids by the SM count see.
H100_SMS = 132

RESNEXT = {"32x8d": 8, "32x16d": 16, "32x48d": 48}
BATCHES = (64, 100, 256)
DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIM = 2048
HEAD_BATCHES = (512, 1024, 4096)
VOCABS = (1_500, 8_500, 17_000, 1_000_000)
RANKS = 8
TAG_COUNTS = (8, 32)
SPANS = (16, 32, 64)  # kernels.grouped_conv.SPANS: the tile spans the autotuner times


class Recorder:
    def __init__(self):
        self.specs: dict[str, dict] = {}
        self.label = ""

    def record(self, fn, args, kwargs):
        # Constexprs passed by position stay as they are; they are part of the program.
        abstract = [a if p.is_constexpr else _abstract(a) for p, a in zip(fn.params, args)]
        options = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        module = fn.fn.__module__.rsplit(".", 1)[-1]
        key = json.dumps([module, fn.__name__, abstract, sorted(options.items())], default=str)
        spec = self.specs.setdefault(key, {"module": module, "kernel": fn.__name__, "args": abstract,
                                           "options": options, "shapes": [], "launches": 0})
        spec["launches"] += 1
        import torch
        large = {name for name, a in zip(fn.arg_names, args) if isinstance(a, torch.Tensor) and a.numel() >= 2**31}
        spec.setdefault("large_args", [])
        spec["large_args"] = sorted(set(spec["large_args"]) | large)
        if len(spec["shapes"]) < 3 and self.label not in spec["shapes"]:
            spec["shapes"].append(self.label)


def _abstract(a):
    """A launch argument reduced to what Triton's specialisation sees."""
    import torch
    if isinstance(a, torch.Tensor):
        return {"tensor": str(a.dtype).removeprefix("torch."),
                "aligned": (a.storage_offset() * a.element_size()) % 16 == 0}
    if isinstance(a, bool) or a is None or isinstance(a, str):
        return a
    if isinstance(a, int):
        if a == 1:
            return 1
        wide = not -2**31 <= a < 2**31
        return {"int": 64 if wide else 32, "div16": a % 16 == 0}
    if isinstance(a, float):
        return {"float": True}
    raise TypeError(f"compile_gate: unexpected launch argument {type(a).__name__}")


@contextlib.contextmanager
def intercepted(recorder):
    """Triton launches recorded instead of run; custom ops called through their Python
    bodies (under FakeTensorMode a custom op would run its fake, launching nothing); an
    H100's SM count for the launchers that size grids by it."""
    import importlib
    import pkgutil
    import types

    import torch
    from torch._library.custom_ops import CustomOpDef
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    import engine.kernels

    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, args, kwargs)

    patched = []
    for info in pkgutil.iter_modules(engine.kernels.__path__):
        mod = importlib.import_module(f"engine.kernels.{info.name}")
        for name, value in vars(mod).copy().items():
            if isinstance(value, CustomOpDef):
                patched.append((mod, name, value))
                setattr(mod, name, value._init_fn)
    old_run, old_props = JITFunction.run, torch.cuda.get_device_properties
    JITFunction.run = run
    torch.cuda.get_device_properties = lambda *_: types.SimpleNamespace(multi_processor_count=H100_SMS)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        JITFunction.run, torch.cuda.get_device_properties = old_run, old_props
        for mod, name, value in patched:
            setattr(mod, name, value)


def _blocks(variant: str):
    """(label, cin, width, c_out, h, stride, has_downsample) of each distinct block shape."""
    width_per_group = RESNEXT[variant]
    inplanes, h = 64, 56
    for stage, planes in enumerate((64, 128, 256, 512)):
        stride = 1 if stage == 0 else 2
        width = planes * width_per_group // 64 * 32
        out = planes * 4
        yield f"{variant} layer{stage + 1}.0", inplanes, width, out, h, stride, True
        h //= stride
        yield f"{variant} layer{stage + 1}.1+", out, width, out, h, 1, False
        inplanes = out


def _capture_conv_bn(recorder, dtype, n, variant):
    import torch

    from engine.ops import conv_bn as ops

    cuda = dict(device="cuda")
    nhwc = torch.channels_last
    for label, cin, width, c_out, h, stride, has_ds in _blocks(variant):
        ho = (h - 1) // stride + 1
        x = torch.empty(n, cin, h, h, dtype=dtype, **cuda).to(memory_format=nhwc)
        w1, w2 = torch.empty(width, cin, 1, 1, **cuda), torch.empty(width, width // 32, 3, 3, **cuda)
        w3, wd = torch.empty(c_out, width, 1, 1, **cuda), torch.empty(c_out, cin, 1, 1, **cuda)
        bn = [torch.empty(c, **cuda) for c in (width, width, width, width, c_out, c_out, c_out, c_out)]
        g1, b1, g2, b2, g3, b3, gd, bd = bn[0], bn[1], bn[2], bn[3], bn[4], bn[5], bn[6], bn[7]
        running = [torch.empty(c, **cuda) for c in (width, width, width, width, c_out, c_out, c_out, c_out)]
        for choice in ("reference", "triton:16", "triton:32", "triton:64"):
            recorder.label = f"{label} b{n} {dtype} train 3x3={choice}"
            ctx = _Ctx()
            out = ops._TrainFunction.forward(ctx, x, w1, w2, w3, wd if has_ds else None, g1, b1, g2, b2, g3, b3,
                                             gd if has_ds else None, bd if has_ds else None, *running,
                                             stride, 32, 0.1, 1e-5, choice)
            assert out.shape == (n, c_out, ho, ho)
            ops._TrainFunction.backward(ctx, torch.empty_like(out))
        params = [ops.BNParams(*(torch.empty(c, **cuda) for _ in range(4))) for c in (width, width, c_out, c_out)]
        for span in SPANS:
            # The folded forward's 3x3 goes through grouped_conv3x3's dispatch (cuDNN or a
            # fused kernel, by timing); here, the Triton kernel at each tile span.
            recorder.label = f"{label} b{n} {dtype} eval 3x3=triton:{span}"
            with _replaced(ops._grouped_ops(), "grouped_conv3x3", _triton_3x3(span)):
                ops._folded_forward(x, w1, params[0], w2, params[1], w3, params[2], wd if has_ds else None,
                                    params[3] if has_ds else None, stride, 32, 1e-5)


def _triton_3x3(span):
    from engine.kernels import grouped_conv

    def conv(x, weight, *, stride, groups):
        return grouped_conv.grouped_conv_fwd_triton(x, weight, None, None, stride, groups, False, span)[0]
    return conv


@contextlib.contextmanager
def _replaced(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _Ctx:
    """What torch.autograd.Function's forward and backward use of their context."""

    needs_input_grad = (True,) * 26

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _capture_bn_act(recorder, dtype, n, variant):
    import torch

    from engine.kernels import bn_act

    cuda = dict(device="cuda")
    # (channels, size, residual, relu): the stem, each block's bn1 and bn2, bn3 with the
    # residual, the downsample's norm.
    norms = {(64, 112, False, True)}
    for _, cin, width, c_out, h, stride, has_ds in _blocks(variant):
        ho = (h - 1) // stride + 1
        norms |= {(width, h, False, True), (width, ho, False, True), (c_out, ho, True, True)}
        if has_ds:
            norms.add((c_out, ho, False, False))
    for c, size, residual, relu in sorted(norms):
        for layout in (torch.channels_last, torch.contiguous_format):
            x = torch.empty(n, c, size, size, dtype=dtype, **cuda).to(memory_format=layout)
            w, b, rm, rv = (torch.empty(c, **cuda) for _ in range(4))
            res = torch.empty_like(x) if residual else None
            recorder.label = f"{variant} bn_act C={c} {size}px b{n} {dtype} {str(layout).removeprefix('torch.')}"
            for training in (True, False):
                y, mean, invstd = bn_act.forward(x, w, b, res, rm, rv, training, 0.1, 1e-5, relu)
                bn_act.backward(torch.empty_like(y), x, y, w, mean, invstd, training, relu, residual)


def _capture_hashtag(recorder, dtype):
    import torch

    from engine.kernels import hashtag_ce
    from engine.ops.hashtag_ce import vocab_slices

    cuda = dict(device="cuda")
    for vocab in VOCABS:
        sizes = sorted({vocab} | {stop - start for start, stop in vocab_slices(vocab, RANKS)})
        for v in sizes:
            for b in HEAD_BATCHES:
                for k in TAG_COUNTS:
                    recorder.label = f"head V={v} B={b} K={k} {dtype}"
                    x = torch.empty(b, HEAD_DIM, dtype=dtype, **cuda)
                    w = torch.empty(v, HEAD_DIM, dtype=dtype, **cuda)
                    bias = torch.empty(v, dtype=dtype, **cuda)
                    tags = torch.empty(b, k, dtype=torch.int64, **cuda)
                    tw = torch.empty(b, k, **cuda)
                    hashtag_ce.forward(x, w, bias, tags, tw, True)
                    lse, coef = torch.empty(b, **cuda), torch.empty(3, b, **cuda)
                    hashtag_ce.backward(x, w, bias, tags, tw, lse, coef, True, True)


def capture(models=tuple(RESNEXT), batches=BATCHES, dtypes=DTYPES, head=True) -> list[dict]:
    import torch

    recorder = Recorder()
    with intercepted(recorder):
        for name in dtypes:
            dtype = getattr(torch, name)
            for variant in models:
                for n in batches:
                    _capture_conv_bn(recorder, dtype, n, variant)
                    _capture_bn_act(recorder, dtype, n, variant)
            if head:
                _capture_hashtag(recorder, dtype)
    return list(recorder.specs.values())
