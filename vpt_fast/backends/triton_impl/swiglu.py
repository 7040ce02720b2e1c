"""Triton SwiGLU gate silu(gate) * up with an input-gradient backward: `swiglu_fwd` / `swiglu_bwd`
with `torch_impl`'s signatures, run by the kernels in `vpt_fast.kernels.swiglu` (math in fp32). gate
and up may be row-strided views (the halves of a packed fc1 output) and are read in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.triton_impl.common import (
    INTERPRET,
    as_rows,
    call,
    check_available,
    check_same_device,
    check_tensor,
    custom_op,
    eager,
    launch,
    triton,
)

if triton is not None:  # without triton the backend reports itself unavailable (common.AVAILABLE)
    from vpt_fast.kernels import swiglu as kernels


def _config(n_cols: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_SIZE=min(1024, triton.next_power_of_2(max(n_cols, 16))), num_warps=1)
    return dict(BLOCK_SIZE=1024, num_warps=4)


def _grid(rows: int, n_cols: int, cfg: dict) -> tuple[int, int]:
    return rows, triton.cdiv(n_cols, cfg["BLOCK_SIZE"])


def _swiglu_fwd_fake(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _swiglu_fwd_impl(gate: Tensor, up: Tensor) -> Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    C = gate.shape[-1]
    if out.numel() == 0:
        return out
    g2, u2 = as_rows(gate), as_rows(up)
    cfg = _config(C)
    launch(kernels._swiglu_fwd, _grid(g2.shape[0], C, cfg))(
        g2, u2, out, g2.stride(0), u2.stride(0), C, C, **cfg)
    return out


_swiglu_fwd_op = custom_op("triton_swiglu_fwd", _swiglu_fwd_fake)(_swiglu_fwd_impl)


def _swiglu_bwd_fake(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _launch_bwd(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor) -> None:
    """dgate, dup: (rows, C) views with unit column stride (fresh buffers, or gate's and up's own)."""
    C = gate.shape[-1]
    d2, g2, u2 = as_rows(dout), as_rows(gate), as_rows(up)
    cfg = _config(C)
    launch(kernels._swiglu_bwd, _grid(g2.shape[0], C, cfg))(
        d2, g2, u2, dgate, dup, d2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0), dup.stride(0), C,
        **cfg)


def _swiglu_bwd_impl(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() > 0:
        C = gate.shape[-1]
        _launch_bwd(dout, gate, up, dgate.view(-1, C), dup.view(-1, C))
    return dgate, dup


_swiglu_bwd_op = custom_op("triton_swiglu_bwd", _swiglu_bwd_fake)(_swiglu_bwd_impl)


def _row_view(t: Tensor) -> Optional[Tensor]:
    """`t` as (rows, C) sharing its storage with unit column stride, or None where no view exists."""
    try:
        v = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return v if v.stride(-1) == 1 or v.shape[-1] == 1 else None


def _check_pair(gate: Tensor, up: Tensor) -> None:
    check_available()
    check_tensor("gate", gate)
    if gate.dim() < 1:
        raise ValueError("triton backend: gate must have at least 1 dim")
    check_tensor("up", up, dtype=gate.dtype)
    if up.shape != gate.shape:
        raise ValueError(f"triton backend: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same_device(gate, up=up)


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (timm `SwiGLU` / `GluMlp` with SiLU) in gate's dtype, computed in fp32. gate
    and up share one shape and dtype; either may be a strided view (the halves of a packed fc1 output)."""
    _check_pair(gate, up)
    return call(_swiglu_fwd_impl, "triton_swiglu_fwd", gate, up)


def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """(dgate, dup) of silu(gate) * up for `dout` (which may be in another dtype), in gate's dtype.
    `inplace`: written into `gate` and `up` (returned), for callers that own them and read them no
    more: by the kernel itself when eager and both are (rows, C) views, else copied in after the
    out-of-place op (traced, the compiler plans the buffers)."""
    _check_pair(gate, up)
    check_tensor("dout", dout)
    if dout.shape != gate.shape:
        raise ValueError(f"triton backend: dout must have gate's shape {tuple(gate.shape)}, got {tuple(dout.shape)}")
    check_same_device(gate, dout=dout)
    if inplace and eager() and gate.numel() > 0:
        g2, u2 = _row_view(gate), _row_view(up)
        if g2 is not None and u2 is not None:
            _launch_bwd(dout, gate, up, g2, u2)
            return gate, up
    dgate, dup = call(_swiglu_bwd_impl, "triton_swiglu_bwd", dout, gate, up)
    if inplace:
        return gate.copy_(dgate), up.copy_(dup)
    return dgate, dup
