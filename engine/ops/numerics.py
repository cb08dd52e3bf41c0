"""How close is close enough: the numeric comparison behind every check of a fused
backend against its reference (engine.ops.verify's checks, the autotuner's result check,
the whole-step check of a fused model). It imports nothing else of the project."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Largest error allowed, relative to the reference tensor's largest magnitude, by the
# lowest-precision floating dtype among the inputs. fp32 allows for TF32 tensor cores.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def tensors_in(value):
    """Every tensor in a value, nested tuples, lists and dicts included, in order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def lowest_precision(dtypes) -> torch.dtype:
    """The dtype whose tolerance applies: the least precise floating one."""
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    return min((d for d in dtypes if d in order), key=order.index, default=torch.float32)


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (inf when got is not finite where want is)."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.detach().double(), want.detach().double()
    finite = torch.isfinite(want)
    if not bool(torch.isfinite(got[finite]).all()):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    scale = want[finite].abs().max().item()
    return (got[finite] - want[finite]).abs().max().item() / max(scale, 1e-12)


def compare(pairs: list[tuple[str, Tensor, Tensor]], dtype: torch.dtype,
            floors: Optional[dict[str, float]] = None) -> dict:
    """Pass or mismatch over named (got, want) pairs: each within dtype's tolerance or, when
    `floors` gives the error the reference itself makes at that precision, twice that."""
    base = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    floors = floors or {}
    errors = {name: relative_error(got, want) for name, got, want in pairs}
    allowed = {name: max(base, 2.0 * floors.get(name, 0.0)) for name in errors}
    over = {name: errors[name] / allowed[name] for name in errors if not errors[name] <= allowed[name]}
    max_error = max(errors.values(), default=0.0)
    if over:
        worst = max(over, key=over.get)
        return {"status": "mismatch", "max_error": max_error, "errors": errors,
                "detail": f"{worst} is off by {errors[worst]:.3g} of its largest value (allowed {allowed[worst]:.3g} "
                          f"in {str(dtype)[6:]})"}
    return {"status": "pass", "max_error": max_error, "errors": errors, "detail": f"max error {max_error:.3g}"}
