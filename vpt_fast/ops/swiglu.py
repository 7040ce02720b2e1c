"""Frozen SwiGLU: the gate silu(gate) * up as its own op (`swiglu`), and the frozen timm SwiGLU MLP
(`SwiGLU`: fc1_g, fc1_x; `GluMlp` with SiLU: one packed fc1) as one autograd node (`swiglu_mlp`):
fc2(norm(silu(gate) * up)) with a dX-only backward (docs/design.md §2.3).

The MLP node saves x and the two fc1 outputs (for a packed fc1, its one output, whose halves they
are), plus the hidden norm's per-row statistics when it has one; with `recompute` only x (and those
statistics), and fc1 runs again in backward, into buffers the backward owns: the gate's backward then
overwrites them with dgate / dup, and for a packed fc1 dX is one GEMM over that buffer. The hidden
norm (Identity, LayerNorm or RMSNorm) runs through the `layer_norm` / `rms_norm` primitives under
their dtype policy (`backends/dtypes.py`); its input, the gate's output, is recomputed in backward
from gate and up (one elementwise pass) instead of being saved. The GEMMs stay on cuBLAS/BLAS.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve
from vpt_fast.backends.dtypes import norm_operands, norm_output_dtype
from vpt_fast.ops import any_trainable
from vpt_fast.ops.rms_norm import is_rms_norm, rms_norm_eps


class FrozenSwiGlu(torch.autograd.Function):
    """silu(gate) * up; saves gate and up."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, backend: str) -> Tensor:
        impl = resolve(backend, "swiglu", gate.device)
        ctx.save_for_backward(gate, up)
        ctx.impl = impl
        return impl.swiglu_fwd(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        gate, up = ctx.saved_tensors
        dgate, dup = ctx.impl.swiglu_bwd(dout.contiguous(), gate, up)
        return dgate, dup, None


def swiglu(gate: Tensor, up: Tensor, backend: str = "torch") -> Tensor:
    """silu(gate) * up (the SwiGLU gate of timm `SwiGLU` / `GluMlp` with SiLU) with the backend's
    primitives; gradients for gate and up.

    Args:
        gate, up: (..., H) tensors of one shape and dtype (views such as the halves of a packed fc1
            output are read in place).
        backend: the backend whose `swiglu` primitives run ("auto" or one with primitives).
    """
    return FrozenSwiGlu.apply(gate, up, backend)


# -- the frozen MLP ------------------------------------------------------------------------------

def _fc1(x: Tensor, wa: Tensor, ba: Optional[Tensor], wb: Optional[Tensor], bb: Optional[Tensor], layout: str,
         dtype: Optional[torch.dtype] = None) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(packed fc1 output or None, gate, up). `layout`: "split" (SwiGLU: gate = x·waᵀ + ba, up = x·wbᵀ + bb),
    "gate_first" / "gate_last" (GluMlp: h = x·waᵀ + ba; gate is its first / last half). `dtype`: the
    operands are cast to it first (backward's recompute of an autocast forward)."""
    if dtype is not None:
        x, wa, ba, wb, bb = (None if t is None else t.to(dtype) for t in (x, wa, ba, wb, bb))
    if layout == "split":
        return None, F.linear(x, wa, ba), F.linear(x, wb, bb)
    h = F.linear(x, wa, ba)
    first, second = h.chunk(2, dim=-1)
    return (h, first, second) if layout == "gate_first" else (h, second, first)


def _fc1_input_grad(dgate: Tensor, dup: Tensor, h: Optional[Tensor], wa: Tensor, wb: Optional[Tensor],
                    layout: str) -> Tensor:
    """dX of fc1 from (dgate, dup): for a packed fc1 whose output `h` now holds them (written in place)
    one GEMM, else one per half, the second accumulated into the first's output."""
    cdt = dgate.dtype
    if h is not None:
        return torch.matmul(h, wa.to(cdt))
    if layout == "split":
        wg, wu = wa, wb
    else:
        first, second = wa.chunk(2, dim=0)
        wg, wu = (first, second) if layout == "gate_first" else (second, first)
    dx = torch.matmul(dgate, wg.to(cdt))
    dx.view(-1, dx.shape[-1]).addmm_(dup.reshape(-1, dup.shape[-1]), wu.to(cdt))
    return dx


class FrozenSwiGluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, wa, ba, wb, bb, nw, nb, w2, b2, layout: str, norm_kind: Optional[str],
                norm_eps: Optional[float], recompute: bool, backend: str) -> Tensor:
        act = resolve(backend, "swiglu", x.device)
        _, gate, up = _fc1(x, wa, ba, wb, bb, layout)
        z = act.swiglu_fwd(gate, up)
        mean = rstd = None
        if norm_kind is not None:
            norm = resolve(backend, norm_kind, x.device)
            out_dtype = norm_output_dtype(z.dtype, x.device, feeds_matmul=True)
            (zn,) = norm_operands(x.device, z)
            if norm_kind == "layer_norm":
                z, mean, rstd = norm.layer_norm_fwd(zn, nw, nb, norm_eps, out_dtype)
            else:
                norm_eps = rms_norm_eps(norm_eps, zn)
                z, rstd = norm.rms_norm_fwd(zn, nw, norm_eps, out_dtype)
            ctx.norm, ctx.norm_dtype = norm, zn.dtype
            del zn
        out = F.linear(z, w2, b2)
        ctx.save_for_backward(x, wa, ba, wb, bb, nw, w2, *((None, None) if recompute else (gate, up)), mean, rstd)
        ctx.act, ctx.layout, ctx.norm_kind, ctx.fc1_dtype = act, layout, norm_kind, gate.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        x, wa, ba, wb, bb, nw, w2, gate, up, mean, rstd = ctx.saved_tensors
        cdt = ctx.fc1_dtype
        own = gate is None  # recompute: fresh fc1 outputs the backward may overwrite
        h = None
        if own:
            h, gate, up = _fc1(x, wa, ba, wb, bb, ctx.layout, cdt)
        dz = torch.matmul(dout.to(cdt), w2.to(cdt))
        if ctx.norm_kind is not None:
            zn = ctx.act.swiglu_fwd(gate, up).to(ctx.norm_dtype)
            if ctx.norm_kind == "layer_norm":
                dz = ctx.norm.layer_norm_bwd(dz, zn, nw, mean, rstd)
            else:
                dz = ctx.norm.rms_norm_bwd(dz, zn, nw, rstd)
            del zn
        dgate, dup = ctx.act.swiglu_bwd(dz, gate, up, inplace=own)
        del dz, gate, up
        dx = _fc1_input_grad(dgate, dup, h, wa, wb, ctx.layout)
        return (dx.to(x.dtype),) + (None,) * 13


def _layout(mlp: nn.Module) -> Optional[str]:
    """"split" for timm `SwiGLU`, "gate_first" / "gate_last" for a linear timm `GluMlp`, else None."""
    from timm.layers import GluMlp, SwiGLU
    if not isinstance(getattr(mlp, "fc2", None), nn.Linear):
        return None
    if type(mlp) is SwiGLU and isinstance(mlp.fc1_g, nn.Linear) and isinstance(mlp.fc1_x, nn.Linear):
        return "split"
    if (type(mlp) is GluMlp and isinstance(mlp.fc1, nn.Linear) and mlp.chunk_dim == -1
            and mlp.fc1.out_features % 2 == 0):
        return "gate_last" if mlp.gate_last else "gate_first"
    return None


def _norm_kind(norm: nn.Module) -> Optional[str]:
    """The primitives a hidden norm runs with: None for Identity, "layer_norm", "rms_norm"; raises
    TypeError for any other norm."""
    from timm.layers import LayerNorm
    if type(norm) is nn.Identity:
        return None
    if is_rms_norm(norm):
        return "rms_norm"
    if (isinstance(norm, nn.LayerNorm) and type(norm).forward in (nn.LayerNorm.forward, LayerNorm.forward)
            and len(norm.normalized_shape) == 1):
        return "layer_norm"
    raise TypeError(f"hidden norm {type(norm).__name__} is not Identity, LayerNorm or RMSNorm")


def _supported(mlp: nn.Module) -> bool:
    """The structure `swiglu_mlp` computes: SwiGLU / linear GluMlp, SiLU, a supported hidden norm."""
    if _layout(mlp) is None or type(getattr(mlp, "act", None)) is not nn.SiLU:
        return False
    try:
        _norm_kind(getattr(mlp, "norm", nn.Identity()))
    except TypeError:
        return False
    return True


def _drops_inactive(mlp: nn.Module) -> bool:
    return all(type(d) is nn.Identity or (isinstance(d, nn.Dropout) and (d.p == 0 or not d.training))
               for d in (getattr(mlp, "drop1", nn.Identity()), getattr(mlp, "drop2", nn.Identity())))


def is_swiglu_mlp(mlp: nn.Module) -> bool:
    """timm `SwiGLU` (fc1_g, fc1_x) or a linear timm `GluMlp` (packed fc1, any `gate_last`) with a SiLU
    activation, a hidden norm that is Identity, LayerNorm or RMSNorm, dropouts inactive (p == 0 or
    eval) and every parameter frozen. When False, callers run the module itself."""
    return _supported(mlp) and _drops_inactive(mlp) and not any_trainable(mlp)


def swiglu_mlp(x: Tensor, mlp: nn.Module, backend: str, recompute: bool = False) -> Tensor:
    """mlp(x) for a frozen timm SwiGLU MLP (see `is_swiglu_mlp`) as one autograd node whose backward
    gives dX only.

    Args:
        x: (..., C) input rows (any dtype the module's linears accept; under autocast, as autocast
            casts them).
        mlp: a timm `SwiGLU` or `GluMlp` with SiLU. One with a trainable parameter or an active dropout
            runs its own forward (autograd computes what it needs); another structure raises TypeError.
        backend: the backend whose `swiglu` (and hidden `layer_norm` / `rms_norm`) primitives run.
        recompute: save only x; fc1 runs again in backward (the hidden-width buffers are not kept).
    """
    if not _supported(mlp):
        raise TypeError(f"expected a timm SwiGLU or linear GluMlp with SiLU and an Identity, LayerNorm or "
                        f"RMSNorm hidden norm, got {type(mlp).__name__}")
    if any_trainable(mlp) or not _drops_inactive(mlp):
        return mlp(x)
    layout = _layout(mlp)
    if layout == "split":
        wa, ba, wb, bb = mlp.fc1_g.weight, mlp.fc1_g.bias, mlp.fc1_x.weight, mlp.fc1_x.bias
    else:
        wa, ba, wb, bb = mlp.fc1.weight, mlp.fc1.bias, None, None
    norm = mlp.norm
    norm_kind = _norm_kind(norm)
    nw = nb = eps = None
    if norm_kind is not None:
        nw, nb = norm_operands(x.device, norm.weight, getattr(norm, "bias", None))
        eps = norm.eps
    return FrozenSwiGluMlp.apply(x, wa, ba, wb, bb, nw, nb, mlp.fc2.weight, mlp.fc2.bias, layout, norm_kind, eps,
                                 recompute, backend)
