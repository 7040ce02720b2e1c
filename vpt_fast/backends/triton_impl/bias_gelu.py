"""Triton fused bias + exact (erf) GELU with a dX-only backward: `bias_gelu_fwd` / `bias_gelu_bwd`
with `torch_impl`'s signatures, run by the kernels in `vpt_fast.kernels.bias_gelu` (math in fp32).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.triton_impl.common import (
    INTERPRET,
    call,
    check_affine,
    check_available,
    check_same_device,
    check_tensor,
    custom_op,
    eager,
    launch,
    triton,
)

if triton is not None:  # without triton the backend reports itself unavailable (common.AVAILABLE)
    from vpt_fast.kernels import bias_gelu as kernels


def _gelu_config() -> dict:
    return dict(BLOCK_SIZE=1024, num_warps=1) if INTERPRET else dict(BLOCK_SIZE=2048, num_warps=8)


def _bias_gelu_fwd_fake(h, bias):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _bias_gelu_fwd_impl(h: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device) if out is None else out
    n = h.numel()
    if n == 0:
        return out
    hc = h.contiguous()
    cfg = _gelu_config()
    launch(kernels._bias_gelu_fwd, (triton.cdiv(n, cfg["BLOCK_SIZE"]),))(
        hc, bias if bias is not None else hc, out, n, h.shape[-1], HAS_BIAS=bias is not None, **cfg)
    return out


_bias_gelu_fwd_op = custom_op("triton_bias_gelu_fwd", _bias_gelu_fwd_fake)(_bias_gelu_fwd_impl)


def _bias_gelu_bwd_fake(dg, h, bias):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _bias_gelu_bwd_impl(dg: Tensor, h: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if out is None else out
    n = h.numel()
    if n == 0:
        return dh
    hc, dgc = h.contiguous(), dg.contiguous()
    cfg = _gelu_config()
    launch(kernels._bias_gelu_bwd, (triton.cdiv(n, cfg["BLOCK_SIZE"]),))(
        dgc, hc, bias if bias is not None else hc, dh, n, h.shape[-1], HAS_BIAS=bias is not None, **cfg)
    return dh


_bias_gelu_bwd_op = custom_op("triton_bias_gelu_bwd", _bias_gelu_bwd_fake)(_bias_gelu_bwd_impl)


def _check_gelu(h: Tensor, bias: Optional[Tensor]):
    check_available()
    check_tensor("h", h)
    if h.dim() < 1:
        raise ValueError("triton backend: h must have at least 1 dim")
    check_affine("bias", bias, h)


def bias_gelu_fwd(h: Tensor, bias: Optional[Tensor], inplace: bool = False) -> Tensor:
    """gelu(h + bias), exact erf GELU as timm's default `nn.GELU`; computed in fp32. `inplace`:
    written into `h` (returned) when eager and `h` is contiguous (each element is read before it is
    overwritten, by the same program); traced, the out-of-place op runs."""
    _check_gelu(h, bias)
    bias = None if bias is None else bias.contiguous()
    if inplace and eager() and h.is_contiguous():
        return _bias_gelu_fwd_impl(h, bias, h)
    return call(_bias_gelu_fwd_impl, "triton_bias_gelu_fwd", h, bias)


def bias_gelu_bwd(dg: Tensor, h: Tensor, bias: Optional[Tensor], inplace: bool = False) -> Tensor:
    """d gelu(h + bias) / dh: dX only. `inplace`: written into `dg` (returned) when eager and `dg` is
    contiguous in h's dtype (each element is read before it is overwritten, by the same program);
    traced (torch.compile), the out-of-place op runs and the compiler plans the buffers."""
    _check_gelu(h, bias)
    check_tensor("dg", dg)
    if dg.shape != h.shape:
        raise ValueError(f"triton backend: dg must have h's shape {tuple(h.shape)}, got {tuple(dg.shape)}")
    check_same_device(h, dg=dg)
    bias = None if bias is None else bias.contiguous()
    if inplace and eager() and dg.is_contiguous() and dg.dtype == h.dtype:
        return _bias_gelu_bwd_impl(dg, h, bias, dg)
    return call(_bias_gelu_bwd_impl, "triton_bias_gelu_bwd", dg, h, bias)
