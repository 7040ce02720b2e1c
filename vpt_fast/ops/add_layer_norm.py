"""Fused residual add + frozen LayerNorm: (s, y) = (residual + branch * scale, LayerNorm(s)), with a
dX-only backward (docs/design.md §2.3, §2.4).

timm's pre-norm block computes `x = x + ls1(attn(...))` and then `norm2(x)`: the float32 residual
stream is written by the add and read back by the LayerNorm, and in backward LayerNorm's dX is
written, read back and summed with the gradient of the next residual add. Here one forward kernel
writes s and y, and one backward kernel writes ds_total = ds + LayerNorm-backward(dy) as the gradient
of both the residual and the branch.

Saved for backward: s with the per-row mean and rstd, not the normalised rows: s is an output the
forward writes anyway (the next residual add reads it), so saving it costs no extra write, while
normalised rows would be one more (rows, C) float32 tensor written in forward, to save 4 bytes a row
(the mean; 1/C of s, 0.13% at C = 768).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve
from vpt_fast.backends.dtypes import norm_operands, norm_output_dtype, sum_dtype
from vpt_fast.ops import any_trainable
from vpt_fast.ops.layer_norm import layer_norm


class FrozenAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual: Tensor, branch: Tensor, scale: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, out_dtype: Optional[torch.dtype], backend: str):
        impl = resolve(backend, "add_layer_norm", residual.device)
        s, y, mean, rstd = impl.add_layer_norm_fwd(residual, branch, scale, weight, bias, eps, out_dtype)
        ctx.save_for_backward(s, weight, mean, rstd, scale)
        ctx.impl, ctx.branch_dtype = impl, branch.dtype
        ctx.set_materialize_grads(False)  # an unused s or y sends None: no zero tensor is read
        return s, y

    @staticmethod
    @once_differentiable
    def backward(ctx, ds: Optional[Tensor], dy: Optional[Tensor]):
        s, weight, mean, rstd, scale = ctx.saved_tensors
        d_residual, d_branch = ctx.impl.add_layer_norm_bwd(
            None if ds is None else ds.contiguous(), None if dy is None else dy.contiguous(), s, weight, mean, rstd,
            scale, ctx.branch_dtype)
        return d_residual, d_branch, None, None, None, None, None, None


def add_layer_norm(residual: Tensor, branch: Tensor, norm: nn.Module, backend: str, scale: Optional[Tensor] = None,
                   feeds_matmul: bool = False) -> tuple[Tensor, Tensor]:
    """(s, y) = (residual + branch * scale, norm(s)) for a frozen `nn.LayerNorm` over the last dim.

    The same values as `s = residual + branch * scale; y = layer_norm(s, norm, backend, feeds_matmul)`
    (timm's `x = x + ls1(branch)` then `norm2(x)`), in one forward and one backward kernel.

    Args:
        residual: the residual stream (..., C), float32 under autocast.
        branch: what is added to it, residual's shape, any floating dtype.
        norm: a frozen `nn.LayerNorm` over C.
        backend: the backend whose `add_layer_norm` primitives run ("auto" or a registered one with primitives).
        scale: an optional (C,) per-channel scale of the branch (timm's LayerScale gamma).
        feeds_matmul: y goes straight into a linear or attention: under autocast it is written in the
            autocast dtype (docs/design.md §2.5).

    A trainable norm or scale takes autograd's own path (unfused), which computes their gradients.
    """
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(f"norm must be an nn.LayerNorm over the last dim, got {type(norm).__name__}")
    if branch.shape != residual.shape:
        raise ValueError(f"branch must have residual's shape {tuple(residual.shape)}, got {tuple(branch.shape)}")
    if scale is not None and scale.shape != residual.shape[-1:]:
        raise ValueError(f"scale must have shape ({residual.shape[-1]},) (residual's last dim), "
                         f"got {tuple(scale.shape)}")
    if any_trainable(norm) or (scale is not None and scale.requires_grad):
        s = residual + (branch if scale is None else branch * scale)
        return s, layer_norm(s, norm, backend, feeds_matmul)
    out_dtype = norm_output_dtype(sum_dtype(residual, branch, scale), residual.device, feeds_matmul)
    weight, bias = norm_operands(residual.device, norm.weight, norm.bias)
    return FrozenAddLayerNorm.apply(residual, branch, scale, weight, bias, norm.eps, out_dtype, backend)
