"""Builds the optional extension engine._C from csrc/.

- CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit is found
  (CUDA_HOME, else /usr/local/cuda, else the toolkit of the nvcc on PATH); otherwise the
  extension is C++ only, and says why.
- ENGINE_SKIP_EXT=1 builds no extension: the package still imports and trains.
- MAX_JOBS bounds parallel compilation (torch's ninja builder reads it).
- TORCH_CUDA_ARCH_LIST defaults to Hopper (sm_90, H100/H200) plus PTX for newer GPUs.
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup

PACKAGES = ["engine", "engine.ops", "engine.models", "engine.data", "engine.kernels"]
PACKAGE_DIR = {"engine.kernels": "kernels"}
# nvcc flags of the CUDA sources (benchmarks/compile_gate.py compiles with these too). No
# --use_fast_math: it flushes denormals and approximates divisions (the Welford merges'
# n_b / total, the 1 / count of the running means) and square roots, and no test on a GPU
# has shown the kernels' tolerances still hold with it.
NVCC_FLAGS = ["-O3", "-lineinfo"]


def cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home and shutil.which("nvcc"):
        home = nvcc_toolkit(shutil.which("nvcc"))
    return home


def nvcc_toolkit(nvcc):
    """The toolkit root of an nvcc found on PATH, as nvcc itself reports it (its TOP): the
    path may be a link or a wrapper script (/usr/local/bin/nvcc execs a versioned toolkit's),
    and a guessed root (torch guesses nvcc's grandparent, /usr/local) has no libcudart."""
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line[len("#$ TOP="):].strip())
    return None


def extensions():
    if os.environ.get("ENGINE_SKIP_EXT") == "1":
        print("engine: ENGINE_SKIP_EXT=1, building no extension")
        return [], {}
    home = cuda_home()
    if home:
        # torch's cpp_extension reads CUDA_HOME at import; without it, it guesses from
        # nvcc's path (/usr/local) and the link fails on -lcudart.
        os.environ["CUDA_HOME"] = home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    # No -std flag: torch's extension builder picks the standard its headers need.
    cxx = ["-O3"]
    with_cuda = torch.version.cuda is not None and home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        ext = CUDAExtension(
            "engine._C",
            sources + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("ENGINE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
        )
        print(f"engine: building engine._C with CUDA ({home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        print(f"engine: building engine._C without CUDA: {why}")
        ext = CppExtension("engine._C", sources, extra_compile_args=cxx)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="engine",
    version="0.1.0",
    description="ResNeXt hashtag pretraining with fused Triton and CUDA kernels",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton", "numpy", "pybind11"],
    extras_require={"test": ["pytest", "torchvision"], "bench": ["matplotlib", "torchvision"]},
    entry_points={"console_scripts": ["engine=engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
