"""LayerNorm over the last dim in plain PyTorch: `layer_norm_fwd` / `layer_norm_bwd` (dX only: the
affine is frozen), aten's native kernels with statistics in the accumulation dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.dtypes import accumulation_dtype


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim. Returns (y, mean, rstd): y in `out_dtype` (default x's dtype),
    rounded once from the accumulation dtype; mean/rstd of shape x.shape[:-1] in the accumulation
    dtype (float32, float64 for float64 inputs)."""
    y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y, mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                   rstd: Tensor) -> Tensor:
    """dX only (in x's dtype; dy may be in another dtype): the affine parameters are frozen."""
    if weight is not None and weight.dtype != x.dtype:  # e.g. bf16 rows, fp32 affine: the aten kernel wants one dtype
        acc = accumulation_dtype(x)
        return layer_norm_bwd(dy.to(acc), x.to(acc), weight.to(acc), mean, rstd).to(x.dtype)
    dx, _, _ = torch.ops.aten.native_layer_norm_backward(
        dy.to(x.dtype), x, x.shape[-1:], mean.unsqueeze(-1), rstd.unsqueeze(-1), weight, None, [True, False, False])
    return dx
