"""Fused ops with reference, Triton and CUDA backends (see engine.ops.dispatch)."""

from engine.ops.bn_act import BatchNormAct2d, bn_act, bn_act_op, bn_act_reference
from engine.ops.dispatch import REGISTRY, BackendUnavailableError

__all__ = ["BatchNormAct2d", "bn_act", "bn_act_op", "bn_act_reference", "REGISTRY", "BackendUnavailableError"]
