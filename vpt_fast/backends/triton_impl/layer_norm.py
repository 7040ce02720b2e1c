"""Triton LayerNorm over the last dim (rows = all leading dims) with a dX-only backward (the affine is
frozen): `layer_norm_fwd` / `layer_norm_bwd` with `torch_impl`'s signatures, run by the kernels in
`vpt_fast.kernels.layer_norm`. Statistics in float32; y written once in the requested dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.triton_impl.common import (
    DTYPES,
    as_rows,
    call,
    check_affine,
    check_available,
    check_same_device,
    check_tensor,
    custom_op,
    launch,
    row_config,
    triton,
)

if triton is not None:  # without triton the backend reports itself unavailable (common.AVAILABLE)
    from vpt_fast.kernels import layer_norm as kernels


def _layer_norm_fwd_fake(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    return y, stats, torch.empty_like(stats)


def _layer_norm_fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    C = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows = mean.numel()
    if rows == 0 or C == 0:
        return y, mean, rstd
    x2 = as_rows(x)
    launch(kernels._layer_norm_fwd, (rows,))(
        x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd,
        x2.stride(0), C, C, eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        **row_config(C))
    return y, mean, rstd


_layer_norm_fwd_op = custom_op("triton_layer_norm_fwd", _layer_norm_fwd_fake)(_layer_norm_fwd_impl)


def _layer_norm_bwd_fake(dy, x, weight, mean, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _layer_norm_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                       rstd: Tensor) -> Tensor:
    C = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = dx.numel() // C if C else 0
    if rows == 0:
        return dx
    x2, dy2 = as_rows(x), as_rows(dy)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    launch(kernels._layer_norm_bwd, (rows,))(
        dy2, x2, weight if weight is not None else x2, mean, rstd, dx,
        dy2.stride(0), x2.stride(0), C, C, HAS_WEIGHT=weight is not None, **row_config(C))
    return dx


_layer_norm_bwd_op = custom_op("triton_layer_norm_bwd", _layer_norm_bwd_fake)(_layer_norm_bwd_impl)


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim. Returns (y, mean, rstd): y in `out_dtype` (default x's dtype),
    rounded once from fp32; mean/rstd float32 of shape x.shape[:-1]."""
    check_available()
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("triton backend: x must have at least 1 dim")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"triton backend: out_dtype must be one of float32/float16/bfloat16, got {out_dtype}")
    check_affine("weight", weight, x)
    check_affine("bias", bias, x)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    return call(_layer_norm_fwd_impl, "triton_layer_norm_fwd", x, weight, bias, float(eps), out_dtype)


def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                   rstd: Tensor) -> Tensor:
    """dX only (in x's dtype; dy may be in another dtype): the affine parameters are frozen."""
    check_available()
    check_tensor("x", x)
    check_tensor("dy", dy)
    if dy.shape != x.shape:
        raise ValueError(f"triton backend: dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != x.shape[:-1] or t.dtype != torch.float32:
            raise ValueError(f"triton backend: {name} must be float32 of shape {tuple(x.shape[:-1])}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    check_affine("weight", weight, x)
    check_same_device(x, dy=dy, mean=mean, rstd=rstd)
    weight = None if weight is None else weight.contiguous()
    return call(_layer_norm_bwd_impl, "triton_layer_norm_bwd", dy, x, weight, mean, rstd)
