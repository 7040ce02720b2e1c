"""Triton RMSNorm over the last dim (rows = all leading dims) with a dX-only backward (the weight is
frozen): `rms_norm_fwd` / `rms_norm_bwd` with `torch_impl`'s signatures, run by the kernels in
`vpt_fast.kernels.rms_norm`. The statistic in float32; y written once in the requested dtype.
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
    from vpt_fast.kernels import rms_norm as kernels


def _rms_norm_fwd_fake(x, weight, eps, out_dtype):
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rms_norm_fwd_impl(x: Tensor, weight: Optional[Tensor], eps: float,
                       out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    C = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rows = rstd.numel()
    if rows == 0 or C == 0:
        return y, rstd
    x2 = as_rows(x)
    launch(kernels._rms_norm_fwd, (rows,))(
        x2, weight if weight is not None else x2, y, rstd, x2.stride(0), C, C, eps,
        HAS_WEIGHT=weight is not None, **row_config(C))
    return y, rstd


_rms_norm_fwd_op = custom_op("triton_rms_norm_fwd", _rms_norm_fwd_fake)(_rms_norm_fwd_impl)


def _rms_norm_bwd_fake(dy, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rms_norm_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor) -> Tensor:
    C = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = dx.numel() // C if C else 0
    if rows == 0:
        return dx
    x2, dy2 = as_rows(x), as_rows(dy)
    rstd = rstd.contiguous()
    launch(kernels._rms_norm_bwd, (rows,))(
        dy2, x2, weight if weight is not None else x2, rstd, dx,
        dy2.stride(0), x2.stride(0), C, C, HAS_WEIGHT=weight is not None, **row_config(C))
    return dx


_rms_norm_bwd_op = custom_op("triton_rms_norm_bwd", _rms_norm_bwd_fake)(_rms_norm_bwd_impl)


def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim. Returns (y, rstd): y in `out_dtype` (default x's dtype), rounded
    once from fp32; rstd float32 of shape x.shape[:-1]."""
    check_available()
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("triton backend: x must have at least 1 dim")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"triton backend: out_dtype must be one of float32/float16/bfloat16, got {out_dtype}")
    if not isinstance(eps, (int, float)):
        raise TypeError(f"triton backend: eps must be a number, got {type(eps).__name__}")
    check_affine("weight", weight, x)
    weight = None if weight is None else weight.contiguous()
    return call(_rms_norm_fwd_impl, "triton_rms_norm_fwd", x, weight, float(eps), out_dtype)


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor) -> Tensor:
    """dX only (in x's dtype; dy may be in another dtype): the weight is frozen."""
    check_available()
    check_tensor("x", x)
    check_tensor("dy", dy)
    if dy.shape != x.shape:
        raise ValueError(f"triton backend: dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if rstd.shape != x.shape[:-1] or rstd.dtype != torch.float32:
        raise ValueError(f"triton backend: rstd must be float32 of shape {tuple(x.shape[:-1])}, "
                         f"got {rstd.dtype} {tuple(rstd.shape)}")
    check_affine("weight", weight, x)
    check_same_device(x, dy=dy, rstd=rstd)
    weight = None if weight is None else weight.contiguous()
    return call(_rms_norm_bwd_impl, "triton_rms_norm_bwd", dy, x, weight, rstd)
