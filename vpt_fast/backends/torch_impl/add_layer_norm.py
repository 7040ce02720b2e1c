"""Residual add then LayerNorm in plain PyTorch: `add_layer_norm_fwd` / `add_layer_norm_bwd` (input
gradients only: the affine and the LayerScale are frozen), the sum as timm computes it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.dtypes import accumulation_dtype, sum_norm_operands
from vpt_fast.backends.torch_impl.layer_norm import layer_norm_bwd, layer_norm_fwd


def add_layer_norm_fwd(residual: Tensor, branch: Tensor, scale: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, out_dtype: Optional[torch.dtype] = None,
                       s_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Residual add then LayerNorm over the last dim: s = residual + branch * scale (`scale` an optional
    per-channel LayerScale), computed as timm's `x + ls(branch)` computes it, in torch's promoted
    dtype; y = LayerNorm(s) with statistics in the accumulation dtype (float32, float64 for float64),
    rounded once to `out_dtype` (default s's dtype). Returns (s, y, mean, rstd). `s_out`: s is written
    there (it may be `branch` itself: the same values, one buffer fewer)."""
    if s_out is None:
        s = residual + (branch if scale is None else branch * scale)
    else:
        s = torch.add(residual, branch if scale is None else torch.mul(branch, scale, out=s_out), out=s_out)
    y, mean, rstd = layer_norm_fwd(*sum_norm_operands(s, weight, bias), eps, out_dtype or s.dtype)
    return s, y, mean, rstd


def add_layer_norm_bwd(ds: Optional[Tensor], dy: Optional[Tensor], s: Tensor, weight: Optional[Tensor],
                       mean: Tensor, rstd: Tensor, scale: Optional[Tensor],
                       branch_dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Input gradients of `add_layer_norm_fwd` (the affine and the scale are frozen): (d residual,
    d branch). d residual = ds + LayerNorm's dX(dy), both in s's dtype, summed as autograd sums the
    two uses of s; d branch = d residual times `scale` in the product's dtype, in `branch_dtype`.
    `ds` or `dy` may be None (no gradient reached s or y); both None gives (None, None)."""
    if ds is None and dy is None:
        return None, None
    total = ds
    if dy is not None:
        dx = layer_norm_bwd(dy, s.to(accumulation_dtype(s)), weight, mean, rstd).to(s.dtype)
        total = dx if ds is None else ds.to(s.dtype) + dx
    if scale is None:
        return total, total.to(branch_dtype)
    product_dtype = torch.promote_types(branch_dtype, scale.dtype)
    return total, (total.to(product_dtype) * scale).to(branch_dtype)
