"""Triton fused residual add + LayerNorm over the last dim with a dX-only backward (the affine and the
LayerScale are frozen): `add_layer_norm_fwd` / `add_layer_norm_bwd` with `torch_impl`'s signatures,
run by the kernels in `vpt_fast.kernels.add_layer_norm`. s is written once in the residual stream's
dtype, y once in the requested dtype; statistics in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.dtypes import sum_dtype
from vpt_fast.backends.triton_impl.common import (
    DTYPES,
    as_rows,
    call,
    check_affine,
    check_available,
    check_same_device,
    check_tensor,
    custom_op,
    eager,
    launch,
    row_config,
    triton,
)

if triton is not None:  # without triton the backend reports itself unavailable (common.AVAILABLE)
    from vpt_fast.kernels import add_layer_norm as kernels


def _add_layer_norm_fwd_fake(residual, branch, scale, weight, bias, eps, out_dtype):
    s = torch.empty_like(residual, dtype=sum_dtype(residual, branch, scale), memory_format=torch.contiguous_format)
    stats = residual.new_empty(residual.shape[:-1], dtype=torch.float32)
    return s, torch.empty_like(s, dtype=out_dtype or s.dtype), stats, torch.empty_like(stats)


def _add_layer_norm_fwd_impl(residual: Tensor, branch: Tensor, scale: Optional[Tensor], weight: Optional[Tensor],
                             bias: Optional[Tensor], eps: float, out_dtype: Optional[torch.dtype],
                             s_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    C = residual.shape[-1]
    s = s_out if s_out is not None else torch.empty(residual.shape, dtype=sum_dtype(residual, branch, scale),
                                                    device=residual.device)
    y = torch.empty(residual.shape, dtype=out_dtype or s.dtype, device=residual.device)
    mean = torch.empty(residual.shape[:-1], dtype=torch.float32, device=residual.device)
    rstd = torch.empty_like(mean)
    rows = mean.numel()
    if rows == 0 or C == 0:
        return s, y, mean, rstd
    res2, branch2 = as_rows(residual), as_rows(branch)
    launch(kernels._add_layer_norm_fwd, (rows,))(
        res2, branch2, scale if scale is not None else res2, weight if weight is not None else res2,
        bias if bias is not None else res2, s, y, mean, rstd, res2.stride(0), branch2.stride(0), C, C, C, eps,
        HAS_SCALE=scale is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        **row_config(C))
    return s, y, mean, rstd


_add_layer_norm_fwd_op = custom_op("triton_add_layer_norm_fwd", _add_layer_norm_fwd_fake)(_add_layer_norm_fwd_impl)


def _add_layer_norm_bwd_fake(ds, dy, s, weight, mean, rstd, scale, branch_dtype):
    d_residual = torch.empty_like(s, memory_format=torch.contiguous_format)
    if branch_dtype is None:
        return [d_residual]
    return [d_residual, torch.empty_like(d_residual, dtype=branch_dtype)]


def _add_layer_norm_bwd_impl(ds: Optional[Tensor], dy: Optional[Tensor], s: Tensor, weight: Optional[Tensor],
                             mean: Tensor, rstd: Tensor, scale: Optional[Tensor],
                             branch_dtype: Optional[torch.dtype]) -> list[Tensor]:
    """[d residual] or, with `branch_dtype`, [d residual, d branch (times `scale` if given)]."""
    C = s.shape[-1]
    d_residual = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    d_branch = None if branch_dtype is None else torch.empty(s.shape, dtype=branch_dtype, device=s.device)
    outputs = [d_residual] if d_branch is None else [d_residual, d_branch]
    rows = mean.numel()
    if rows == 0 or C == 0:
        return outputs
    s2 = as_rows(s)
    ds2 = s2 if ds is None else as_rows(ds)
    dy2 = s2 if dy is None else as_rows(dy)
    launch(kernels._add_layer_norm_bwd, (rows,))(
        ds2, dy2, s2, weight if weight is not None else s2, mean.contiguous(), rstd.contiguous(),
        scale if scale is not None else s2, d_residual, d_residual if d_branch is None else d_branch,
        ds2.stride(0), dy2.stride(0), s2.stride(0), C, C, C, HAS_DS=ds is not None, HAS_DY=dy is not None,
        HAS_WEIGHT=weight is not None, HAS_SCALE=scale is not None, WRITE_DBRANCH=d_branch is not None,
        **row_config(C))
    return outputs


_add_layer_norm_bwd_op = custom_op("triton_add_layer_norm_bwd", _add_layer_norm_bwd_fake)(_add_layer_norm_bwd_impl)


def add_layer_norm_fwd(residual: Tensor, branch: Tensor, scale: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, out_dtype: Optional[torch.dtype] = None,
                       s_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """s = residual + branch * scale, then LayerNorm of s over the last dim. Returns (s, y, mean, rstd):
    s in torch's promoted dtype of the inputs, y in `out_dtype` (default s's dtype) rounded once from
    fp32, mean/rstd float32 of shape residual.shape[:-1]. A `scale` whose product with the branch
    promotes to half precision is applied first in torch, so the product is rounded as torch rounds it.
    `s_out`: a contiguous tensor of s's shape and dtype that s is written into, in eager mode (it may be
    `branch` itself: each program reads its row before writing it); traced, the op allocates s."""
    check_available()
    check_tensor("residual", residual)
    check_tensor("branch", branch)
    if residual.dim() < 1:
        raise ValueError("triton backend: residual must have at least 1 dim")
    if branch.shape != residual.shape:
        raise ValueError(f"triton backend: branch must have residual's shape {tuple(residual.shape)}, "
                         f"got {tuple(branch.shape)}")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"triton backend: out_dtype must be one of float32/float16/bfloat16, got {out_dtype}")
    check_same_device(residual, branch=branch)
    for name, t in (("scale", scale), ("weight", weight), ("bias", bias)):
        check_affine(name, t, residual)
    if scale is not None and torch.promote_types(branch.dtype, scale.dtype) != torch.float32:
        branch, scale = branch * scale, None
    scale, weight, bias = (None if t is None else t.contiguous() for t in (scale, weight, bias))
    if s_out is not None and eager():
        if s_out.shape != residual.shape or s_out.dtype != sum_dtype(residual, branch, scale) \
                or not s_out.is_contiguous():
            raise ValueError(f"triton backend: s_out must be a contiguous {sum_dtype(residual, branch, scale)} "
                             f"tensor of shape {tuple(residual.shape)}, got {s_out.dtype} {tuple(s_out.shape)}")
        return _add_layer_norm_fwd_impl(residual, branch, scale, weight, bias, float(eps), out_dtype, s_out)
    s, y, mean, rstd = call(_add_layer_norm_fwd_impl, "triton_add_layer_norm_fwd", residual, branch, scale, weight,
                            bias, float(eps), out_dtype)
    return (s if s_out is None else s_out.copy_(s)), y, mean, rstd


def add_layer_norm_bwd(ds: Optional[Tensor], dy: Optional[Tensor], s: Tensor, weight: Optional[Tensor],
                       mean: Tensor, rstd: Tensor, scale: Optional[Tensor],
                       branch_dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(d residual, d branch): d residual = ds + LayerNorm's dX(dy) in s's dtype, written once; d branch
    is the same tensor when the branch needs nothing else, else ds_total * scale in `branch_dtype`,
    written in the same pass. `ds` or `dy` may be None (no gradient reached s or y); both None gives
    (None, None). The affine and scale are frozen: no gradients for them."""
    check_available()
    check_tensor("s", s)
    if ds is None and dy is None:
        return None, None
    for name, t in (("ds", ds), ("dy", dy)):
        if t is not None:
            check_tensor(name, t)
            if t.shape != s.shape:
                raise ValueError(f"triton backend: {name} must have s's shape {tuple(s.shape)}, got {tuple(t.shape)}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != s.shape[:-1] or t.dtype != torch.float32:
            raise ValueError(f"triton backend: {name} must be float32 of shape {tuple(s.shape[:-1])}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if branch_dtype not in DTYPES:
        raise TypeError(f"triton backend: branch_dtype must be one of float32/float16/bfloat16, got {branch_dtype}")
    check_affine("weight", weight, s)
    check_affine("scale", scale, s)
    check_same_device(s, ds=ds, dy=dy, mean=mean, rstd=rstd)
    # A product that promoted to half precision was taken in torch by the forward: so is its gradient.
    scale_in_torch = scale is not None and torch.promote_types(branch_dtype, scale.dtype) != torch.float32
    kernel_scale = None if scale is None or scale_in_torch else scale.contiguous()
    separate = kernel_scale is not None or (branch_dtype != s.dtype and not scale_in_torch)
    weight = None if weight is None else weight.contiguous()
    outputs = call(_add_layer_norm_bwd_impl, "triton_add_layer_norm_bwd", ds, dy, s, weight, mean, rstd,
                   kernel_scale, branch_dtype if separate else None)
    d_residual = outputs[0]
    if scale_in_torch:
        product_dtype = torch.promote_types(branch_dtype, scale.dtype)
        return d_residual, (d_residual.to(product_dtype) * scale).to(branch_dtype)
    return d_residual, outputs[1] if separate else d_residual
