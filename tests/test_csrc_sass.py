"""The CUDA extension's kernels as compiled for sm_90, read in their SASS (no GPU: nvcc and
cuobjdump only). Each test pins a property issue 11 asked of the compiled code, which an
innocent-looking source edit would silently undo:

- the direct grouped conv's data gradient divides by no runtime stride in its tap loop
  (the stride is a template parameter);
- the direct grouped conv's forward tap loop issues few instructions per multiply-add
  (weights read as vectors at constant offsets, source addresses hoisted out of the loop);
- bn_act's elementwise kernels move 16 bytes per global access;
- the gate compiles with setup.py's nvcc flags, which leave out --use_fast_math.

The SASS is read from the built extension (engine._C, which setup.py compiled with the same
flags for sm_90) when it holds sm_90 code newer than every file in csrc/: seconds, where
compiling each .cu again takes 1-4 minutes on 2 cores. Otherwise (no CUDA build, another
TORCH_CUDA_ARCH_LIST, sources edited since the build) it comes from
benchmarks.compile_gate.cuda_sass, cached in .gate-cache/ by the hash of the command, the
source and csrc's headers.
"""

import collections
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import compile_gate

NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
needs_nvcc = pytest.mark.skipif(not NVCC.exists(), reason=f"no CUDA toolkit ({NVCC} missing)")

# Direct conv forward: SASS instructions per FFMA in the tap loop, at most (FFMA counts the
# prologue's too). Before the loop was restructured: 3.2-3.5 at width 8 and 5.0-5.7 at
# width 4 (the "about 5"); after: 1.6-2.1 and 2.2-2.9.
FORWARD_INSTRUCTIONS_PER_FMA = {8: 2.4, 4: 3.2}


def _opcode(instruction: str) -> str:
    instruction = re.sub(r"^@!?U?P\w+\s+", "", instruction)  # the predicate guard
    return instruction.split()[0] if instruction else ""


def _functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Demangled kernel name -> [(address, instruction)]."""
    bodies, body = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            body = bodies.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and body is not None and _opcode(m.group(2)) != "NOP":
            body.append((int(m.group(1), 16), m.group(2)))
    names = list(bodies)
    cxxfilt = shutil.which("c++filt")
    demangled = (subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                                check=True).stdout.splitlines() if cxxfilt else names)
    return {d: bodies[n] for n, d in zip(names, demangled)}


def _loops(body):
    """(first, last) addresses of each loop: a branch back to an earlier address."""
    out = []
    for address, instruction in body:
        target = re.search(r"BRA\s+(?:\S+\s+)?`?\(?0x([0-9a-f]+)", instruction)
        if _opcode(instruction).startswith("BRA") and target and int(target.group(1), 16) <= address:
            out.append((int(target.group(1), 16), address))
    return out


def _tap_loops(body):
    """The innermost loops that load from global and shared memory and multiply-add: the
    conv kernels' tap loops (the compiler may emit one per prologue case)."""
    found = []
    for lo, hi in _loops(body):
        ops = [_opcode(i) for a, i in body if lo <= a <= hi]
        if all(any(o.startswith(p) for o in ops) for p in ("LDG", "LDS", "FFMA")):
            found.append((lo, hi))
    return [(lo, hi) for lo, hi in found
            if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in found)]


def _mix(body, lo, hi):
    return collections.Counter(_opcode(i) for a, i in body if lo <= a <= hi)


def _extension_sass():
    """{source: its sm_90 SASS} from the built extension, or None where that cannot stand for
    csrc/ as it is now."""
    spec = importlib.util.find_spec("engine._C")
    if spec is None or not spec.origin:
        return None
    library = Path(spec.origin)
    if any(p.stat().st_mtime > library.stat().st_mtime for p in (compile_gate.ROOT / "csrc").iterdir()):
        return None
    done = subprocess.run([compile_gate._tool("cuobjdump"), "-sass", str(library)], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    # One "Fatbin elf code:" section per translation unit and target, naming both.
    by_source = collections.defaultdict(str)
    for section in done.stdout.split("Fatbin elf code:")[1:]:
        arch = re.search(r"^arch = (\w+)$", section, re.M)
        source = re.search(r"^identifier = .*?(csrc/\w+\.cu)$", section, re.M)
        if arch and source and arch.group(1) == "sm_90":
            by_source[source.group(1)] += section
    return by_source if set(compile_gate.CUDA_SOURCES) <= set(by_source) else None


@pytest.fixture(scope="module")
def sass_functions():
    """source -> {demangled kernel name: body}."""
    sass = _extension_sass() or {source: compile_gate.cuda_sass(source) for source in compile_gate.CUDA_SOURCES}
    return {source: _functions(sass[source]) for source in compile_gate.CUDA_SOURCES}


@pytest.fixture(scope="module")
def conv_kernels(sass_functions):
    return {name: body for name, body in sass_functions["csrc/grouped_conv_cuda.cu"].items()
            if "direct_conv_kernel<" in name}


@pytest.fixture(scope="module")
def bn_act_kernels(sass_functions):
    return sass_functions["csrc/bn_act_cuda.cu"]


def _conv(kernels, dtype, width, transposed):
    """Every instantiation (per stride, and prologue or not) of a direct conv kernel."""
    prefix = re.compile(rf"direct_conv_kernel<{re.escape(dtype)}, {width}, {'true' if transposed else 'false'}[,>]")
    found = {name: body for name, body in kernels.items() if prefix.search(name)}
    assert found, f"no {prefix.pattern} kernel in the SASS"
    return found


@needs_nvcc
@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", ["c10::BFloat16", "float"])
def test_dgrad_tap_loop_has_no_integer_division(conv_kernels, dtype, width):
    # A 32-bit division by a runtime value compiles to I2F.U32.RP + MUFU.RCP + fix-ups;
    # by the constant stride 2 it is a shift and a mask.
    for name, body in _conv(conv_kernels, dtype, width, transposed=True).items():
        loops = _tap_loops(body)
        assert loops, f"{name}: no tap loop found"
        for lo, hi in loops:
            ops = _mix(body, lo, hi)
            division = {o: n for o, n in ops.items() if o.startswith("MUFU.RCP") or re.match(r"I2F.*\.RP", o)}
            assert not division, f"{name}: integer division in the tap loop {lo:#x}-{hi:#x}: {division}"


@needs_nvcc
@pytest.mark.parametrize("width", sorted(FORWARD_INSTRUCTIONS_PER_FMA))
@pytest.mark.parametrize("dtype", ["c10::BFloat16", "c10::Half", "float"])
def test_forward_tap_loop_instructions_per_fma(conv_kernels, dtype, width):
    bound = FORWARD_INSTRUCTIONS_PER_FMA[width]
    for name, body in _conv(conv_kernels, dtype, width, transposed=False).items():
        loops = _tap_loops(body)
        assert loops, f"{name}: no tap loop found"
        for lo, hi in loops:
            ops = _mix(body, lo, hi)
            fma = sum(n for o, n in ops.items() if o.startswith("FFMA"))
            ratio = sum(ops.values()) / fma
            assert ratio <= bound, (f"{name}: {ratio:.2f} instructions per FFMA in the tap loop {lo:#x}-{hi:#x} "
                                    f"(bound {bound}): {ops.most_common(12)}")
            # The weights come from shared memory as 16-byte vectors at width 4 and up.
            assert ops["LDS.128"] >= width * width // 4, f"{name}: weights not read as vectors: {ops.most_common(12)}"


@needs_nvcc
@pytest.mark.parametrize("kernel", ["apply_forward_kernel", "apply_backward_kernel"])
@pytest.mark.parametrize("dtype,vec", [("c10::BFloat16", 8), ("c10::Half", 8), ("float", 4)])
def test_bn_act_elementwise_moves_16_bytes(bn_act_kernels, kernel, dtype, vec):
    found = {name: body for name, body in bn_act_kernels.items() if f"{kernel}<{dtype}, {vec}, " in name}
    # One instantiation per way the vector's elements map to channels (Mapping in bn_act_cuda.cu).
    assert len(found) == 3, f"expected 3 vectorised {kernel}<{dtype}> kernels, found {sorted(found)}"
    for name, body in found.items():
        ops = collections.Counter(_opcode(i) for _, i in body)
        loads = sum(n for o, n in ops.items() if o.startswith("LDG.E.128"))
        stores = sum(n for o, n in ops.items() if o.startswith("STG.E.128"))
        # x (and the residual, or y for the mask) in, one vector out, per access.
        assert loads >= 2 and stores >= 1, f"{name}: {loads} 16-byte loads, {stores} 16-byte stores"


def test_setup_compiles_cuda_without_fast_math():
    # Fast math flushes denormals and approximates the Welford merges' divisions; no GPU
    # test has shown the kernels' tolerances hold with it.
    flags = compile_gate.setup_nvcc_flags()
    assert not any("fast_math" in f or "fast-math" in f for f in flags), flags


@needs_nvcc
def test_gate_compiles_with_setup_flags():
    flags = compile_gate.setup_nvcc_flags()
    command = compile_gate._nvcc_command("csrc/bn_act_cuda.cu", 90, "k.o")
    assert command[command.index(flags[0]):][:len(flags)] == flags, command
