"""Fused ops with reference, Triton and CUDA backends (see engine.ops.dispatch)."""

from engine.ops.bn_act import BatchNormAct2d, bn_act, bn_act_op, bn_act_reference
from engine.ops.dispatch import REGISTRY, BackendUnavailableError

__all__ = ["BatchNormAct2d", "bn_act", "bn_act_op", "bn_act_reference", "REGISTRY", "BackendUnavailableError"]
from engine.ops.hashtag_ce import hashtag_ce

# Probe once, eagerly: torch.compile then reads the cached answers instead of tracing the probes.
from engine.ops import backends as _backends  # noqa: E402

_backends.triton_status()
_backends.load_extension()
