"""Hopper compile gate: every Triton kernel at every configuration the engine launches on a
GPU, and the CUDA extension's kernels, compiled for sm_90 (and sm_100) on a machine
without one; fails on a compile error, on shared memory above the target's per-block
limit, and on local memory (register spills) above SPILL_BOUND_BYTES.

    python -m benchmarks.compile_gate --out benchmarks/results/compile_sm90.json

The launches come from benchmarks/compile_gate_capture.py: the real launchers run on fake
CUDA tensors at the shapes that matter, every Triton launch recorded with what Triton
specialises on.

Each unique launch is compiled by a worker process (benchmarks/compile_gate.py
--worker) under each Triton release: the one in this environment and, when the venv
exists, Triton 3.6 in .venv-triton36 (triton and numpy only: the worker imports the
kernel modules with a stand-in for torch, since compiling needs none of it). Registers
and local memory come from cuobjdump on the cubin, shared memory from Triton's metadata,
and instruction counts (wgmma, cp.async, 2-byte global accesses) from the PTX.

The committed report (benchmarks/results/compile_sm90.json) is also a record: a launch whose
key (row_key: Triton's own cache key, which covers the kernel's source, the jit functions it
calls, the specialisation, the options, Triton's and ptxas's versions, plus this file's
measuring code) equals a recorded row's takes that row's figures instead of a compile, so a
fresh clone compiles only what changed since the record. The first recorded launch of each
kernel and dtype is compiled anyway and must reproduce the record's figures exactly (the
compile is deterministic); a difference fails the gate. --no-record compiles everything.

CUDA: csrc/*.cu compiled for sm_90 with setup.py's NVCC_FLAGS and `-Xptxas -v` (compile
only; the extension is not rebuilt); ptxas's figures and the SASS (cuda_sass, which
tests/test_csrc_sass.py reads) cached by source hash in .gate-cache/.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".gate-cache"
# The committed full report: its rows stand in for compiles whose key (row_key) they share.
RECORD = ROOT / "benchmarks" / "results" / "compile_sm90.json"
TRITON36_PYTHON = ROOT / ".venv-triton36" / "bin" / "python"

# Per-block shared memory a kernel may opt into: 227 KB on sm_90 (H100/H200) and sm_100 (B200).
SMEM_LIMIT = {90: 232_448, 100: 232_448}
# Local memory per thread (spills and stack) a kernel may use: a few spilled registers
# in a cold path are tolerable, a spilled inner loop is not.
SPILL_BOUND_BYTES = 64
# What Triton's launcher assumes of a pointer: PyTorch's allocator hands out 512-byte
# aligned blocks, so a view's alignment is that of its byte offset.
BASE_ADDRESS = 1 << 20
CUDA_SOURCES = ("csrc/bn_act_cuda.cu", "csrc/grouped_conv_cuda.cu")


# --------------------------------------------------------------------------------------
# Compile (the worker): needs triton only.

class _FakeDtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"torch.{self.name}"


# One object per dtype, alive for the process: Triton caches a dtype's type string by the
# object, and a collected object's address reused by another dtype would hit that cache.
_FAKE_DTYPES: dict[str, _FakeDtype] = {}


class _FakePointer:
    """A tensor argument as Triton's launcher sees it: a dtype and an address."""

    def __init__(self, dtype, aligned):
        self.dtype = _FAKE_DTYPES.setdefault(dtype, _FakeDtype(dtype))
        self.address = BASE_ADDRESS + (0 if aligned else 2)

    def data_ptr(self):
        return self.address


def _concrete(a):
    if isinstance(a, dict) and "tensor" in a:
        return _FakePointer(a["tensor"], a["aligned"])
    if isinstance(a, dict) and "int" in a:
        value = 2**32 if a["int"] == 64 else 2**20
        return value if a["div16"] else value + 3
    if isinstance(a, dict) and "float" in a:
        return 0.5
    return a


def _import_kernels(module: str):
    import importlib
    try:
        import torch  # noqa: F401
        return importlib.import_module(f"engine.kernels.{module}")
    except ImportError:
        pass
    # A Triton-only environment: the kernel modules import torch for their launchers and
    # torch.library registrations, none of which compiling a kernel runs.
    import types

    class _Inert:
        def __getattr__(self, name):
            return _Inert()

        def __call__(self, *args, **kwargs):
            return _Inert()

    stub = types.ModuleType("torch")
    stub.__getattr__ = lambda name: _Inert()
    sys.modules.setdefault("torch", stub)
    sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"kernels.{module}")


def _tool(name: str) -> str:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else name


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(usage["REG"]), "local_bytes": int(usage["LOCAL"]), "stack_bytes": int(usage["STACK"])}


PTX_COUNTS = {
    "wgmma": r"wgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "cp_async_16": r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10\b",
    "cp_async_small": r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x[248]\b",
    "ld_global_b16": r"ld\.global(?:\.\w+)*\.[bu]16 ",
    "st_global_b16": r"st\.global(?:\.\w+)*\.[bu]16 ",
    "ld_global_v4": r"ld\.global(?:\.\w+)*\.v4",
    "st_global_v4": r"st\.global(?:\.\w+)*\.v4",
}


def narrow_tile_offsets(ttir: str, args) -> list[str]:
    """The TTIR lines that first offset a 2-D tile of pointers into one of `args` (kernel
    argument names) by 32-bit integers: that sum wraps once the tensor behind the argument
    holds 2**31 elements or more. (Adding a small i32 term to a pointer tile already
    offset in 64 bits, as `X + rows64 * C + cols` lowers, is fine and not reported.)"""
    tiles = set()
    for line in ttir.splitlines():
        m = re.search(r"(%[\w.]+) = tt\.splat %(\w+) : !tt\.ptr<[^>]+> -> tensor<\d+x\d+x!tt\.ptr", line)
        if m and m.group(2) in args:
            tiles.add(m.group(1))
    return [line.strip() for line in ttir.splitlines()
            if (m := re.search(r"tt\.addptr (%[\w.]+), %[\w.]+ : tensor<\d+x\d+x!tt\.ptr<[^>]+>>, "
                               r"tensor<\d+x\d+xi32>", line)) and m.group(1) in tiles]


def _prepared(spec: dict, arch: int):
    """What triton.compile takes for a spec, as Triton's launcher would build it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(_import_kernels(spec["module"]), spec["kernel"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(spec["options"])
    bound, specialization, options = binder(*[_concrete(a) for a in spec["args"]], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, backend, options


@functools.cache
def _measuring_code() -> str:
    import inspect
    return "".join(inspect.getsource(f) for f in (compile_spec, _resource_usage, narrow_tile_offsets))


def row_key(spec: dict, arch: int) -> str:
    """What a row's figures are a function of: Triton's own cache key (its version and
    sources, ptxas's version, the kernel's source and the jit functions it calls, the
    specialisation, the target, the options), the arguments the 32-bit offset check looks
    at, and the code in this file that measures. Equal keys, equal figures."""
    from triton.compiler.compiler import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key

    src, target, backend, options = _prepared(spec, arch)
    options = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    key = [get_cache_key(src, backend, options, get_cache_invalidating_env_vars()), arch,
           sorted(spec.get("large_args", ())), _measuring_code(), PTX_COUNTS]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def compile_spec(spec: dict, arch: int, keep_ttir: bool = False) -> dict:
    import triton

    src, target, _, options = _prepared(spec, arch)
    row = {"triton": triton.__version__, "target": f"sm_{arch}"}
    start = time.perf_counter()
    try:
        kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # the gate's verdict on this kernel, reported in the table
        row["error"] = f"{type(e).__name__}: {' | '.join(str(e).strip().splitlines()[-6:])}"[:800]
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["shared_bytes"] = kernel.metadata.shared
    row.update(_resource_usage(kernel.asm["cubin"]))
    ptx = kernel.asm["ptx"]
    row["ptx"] = {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()}
    narrow = narrow_tile_offsets(kernel.asm["ttir"], spec.get("large_args", ()))
    if narrow:
        row["narrow_offsets"] = narrow[:4]
    if keep_ttir:
        row["ttir"] = kernel.asm["ttir"]
    return row


# A row's figures: what a recorded row lends to an equal key, and what a fresh compile of a
# recorded row must reproduce.
FIGURES = ("error", "shared_bytes", "registers", "local_bytes", "stack_bytes", "ptx", "narrow_offsets")


def _compile_or_check(spec: dict, arch: int, recorded: dict | None) -> dict:
    row = compile_spec(spec, arch)
    if recorded is not None:
        row["checked_against_record"] = True
        differing = [f"{k} {recorded.get(k)} recorded, {row.get(k)} compiled" for k in FIGURES
                     if recorded.get(k) != row.get(k)]
        if differing:
            row["record_differs"] = differing
    return row


def gate_rows(specs: list[dict], arch: int, record: dict[str, dict], jobs: int) -> list[dict]:
    """One row per spec: compiled, or lent by the record when it holds the spec's key. The
    first recorded spec of each kernel and dtype is compiled anyway and must reproduce the
    record's figures, so a record that no longer matches what the compiler produces (or
    was edited by hand) fails the gate."""
    keys = [row_key(s, arch) for s in specs]
    checked, todo = set(), []
    for i, (spec, key) in enumerate(zip(specs, keys)):
        kind = (spec["module"], spec["kernel"], _dtype_of(spec))
        if key not in record or kind not in checked:
            todo.append(i)
            if key in record:
                checked.add(kind)
    work = [(specs[i], arch, record.get(keys[i])) for i in todo]
    if jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            compiled = dict(zip(todo, pool.starmap(_compile_or_check, work)))
    else:
        compiled = dict(zip(todo, (_compile_or_check(*w) for w in work)))
    rows = []
    for i, key in enumerate(keys):
        row = compiled.get(i) or dict({k: v for k, v in record[key].items() if k in FIGURES + ("triton", "target")},
                                      from_record=True)
        rows.append(dict(row, key=key))
    return rows


def _worker_main(specs_path: str, arch: int, out_path: str, jobs: int, record_path: str) -> None:
    specs = json.loads(Path(specs_path).read_text())
    record = json.loads(Path(record_path).read_text())
    Path(out_path).write_text(json.dumps(gate_rows(specs, arch, record, jobs)))


def run_worker(python: str, specs: list[dict], arch: int, jobs: int, record: dict[str, dict]) -> list[dict]:
    """Gates specs in a fresh process of `python` (this venv or the Triton 3.6 one)."""
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        specs_path, out_path, record_path = Path(tmp, "specs.json"), Path(tmp, "rows.json"), Path(tmp, "record.json")
        specs_path.write_text(json.dumps(specs))
        record_path.write_text(json.dumps(record))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
        subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(specs_path), "--arch", str(arch),
                        "--rows", str(out_path), "--jobs", str(jobs), "--record", str(record_path)],
                       check=True, env=env, cwd=ROOT)
        return json.loads(out_path.read_text())


def load_record(path: Path | None) -> dict[str, dict]:
    """The Triton rows of an earlier report, by key (reports from before rows had keys lend none)."""
    if path is None or not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {r["key"]: r for section in report.get("triton", {}).values() for r in section["rows"] if "key" in r}


# --------------------------------------------------------------------------------------
# CUDA: nvcc -Xptxas -v per translation unit.

def setup_nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read from its source (importing setup.py would run setup())."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("setup.py defines no NVCC_FLAGS list")


def _nvcc_command(source: str, arch: int, obj: str) -> list[str]:
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [f"-I{p}" for p in include_paths("cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    # setup.py's flags, those torch's extension builder adds, and ptxas's report.
    flags = [*setup_nvcc_flags(), "-std=c++20", "-DENGINE_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
    return [nvcc, *includes, *flags, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", source, "-o", obj]


def _parse_ptxas(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = {"kernel": _demangle(m.group(1)), "target": m.group(2), "local_bytes": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack_bytes"], current["spill_store_bytes"], current["spill_load_bytes"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
            lmem = re.search(r"(\d+) bytes lmem", line)
            current["local_bytes"] = int(lmem.group(1)) if lmem else 0
    return rows


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def _compile_tu(source: str, arch: int) -> tuple[list[dict], str | None]:
    """ptxas's rows and the SASS (cuobjdump -sass) of one translation unit, from the cache
    (keyed by the command, the source and csrc's headers) or nvcc; SASS None on an error."""
    CACHE.mkdir(exist_ok=True)
    headers = sorted((ROOT / "csrc").glob("*.h"))
    # The key leaves out the object path, a fresh temporary name each time.
    digest = hashlib.sha256(json.dumps(_nvcc_command(source, arch, "k.o")[1:]).encode() + (ROOT / source).read_bytes()
                            + b"".join(h.read_bytes() for h in headers)).hexdigest()[:20]
    rows_path, sass_path = CACHE / f"nvcc-{digest}.json", CACHE / f"nvcc-{digest}.sass.gz"
    if rows_path.exists() and sass_path.exists():
        return json.loads(rows_path.read_text()), gzip.decompress(sass_path.read_bytes()).decode()
    with tempfile.TemporaryDirectory() as tmp:
        obj = str(Path(tmp, "k.o"))
        start = time.perf_counter()
        done = subprocess.run(_nvcc_command(source, arch, obj), capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            return [{"source": source, "target": f"sm_{arch}", "error": done.stderr[-2000:]}], None
        seconds = round(time.perf_counter() - start, 1)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True, check=True).stdout
    rows = [dict(r, source=source, compile_s=seconds) for r in _parse_ptxas(done.stderr)]
    rows_path.write_text(json.dumps(rows))
    sass_path.write_bytes(gzip.compress(sass.encode()))
    return rows, sass


def compile_cuda(arch: int) -> list[dict]:
    return [row for source in CUDA_SOURCES for row in _compile_tu(source, arch)[0]]


def cuda_sass(source: str, arch: int = 90) -> str:
    """The SASS of one of CUDA_SOURCES for sm_<arch>; raises on a compile error."""
    rows, sass = _compile_tu(source, arch)
    if sass is None:
        raise RuntimeError(f"nvcc failed on {source}: {rows[0]['error']}")
    return sass


# --------------------------------------------------------------------------------------
# Verdicts and the report.

def verdict(row: dict, arch: int) -> list[str]:
    problems = []
    if row.get("record_differs"):
        problems.append(f"a fresh compile differs from the record ({'; '.join(row['record_differs'])[:300]}): "
                        f"regenerate it: python -m benchmarks.compile_gate --no-record --out {RECORD.relative_to(ROOT)}")
    if "error" in row:
        problems.append(f"compile error: {row['error'][:300]}")
        return problems
    if row.get("shared_bytes", 0) > SMEM_LIMIT[arch]:
        problems.append(f"shared memory {row['shared_bytes']} B > {SMEM_LIMIT[arch]} B")
    if row.get("narrow_offsets"):
        problems.append(f"32-bit offsets into a tensor of 2**31+ elements: {row['narrow_offsets'][0]}")
    if row.get("local_bytes", 0) > SPILL_BOUND_BYTES:
        problems.append(f"local memory (spills) {row['local_bytes']} B/thread > {SPILL_BOUND_BYTES} B")
    if row.get("spill_store_bytes", 0) > SPILL_BOUND_BYTES:  # ptxas's own count (CUDA rows)
        problems.append(f"spill stores {row['spill_store_bytes']} B/thread > {SPILL_BOUND_BYTES} B")
    return problems


def _config_text(spec: dict) -> str:
    opts = spec["options"]
    parts = [f"{k}={v}" for k, v in sorted(opts.items()) if k not in ("num_warps", "num_stages")]
    parts.append(f"warps={opts.get('num_warps', 4)} stages={opts.get('num_stages', 3)}")
    return " ".join(parts)


def _dtype_of(spec: dict) -> str:
    for a in spec["args"]:
        if isinstance(a, dict) and a.get("tensor") in ("bfloat16", "float16", "float32"):
            return a["tensor"]
    return "float32"


def _summary(report: dict) -> str:
    lines = [f"# Compile gate: {report['verdict']}", "",
             f"Produced on a CPU machine without a GPU ({report['host']}), {report['date']}: kernels compiled "
             f"for the targets below, never run. Shared-memory limit {SMEM_LIMIT[90]:,} B per block; "
             f"local memory (spills) bound {SPILL_BOUND_BYTES} B per thread.", ""]
    for name, section in report["triton"].items():
        rows = section["rows"]
        worst = sorted(rows, key=lambda r: -r.get("shared_bytes", 0))[:1]
        lines.append(f"## {name}: {len(rows)} launches ({section['compiled']} compiled, {section['from_record']} "
                     f"from the record), {sum(1 for r in rows if r['problems'])} failing, {section['seconds']:.0f} s")
        if worst:
            lines.append(f"Largest shared memory: {worst[0]['kernel']} {worst[0]['config']} {worst[0]['dtype']}: "
                         f"{worst[0].get('shared_bytes')} B.")
        lines.append("")
        lines.append("| kernel | dtype | config | regs | smem B | local B | wgmma | problems |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["config"])):
            lines.append(f"| {r['module']}.{r['kernel']} | {r['dtype']} | {r['config']} | {r.get('registers', '')} | "
                         f"{r.get('shared_bytes', '')} | {r.get('local_bytes', '')} | "
                         f"{'yes' if r.get('ptx', {}).get('wgmma') else 'no'} | {'; '.join(r['problems'])} |")
        lines.append("")
    for name, rows in report["cuda"].items():
        lines.append(f"## CUDA {name}")
        lines.append("| kernel | regs | smem B | spill st/ld B | problems |")
        lines.append("|---|---|---|---|---|")
        for r in rows:
            lines.append(f"| {r.get('kernel', r.get('source'))} | {r.get('registers', '')} | {r.get('shared_bytes', '')} "
                         f"| {r.get('spill_store_bytes', '')}/{r.get('spill_load_bytes', '')} | "
                         f"{'; '.join(r['problems'])} |")
        lines.append("")
    if report.get("differences"):
        lines.append("## sm_90 vs sm_100 (same Triton)")
        lines += [f"- {d}" for d in report["differences"]]
    return "\n".join(lines) + "\n"


def _differences(rows90: list[dict], rows100: list[dict]) -> list[str]:
    out = []
    for a, b in zip(rows90, rows100):
        if ("error" in a) != ("error" in b):
            out.append(f"{a['kernel']} {a['config']} {a['dtype']}: compiles on "
                       f"{'sm_100 only' if 'error' in a else 'sm_90 only'}")
            continue
        if "error" in a:
            continue
        deltas = [f"{k} {a.get(k)} -> {b.get(k)}" for k in ("shared_bytes", "registers", "local_bytes")
                  if a.get(k) != b.get(k) and abs((a.get(k) or 0) - (b.get(k) or 0)) > 0.25 * max(a.get(k) or 1, 1)]
        if deltas:
            out.append(f"{a['kernel']} {a['config']} {a['dtype']}: " + ", ".join(deltas))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON report (a readable .md summary is written beside it)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes")
    p.add_argument("--models", help="ResNeXt variants, comma-separated (default: 32x8d,32x16d,32x48d)")
    p.add_argument("--batches", help="batch sizes, comma-separated (default: 64,100,256)")
    p.add_argument("--dtypes", help="dtypes, comma-separated (default: bfloat16,float16,float32)")
    p.add_argument("--other-batches", default="100",
                   help="batches for the sm_100 and Triton 3.6 compiles (fewer integer specialisations, "
                        "every configuration)")
    p.add_argument("--other-dtypes", help="dtypes for the sm_100 and Triton 3.6 compiles (default: --dtypes)")
    p.add_argument("--no-head", action="store_true", help="skip the hashtag head's shapes")
    p.add_argument("--no-cuda", action="store_true", help="skip nvcc on csrc/*.cu")
    p.add_argument("--no-sm100", action="store_true", help="skip the Blackwell compile")
    p.add_argument("--triton36", choices=("auto", "require", "skip"), default="auto",
                   help="also compile under Triton 3.6 from .venv-triton36 (auto: when it exists)")
    p.add_argument("--record", default=str(RECORD),
                   help="an earlier report whose rows stand in for compiles with an equal key (default: the "
                        "committed one); the first of each kernel and dtype is compiled anyway and must match")
    p.add_argument("--no-record", action="store_true", help="compile every launch")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--arch", type=int, default=90, help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker_main(args.worker, args.arch, args.rows, args.jobs, args.record)
        return 0

    import triton

    # Not at the top: the worker runs this file as a script, outside the package.
    from benchmarks.compile_gate_capture import BATCHES, DTYPES, RESNEXT, capture
    args.models = args.models or ",".join(RESNEXT)
    args.batches = args.batches or ",".join(map(str, BATCHES))
    args.dtypes = args.dtypes or ",".join(DTYPES)
    start = time.perf_counter()
    specs = capture(tuple(args.models.split(",")), tuple(int(b) for b in args.batches.split(",")),
                    tuple(args.dtypes.split(",")), not args.no_head)
    capture_s = time.perf_counter() - start
    print(f"compile_gate: {len(specs)} unique launches captured in {capture_s:.0f} s", flush=True)
    other = specs
    other_dtypes = args.other_dtypes or args.dtypes
    if args.other_batches != args.batches or other_dtypes != args.dtypes:
        other = capture(tuple(args.models.split(",")), tuple(int(b) for b in args.other_batches.split(",")),
                        tuple(other_dtypes.split(",")), not args.no_head)
    runs = [(f"triton {triton.__version__} sm_90", sys.executable, 90, specs)]
    if not args.no_sm100:
        runs.append((f"triton {triton.__version__} sm_100", sys.executable, 100, other))
    if args.triton36 == "require" and not TRITON36_PYTHON.exists():
        raise SystemExit(f"compile_gate: {TRITON36_PYTHON} is missing (make triton36-venv)")
    if args.triton36 != "skip" and TRITON36_PYTHON.exists():
        runs.append(("triton 3.6 sm_90", str(TRITON36_PYTHON), 90, other))
    report = {"produced_on": "a CPU machine without a GPU: compiled, never run", "host": platform.node() or "?",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "smem_limit_bytes": SMEM_LIMIT, "spill_bound_bytes": SPILL_BOUND_BYTES,
              "capture_s": round(capture_s, 1), "triton": {}, "cuda": {}}
    record = {} if args.no_record else load_record(Path(args.record))
    for name, python, arch, run_specs in runs:
        t = time.perf_counter()
        rows = run_worker(python, run_specs, arch, args.jobs, record)
        table = []
        for spec, row in zip(run_specs, rows):
            table.append(dict(module=spec["module"], kernel=spec["kernel"], config=_config_text(spec),
                              dtype=_dtype_of(spec), launches=spec["launches"], shapes=spec["shapes"], **row,
                              problems=verdict(row, arch)))
        lent = sum(1 for r in rows if r.get("from_record"))
        checked = sum(1 for r in rows if r.get("checked_against_record"))
        report["triton"][name] = {"seconds": round(time.perf_counter() - t, 1), "rows": table,
                                  "compiled": len(rows) - lent, "from_record": lent, "checked_against_record": checked,
                                  "batches": args.batches if run_specs is specs else args.other_batches,
                                  "dtypes": args.dtypes if run_specs is specs else other_dtypes}
        failing = sum(1 for r in table if r["problems"])
        print(f"compile_gate: {name}: {len(rows)} launches, {len(rows) - lent} compiled ({checked} of them to check "
              f"the record), {lent} from the record; {failing} failing, {time.perf_counter() - t:.0f} s", flush=True)
    if not args.no_sm100:
        # sm_90 against sm_100 on the same launches.
        rows90 = [r for r in report["triton"][runs[0][0]]["rows"]]
        by_key = {json.dumps([s["module"], s["kernel"], s["args"], sorted(s["options"].items())]): r
                  for s, r in zip(specs, rows90)}
        pairs = [(by_key.get(json.dumps([s["module"], s["kernel"], s["args"], sorted(s["options"].items())])), r)
                 for s, r in zip(other, report["triton"][runs[1][0]]["rows"])]
        pairs = [(a, b) for a, b in pairs if a is not None]
        report["differences"] = _differences([a for a, _ in pairs], [b for _, b in pairs])
    if not args.no_cuda:
        t = time.perf_counter()
        report["cuda"]["nvcc sm_90"] = [dict(r, problems=verdict(r, 90)) for r in compile_cuda(90)]
        print(f"compile_gate: CUDA sm_90 in {time.perf_counter() - t:.0f} s", flush=True)
    problems = [f"{name}: {r.get('module', r.get('source'))}.{r.get('kernel')} {r.get('config', '')} "
                f"{r.get('dtype', '')}: {'; '.join(r['problems'])}"
                for name, section in report["triton"].items() for r in section["rows"] if r["problems"]]
    problems += [f"CUDA {name}: {r.get('kernel', r.get('source'))}: {'; '.join(r['problems'])}"
                 for name, rows in report["cuda"].items() for r in rows if r["problems"]]
    report["verdict"] = "FAIL" if problems else "PASS"
    report["problems"] = problems
    report["total_s"] = round(time.perf_counter() - start, 1)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(_summary(report))
    for line in problems:
        print(f"compile_gate: FAIL {line}")
    print(f"compile_gate: {report['verdict']} in {report['total_s']:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
