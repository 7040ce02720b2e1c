"""Bias + exact (erf) GELU in plain PyTorch: `bias_gelu_fwd` / `bias_gelu_bwd` (dX only), optionally
in place to save the MLP's 4x-wide buffers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def bias_gelu_fwd(h: Tensor, bias: Optional[Tensor], inplace: bool = False) -> Tensor:
    """gelu(h + bias), exact erf GELU as timm's default `nn.GELU`. `inplace`: written into `h`
    (returned), for callers that own h and need no gradient (no 4x-wide buffer allocated)."""
    if inplace:
        return torch.ops.aten.gelu_(h if bias is None else h.add_(bias))
    return F.gelu(h if bias is None else h + bias)


def bias_gelu_bwd(dg: Tensor, h: Tensor, bias: Optional[Tensor], inplace: bool = False) -> Tensor:
    """d gelu(h + bias) / dh: dX only. `inplace`: written into `dg` (returned), which saves a buffer
    4x the block's width at the peak of the MLP backward."""
    a = h if bias is None else h + bias
    if inplace:
        return torch.ops.aten.gelu_backward.grad_input(dg, a, grad_input=dg)
    return torch.ops.aten.gelu_backward(dg, a)
