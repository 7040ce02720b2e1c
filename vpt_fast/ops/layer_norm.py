"""Frozen LayerNorm: dX-only backward; saves the input and per-row statistics (docs/design.md §2.3)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve
from vpt_fast.backends.dtypes import norm_operands, norm_output_dtype
from vpt_fast.ops import any_trainable


class FrozenLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                out_dtype: Optional[torch.dtype], backend: str):
        impl = resolve(backend, "layer_norm", x.device)
        y, mean, rstd = impl.layer_norm_fwd(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.impl = impl
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        return ctx.impl.layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd), None, None, None, None, None


def layer_norm(x: Tensor, norm: torch.nn.Module, backend: str, feeds_matmul: bool = False) -> Tensor:
    """Apply a frozen `nn.LayerNorm` (over the last dim) with the given backend's kernels.

    Under autocast LayerNorm runs in float32 (`norm_operands`). With `feeds_matmul` (the output goes
    straight into a linear or attention, which autocast would cast to its low dtype) the result is
    written once in that low dtype (`norm_output_dtype`).
    """
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(f"expected nn.LayerNorm over the last dim, got {type(norm).__name__}")
    if any_trainable(norm):
        return norm(x)  # unfrozen affine: autograd's own path computes its gradients
    out_dtype = norm_output_dtype(x.dtype, x.device, feeds_matmul)
    x, weight, bias = norm_operands(x.device, x, norm.weight, norm.bias)
    return FrozenLayerNorm.apply(x, weight, bias, norm.eps, out_dtype, backend)
