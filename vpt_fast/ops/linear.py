"""Frozen linear layer: y = x W^T + b whose backward computes dX only and saves nothing.

With a frozen weight, dX = dY W needs neither x nor y, so nothing is kept alive for backward
(docs/design.md §2.3). Weights the user explicitly unfreezes take autograd's ordinary path instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        y = F.linear(x, weight, bias)  # autocast, if active, applies here as in timm
        if y._base is not None:  # a view of the 2D GEMM output (3-dim x with a bias): make it a tensor of
            y = torch.ops.aten._unsafe_view(y, y.shape)  # its own, so a later op may write into it in place
        ctx.save_for_backward(weight)  # a parameter: no activation memory
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (weight,) = ctx.saved_tensors
        dx = torch.matmul(dy, weight.to(dy.dtype)).to(ctx.x_dtype)
        return dx, None, None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    if not x.requires_grad:
        return F.linear(x, weight, bias)
    return FrozenLinear.apply(x, weight, bias)
