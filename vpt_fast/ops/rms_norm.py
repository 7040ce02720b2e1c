"""Frozen RMSNorm (timm `RmsNorm`, `torch.nn.RMSNorm`; AIMv2 and some Eva models): dX-only backward;
saves the input, the weight and the per-row rstd (docs/design.md §2.3)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve
from vpt_fast.backends.dtypes import accumulation_dtype, norm_operands, norm_output_dtype
from vpt_fast.ops import any_trainable


class FrozenRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: Optional[torch.dtype],
                backend: str):
        impl = resolve(backend, "rms_norm", x.device)
        y, rstd = impl.rms_norm_fwd(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.impl = impl
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        return ctx.impl.rms_norm_bwd(dy.contiguous(), x, weight, rstd), None, None, None, None


def _rms_norm_classes() -> tuple[type, ...]:
    from timm.layers import RmsNorm
    return RmsNorm, torch.nn.RMSNorm


def is_rms_norm(module: torch.nn.Module) -> bool:
    """A timm `RmsNorm` or a `torch.nn.RMSNorm` (or a subclass that keeps its forward) over the last dim."""
    classes = _rms_norm_classes()
    return (isinstance(module, classes) and type(module).forward in tuple(c.forward for c in classes)
            and len(module.normalized_shape) == 1)


def rms_norm_eps(eps: Optional[float], x: Tensor) -> float:
    """The eps an RMSNorm with setting `eps` adds for rows `x` (as the norm reads them): `eps` itself,
    or for `nn.RMSNorm(eps=None)` torch's default, the machine epsilon of the dtype torch.rms_norm
    computes in (float32 for half rows, float64 for float64)."""
    return torch.finfo(accumulation_dtype(x)).eps if eps is None else float(eps)


def rms_norm(x: Tensor, norm: torch.nn.Module, backend: str, feeds_matmul: bool = False) -> Tensor:
    """Apply a frozen RMSNorm over the last dim (see `is_rms_norm`) with the given backend's kernels.

    The dtype policy is `layer_norm`'s: under autocast RMSNorm runs in float32 (`norm_operands`); with
    `feeds_matmul` (the output goes straight into a linear or attention, which autocast would cast to
    its low dtype) the result is written once in that low dtype (`norm_output_dtype`). A trainable
    weight takes the module's own forward, whose autograd computes its gradient.
    """
    if not is_rms_norm(norm):
        raise TypeError(f"expected timm RmsNorm or nn.RMSNorm over the last dim, got {type(norm).__name__}")
    if any_trainable(norm):
        return norm(x)  # unfrozen weight: autograd's own path computes its gradient
    out_dtype = norm_output_dtype(x.dtype, x.device, feeds_matmul)
    x, weight = norm_operands(x.device, x, norm.weight)
    return FrozenRmsNorm.apply(x, weight, rms_norm_eps(norm.eps, x), out_dtype, backend)
