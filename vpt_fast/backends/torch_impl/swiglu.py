"""The SwiGLU gate silu(gate) * up in plain PyTorch: `swiglu_fwd` / `swiglu_bwd` (input gradients
only), math in the accumulation dtype with one rounding; the backward optionally writes its results
over gate and up, to save the MLP's two hidden-width buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vpt_fast.backends.dtypes import accumulation_dtype


def _check_pair(gate: Tensor, up: Tensor) -> None:
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (timm `SwiGLU` / `GluMlp` with SiLU) in gate's dtype. gate and up share one
    shape and dtype; either may be a strided view (the halves of a packed fc1 output)."""
    _check_pair(gate, up)
    acc = accumulation_dtype(gate)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """(dgate, dup) of silu(gate) * up for `dout` (which may be in another dtype), in gate's dtype:
    dgate = silu'(gate) * dout * up (aten's silu_backward), dup = dout * silu(gate). `inplace`: written
    into `gate` and `up` (returned), for callers that own them and read them no more."""
    _check_pair(gate, up)
    if dout.shape != gate.shape:
        raise ValueError(f"dout must have gate's shape {tuple(gate.shape)}, got {tuple(dout.shape)}")
    acc = accumulation_dtype(gate)
    if inplace and dout.dtype == gate.dtype == acc:  # no rounding: one temporary buffer, not four
        du = dout * up
        torch.mul(dout, F.silu(gate), out=up)
        return torch.ops.aten.silu_backward.grad_input(du, gate, grad_input=gate), up
    g, d = gate.to(acc), dout.to(acc)
    dgate = torch.ops.aten.silu_backward(d * up.to(acc), g)
    dup = d * F.silu(g)
    if inplace:
        return gate.copy_(dgate), up.copy_(dup)
    return dgate.to(gate.dtype), dup.to(gate.dtype)
