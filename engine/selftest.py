"""`engine selftest`: every fused op, every backend, every dtype, checked against its
reference on this device at a model's shapes (small batch), then one training step of
the fused models against the plain model. Every check runs in a child process
(engine.ops.verify), so a kernel that crashes is reported and the run goes on.

Prints a table (op, backend, dtype, shape, pass / mismatch / error / crash / skip, max
error, seconds) and writes it as JSON with --out, rewritten as each row settles (a run
killed at a deadline keeps what it checked); exits 1 if anything failed. On a GPU
the default shapes are ResNeXt-101 32x8d's at batch 2, 224 px; on a CPU a small plan
(Triton's interpreter and the extension's C++ loop) that runs in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which must be on
    # before engine.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAULTS_SETUP = "engine.selftest:install_faults"


@dataclass(frozen=True)
class Plan:
    """Shapes to test: a ResNeXt's four stages (input channels, width, output channels, stride,
    input size) at a batch, and the hashtag head's (features, vocabulary, tags per image)."""
    name: str
    batch: int
    size: int
    groups: int
    width_per_group: int
    base: int
    features: int
    vocab: int
    tags: int

    def stages(self) -> list[dict]:
        out, cin, hw = [], self.base, self.size // 4
        for s in range(4):
            planes = self.base * 2 ** s
            stride = 1 if s == 0 else 2
            width = int(planes * self.width_per_group / 64) * self.groups
            out.append({"cin": cin, "width": width, "cout": planes * 4, "stride": stride, "hw": hw})
            cin, hw = planes * 4, (hw - 1) // stride + 1
        return out


def plan_for(model: str, batch: int, size: int, vocab: int) -> Plan:
    from engine.models import ARCHITECTURES
    if model == "tiny":
        # Narrow stages whose group widths are 1, 2, 4 and 8 (every direct-kernel width).
        return Plan("tiny", batch, size, groups=4, width_per_group=16, base=4, features=64, vocab=vocab, tags=4)
    layers, groups, width = ARCHITECTURES[model]
    return Plan(model, batch, size, groups, width, base=64, features=2048, vocab=vocab, tags=8)


def _nhwc(*shape, dtype, device, grad=False):
    return torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last) \
        .requires_grad_(grad)


def op_calls(plan: Plan, dtype: torch.dtype, device: str) -> list[tuple[str, str, tuple, dict]]:
    """(op, shape label, args, kwargs) of the calls a fused model makes, with stand-in tensors
    (their shapes, dtypes and layouts are what a check reproduces)."""
    from engine.ops.conv_bn import BNParams
    n = plan.batch
    f32 = dict(dtype=torch.float32, device=device)

    def bn(c, grad=True):
        return (torch.empty(c, **f32).requires_grad_(grad), torch.empty(c, **f32).requires_grad_(grad),
                torch.empty(c, **f32), torch.empty(c, **f32))

    calls = []
    stem = _nhwc(n, plan.base, plan.size // 2, plan.size // 2, dtype=dtype, device=device, grad=True)
    g, b, rm, rv = bn(plan.base)
    calls.append(("bn_act", f"stem {tuple(stem.shape)}", (stem, rm, rv, g, b, True, 0.1, 1e-5, None, True), {}))
    for i, st in enumerate(plan.stages()):
        hw_out = (st["hw"] - 1) // st["stride"] + 1
        a = _nhwc(n, st["width"], st["hw"], st["hw"], dtype=dtype, device=device, grad=True)
        g, b, rm, rv = bn(st["width"])
        calls.append(("bn_act", f"stage {i + 1} bn1 {tuple(a.shape)}", (a, rm, rv, g, b, True, 0.1, 1e-5, None,
                                                                          True), {}))
        out = _nhwc(n, st["cout"], hw_out, hw_out, dtype=dtype, device=device, grad=True)
        res = _nhwc(n, st["cout"], hw_out, hw_out, dtype=dtype, device=device, grad=True)
        g, b, rm, rv = bn(st["cout"])
        calls.append(("bn_act", f"stage {i + 1} bn3+add {tuple(out.shape)}", (out, rm, rv, g, b, True, 0.1, 1e-5,
                                                                                res, True), {}))
        scale, shift = torch.empty(st["width"], **f32).requires_grad_(), torch.empty(st["width"], **f32)
        w2 = torch.empty(st["width"], st["width"] // plan.groups, 3, 3, **f32).requires_grad_()
        calls.append(("grouped_conv3x3", f"stage {i + 1} {tuple(a.shape)} s{st['stride']} g{plan.groups}",
                      (a, w2), {"stride": st["stride"], "groups": plan.groups, "in_scale": scale,
                                "in_shift": shift.requires_grad_(), "stats": True}))
        x = _nhwc(n, st["cin"], st["hw"], st["hw"], dtype=dtype, device=device, grad=True)
        w1 = torch.empty(st["width"], st["cin"], 1, 1, **f32).requires_grad_()
        w3 = torch.empty(st["cout"], st["width"], 1, 1, **f32).requires_grad_()
        wd = torch.empty(st["cout"], st["cin"], 1, 1, **f32).requires_grad_()
        bns = [BNParams(*bn(c)) for c in (st["width"], st["width"], st["cout"], st["cout"])]
        calls.append(("conv_bn_bottleneck", f"stage {i + 1} first block {tuple(x.shape)}",
                      (x, w1, bns[0], w2, bns[1], w3, bns[2], wd, bns[3]),
                      {"stride": st["stride"], "groups": plan.groups, "training": True, "momentum": 0.1,
                       "eps": 1e-5}))
    feats = torch.empty(n * 8, plan.features, dtype=dtype, device=device).requires_grad_()
    weight = torch.empty(plan.vocab, plan.features, dtype=dtype, device=device).requires_grad_()
    tags = torch.empty(n * 8, plan.tags, dtype=torch.int64, device=device)
    tag_w = torch.empty(n * 8, plan.tags, dtype=torch.float32, device=device)
    bias = torch.empty(plan.vocab, dtype=dtype, device=device).requires_grad_()
    from engine.ops.hashtag_ce import Layout
    calls.append(("hashtag_ce", f"B={n * 8} D={plan.features} V={plan.vocab} K={plan.tags}",
                  (feats, weight, tags, tag_w, bias),
                  {"label_smoothing": 0.1, "z_loss": 1e-4, "reduction": "mean", "process_group": None,
                   "layout": Layout(0, (n * 8,), (plan.vocab,))}))
    return calls


def _variants(op_name: str, backend: str, device: str) -> list[str]:
    """What to check of a backend: an autotuned op's every variant on a GPU."""
    if op_name == "grouped_conv3x3" and backend == "triton" and device == "cuda":
        from engine.kernels.grouped_conv import SPANS
        return [f"triton:{span}" for span in SPANS]
    return [backend]


def install_faults() -> None:
    """Test doubles for --inject-faults: an op whose triton backend is wrong and whose cuda
    backend kills its process, to prove both are caught and the run goes on."""
    from engine.ops.dispatch import REGISTRY, define
    if "selftest_fault" in REGISTRY:
        return
    op = define("selftest_fault", _fault_reference)
    op.register("triton", _fault_wrong)
    op.register("cuda", _fault_crash)


def _fault_reference(x):
    return torch.tanh(x)


def _fault_wrong(x):
    return torch.tanh(x) * 1.25


def _fault_crash(x):
    import ctypes
    ctypes.string_at(0)  # reads address 0: SIGSEGV, like a kernel's fault


def model_step(job: dict) -> dict:
    """In a child: one training step of the fused model against the plain model from the
    same weights on the same batch, the plain model following the fused run's ReLU decisions
    (engine.models.step_check): the loss, the logits, every recorded activation, gradient
    and running statistic."""
    from engine.models import resnext
    from engine.models.step_check import check_fused_step
    plan = Plan(**job["plan"])
    device, dtype = job["device"], DTYPES[job["dtype"]]
    if device == "cpu":
        # The device path on CPU tensors (fused backends chosen without forcing).
        os.environ["ENGINE_VERIFY"] = "1"
    if job["backend"]:
        os.environ["ENGINE_BACKEND"] = job["backend"]
    layers = [1, 1, 1, 1]
    torch.manual_seed(0)
    plain = resnext(layers, plan.groups, plan.width_per_group, num_classes=10)
    fused = resnext(layers, plan.groups, plan.width_per_group, fused=job["mode"], num_classes=10)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(plan.batch, 3, plan.size, plan.size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (plan.batch,), device=device)
    for model in (fused, plain):
        model.to(device=device, memory_format=torch.channels_last)
    start = time.perf_counter()
    verdict = check_fused_step(fused, plain, x, target, dtype)
    verdict["seconds"] = round(time.perf_counter() - start, 4)
    return verdict


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    shape: str
    status: str
    max_error: Optional[float]
    seconds: Optional[float]
    detail: str


def plan_rows(plan: Plan, dtypes: list[str], device: str, faults: bool) -> tuple[list[Row], list[dict], list[int]]:
    """The table's rows, the jobs to run and, per job, its row."""
    from engine.ops import verify
    from engine.ops.dispatch import REGISTRY
    rows, jobs, where = [], [], []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        calls = op_calls(plan, dtype, device)
        if faults:
            calls.append(("selftest_fault", "[64]", (torch.empty(64, device=device, dtype=dtype),), {}))
        for op_name, label, args, kwargs in calls:
            op = REGISTRY[op_name]
            for backend in ("triton", "cuda"):
                if backend not in op.backends:
                    continue
                b = op.backends[backend]
                why = b.available() or b.supports(*args, forced=True, **kwargs)
                for variant in _variants(op_name, backend, device):
                    rows.append(Row(op_name, variant, dtype_name, label, "skip" if why else "?", None, None,
                                    why or ""))
                    if not why:
                        jobs.append(verify.check_job(op_name, variant, args, kwargs))
                        where.append(len(rows) - 1)
    return rows, jobs, where


def model_jobs(plan: Plan, dtypes: list[str], device: str) -> list[tuple[Row, dict]]:
    from engine.ops import backends
    out = []
    if device == "cuda":
        cases = [(mode, None, d) for mode in ("bn_act", "conv") for d in dtypes]
    else:
        # bn_act's fused model through the C++ loop (fast on a CPU); the conv mode's whole model takes
        # minutes in Triton's interpreter, and its blocks are checked one by one above.
        backend = "cuda" if backends.extension_status() is None else "triton"
        cases = [("bn_act", backend, "float32")]
    # Batch norms need a few values per channel in the last stage to be well conditioned.
    small = asdict(plan) | {"batch": max(plan.batch, 4), "size": max(plan.size, 64)}
    for mode, backend, d in cases:
        row = Row("model step", f"fused={mode}" + (f" {backend}" if backend else " auto"), d,
                  f"resnext [1,1,1,1] {plan.groups}x{plan.width_per_group}d batch {small['batch']} {plan.size}px",
                  "?", None, None, "")
        out.append((row, {"kind": "engine.selftest:model_step", "plan": small, "device": device, "dtype": d,
                          "mode": mode, "backend": backend}))
    return out


def format_table(rows: list[Row]) -> str:
    lines = [f"{'op':<20} {'backend':<12} {'dtype':<9} {'status':<9} {'max err':>9} {'s':>7}  shape / detail"]
    for r in rows:
        err = f"{r.max_error:.2e}" if r.max_error is not None else "-"
        secs = f"{r.seconds:.3f}" if r.seconds is not None else "-"
        detail = r.shape + (f"  [{r.detail}]" if r.status != "pass" and r.detail else "")
        lines.append(f"{r.op:<20} {r.backend:<12} {r.dtype:<9} {r.status:<9} {err:>9} {secs:>7}  {detail}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", default="resnext101_32x8d" if gpu else "tiny",
                        help="shapes from this architecture ('tiny' for a small plan; default by device)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224 if gpu else 64, help="image size in pixels")
    parser.add_argument("--vocab", type=int, default=17000 if gpu else 40, help="hashtag vocabulary size")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16" if gpu else "float32,float16")
    parser.add_argument("--no-model-step", action="store_true", help="leave out the fused-model training step")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--inject-faults", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from engine.ops import verify
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import engine.ops  # noqa: F401
    if args.inject_faults:
        install_faults()
        verify.CHILD_SETUP.append(FAULTS_SETUP)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    plan = plan_for(args.model, args.batch, args.size, args.vocab)
    start = time.perf_counter()
    rows, jobs, where = plan_rows(plan, dtypes, device, args.inject_faults)
    if not args.no_model_step:
        for row, job in model_jobs(plan, dtypes, device):
            rows.append(row)
            jobs.append(job)
            where.append(len(rows) - 1)
    print(f"[engine] selftest: {len(jobs)} checks on {device} ({plan.name}, batch {plan.batch}, {plan.size} px)",
          file=sys.stderr)
    header = None
    if args.out:
        from engine.info import collect
        header = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                  "made_on": device, "plan": asdict(plan), "dtypes": dtypes, "info": collect()}
        _write(args.out, header, rows, finished=False)

    def settled(job: int, result: dict) -> None:
        row = rows[where[job]]
        row.status, row.max_error, row.seconds = result["status"], result.get("max_error"), result.get("seconds")
        row.detail = result.get("detail", "")
        print(format_table([row]).splitlines()[1], file=sys.stderr, flush=True)
        if header is not None:
            # Each row on disk as it settles: a run killed at a deadline keeps every verdict it reached.
            _write(args.out, header, rows, finished=False)

    verify.run_jobs(jobs, on_result=settled)
    print(format_table(rows))
    failed = [r for r in rows if r.status in verify.FAILED]
    passed = sum(r.status == "pass" for r in rows)
    skipped = sum(r.status == "skip" for r in rows)
    print(f"{passed} passed, {len(failed)} failed, {skipped} skipped in {time.perf_counter() - start:.1f} s")
    if header is not None:
        _write(args.out, header, rows, finished=True)
    return 1 if failed else 0


def _write(path: str, header: dict, rows: list[Row], finished: bool) -> None:
    """The JSON, atomically (a reader never sees half a file): rows not yet run say status "?"."""
    from engine.ops.verify import FAILED
    failed = sum(r.status in FAILED for r in rows)
    payload = header | {"rows": [asdict(r) for r in rows], "failed": failed, "finished": finished}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
