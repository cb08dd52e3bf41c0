"""What this machine can run: Triton (GPU, or its CPU interpreter for tests) and the
compiled extension engine._C. Each function returns None when usable, else a reason."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch


def _computed_once(fn):
    """Caches a no-argument probe in a plain dict, which torch.compile reads without
    the warning it gives for functools caches."""
    cache: dict = {}

    @functools.wraps(fn)
    def probe():
        if "value" not in cache:
            cache["value"] = fn()
        return cache["value"]
    return probe


def verify_on_cpu() -> bool:
    """ENGINE_VERIFY=1: CPU tensors take the device path (fused backends chosen
    automatically, each verified first; engine.ops.verify), for tests without a GPU."""
    return os.environ.get("ENGINE_VERIFY") == "1"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@_computed_once
def triton_status() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # an absent or broken install must not break `import engine`
        return f"triton is not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors, for testing)"
    return None


def triton_scope() -> str:
    if torch.cuda.is_available():
        return "CUDA tensors"
    return "CPU tensors through the interpreter, when forced (testing only)"


def triton_accepts(*tensors: torch.Tensor, forced: bool) -> Optional[str]:
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"} and triton_interpreting():
        if forced or verify_on_cpu():
            return None
        return "CPU tensors run only in Triton's interpreter, which is for testing: force backend='triton' to use it"
    return f"needs CUDA tensors, got {sorted(devices)}"


_EXT_ERROR: Optional[str] = None


@_computed_once
def load_extension():
    """engine._C, or None with the reason kept for `extension_status`."""
    global _EXT_ERROR
    if os.environ.get("ENGINE_SKIP_EXT") == "1":
        _EXT_ERROR = "ENGINE_SKIP_EXT=1 is set"
        return None
    try:
        from engine import _C
    except ImportError as e:
        _EXT_ERROR = (f"engine._C is not built ({e}); build it with "
                      "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`")
        return None
    return _C


def extension_status() -> Optional[str]:
    return _EXT_ERROR if load_extension() is None else None


def extension_has_cuda() -> bool:
    ext = load_extension()
    return ext is not None and bool(ext.built_with_cuda())


def cuda_ext_scope() -> str:
    cpu = "CPU tensors through its C++ loop, when forced"
    if not extension_has_cuda():
        return cpu + "; built without CUDA kernels"
    if not torch.cuda.is_available():
        return cpu + "; CUDA kernels compiled, no CUDA device to run them"
    return "CUDA tensors; " + cpu


def cuda_ext_accepts(*tensors: torch.Tensor, forced: bool) -> Optional[str]:
    """The `cuda` backend runs its CUDA kernels on CUDA tensors; its C++ CPU loop, which
    shares the argument checks and the arithmetic plan, runs on CPU tensors only when forced."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        if not extension_has_cuda():
            return "engine._C was built without CUDA sources (no CUDA toolkit or CPU-only torch at build time)"
        return None
    if devices == {"cpu"}:
        if forced or verify_on_cpu():
            return None
        return "CPU tensors: ATen's native kernels (reference) are faster than the C++ fallback loop"
    return f"needs CUDA or CPU tensors on one device, got {sorted(devices)}"


# The dtypes every fused backend computes in (fp32 statistics and accumulation inside).
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fast_dtype_rejection(x: torch.Tensor, *, tensor_core_dots: bool = False) -> Optional[str]:
    """Why a fused backend cannot take x's dtype, or None. `tensor_core_dots`: the kernels
    use tl.dot, which Triton's CPU interpreter gets wrong in bfloat16 (triton 3.8)."""
    if x.dtype not in FAST_DTYPES:
        return f"x dtype {x.dtype} is not one of float32, float16, bfloat16"
    if tensor_core_dots and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return "bfloat16 tl.dot gives wrong results in Triton's CPU interpreter (triton 3.8)"
    return None


def check_image_batch(op: str, x) -> None:
    """The input errors of every op over an image batch: x a 4-D floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")


def check_parameter(op: str, what: str, t: torch.Tensor, shape: tuple, x: torch.Tensor, why_shape: str = "") -> None:
    """A parameter's errors: its shape (`why_shape` says what that shape follows from), a
    floating dtype, and x's device."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {what} must have shape {list(shape)}{why_shape}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {what} must be floating point, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {what} is on {t.device} but x is on {x.device}")
