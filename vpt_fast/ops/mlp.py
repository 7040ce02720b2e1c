"""Pre-norm MLP of a frozen transformer block: fc2(gelu(fc1(norm(x)))), dX-only backward; and the
same MLP with the residual add before its norm fused in (`add_norm_mlp`: s = residual + branch * scale,
then fc2(gelu(fc1(norm(s))))), whose backward gives the gradient of the sum.

Saves the block's residual input x (or s) with its LayerNorm statistics, and the fc1 output (4x the
width) unless `recompute_fc1` is set, in which case norm and fc1 run again in backward
(recompute="mlp"). fc1's bias rides in the GEMM epilogue (addmm); GELU and its dX-only backward are
the `bias_gelu` primitives; the GEMMs stay on cuBLAS/BLAS.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve
from vpt_fast.backends.dtypes import autocast_dtype, norm_operands, norm_output_dtype, sum_dtype, sum_norm_operands
from vpt_fast.ops import any_trainable


def _mlp_fwd(y: Tensor, w1, b1, w2, b2, act) -> tuple[Tensor, Tensor]:
    """(fc1 output h, fc2(gelu(h))) for the normalised rows y."""
    h = F.linear(y, w1, b1)
    return h, F.linear(act.bias_gelu_fwd(h, None), w2, b2)


def _mlp_input_grad(ctx, dout: Tensor, x: Tensor, nw, nb, w1, b1, w2, saved: list) -> Tensor:
    """The gradient of the MLP's input y (the normalised rows), from `dout`; with `ctx.recompute_fc1`,
    y = norm(x) and h = fc1(y) run again first, in dout's dtype, else h is `saved.pop()`.

    The 4x-wide buffers are the peak of a training step's backward: one holds dg, then dh in place,
    and h and dh are dropped once read (with block recompute they are the only references), so at
    most two are alive, never h, dg and dh."""
    if ctx.recompute_fc1:
        cdt = dout.dtype
        y = ctx.ln.layer_norm_fwd(x, nw, nb, ctx.eps, cdt)[0]
        h = F.linear(y, w1.to(cdt), None if b1 is None else b1.to(cdt))
        del y
    else:
        h = saved.pop()
    cdt = h.dtype
    dh = ctx.act.bias_gelu_bwd(torch.matmul(dout.to(cdt), w2.to(cdt)), h, None, inplace=True)
    del h
    return torch.matmul(dh, w1.to(cdt))  # LayerNorm's backward reads it in this dtype


class FrozenNormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nw, nb, eps, w1, b1, w2, b2, recompute_fc1: bool, backend: str):
        ln = resolve(backend, "layer_norm", x.device)
        act = resolve(backend, "bias_gelu", x.device)
        y, mean, rstd = ln.layer_norm_fwd(x, nw, nb, eps, norm_output_dtype(x.dtype, x.device, feeds_matmul=True))
        h, out = _mlp_fwd(y, w1, b1, w2, b2, act)
        ctx.save_for_backward(x, nw, nb, mean, rstd, w1, b1, w2, None if recompute_fc1 else h)
        ctx.eps, ctx.ln, ctx.act, ctx.recompute_fc1 = eps, ln, act, recompute_fc1
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, nw, nb, mean, rstd, w1, b1, w2, h = ctx.saved_tensors
        hidden = [] if h is None else [h]
        del h  # `hidden` holds the only reference, which the backward drops once read
        dy = _mlp_input_grad(ctx, dout, x, nw, nb, w1, b1, w2, hidden)
        dx = ctx.ln.layer_norm_bwd(dy, x, nw, mean, rstd)
        return dx, None, None, None, None, None, None, None, None, None


def _add_norm(add_ln, residual: Tensor, branch: Tensor, scale: Optional[Tensor], nw, nb, eps: float,
              reuse_branch: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(s, y, mean, rstd) of s = residual + branch * scale, y = LayerNorm(s) in the dtype the MLP's GEMM
    reads. With `reuse_branch`, s overwrites the branch (which nothing else reads) where it can: eager,
    a contiguous non-view of s's dtype; the MLP then runs with the buffers the unfused
    `x = residual + branch` leaves alive (the branch freed), not one more. `s is branch` says it did."""
    s_dtype = sum_dtype(residual, branch, scale)
    reuse = (reuse_branch and branch._base is None and branch.dtype == s_dtype and branch.is_contiguous()
             and branch.shape == residual.shape and not torch.compiler.is_compiling())
    return add_ln.add_layer_norm_fwd(residual, branch, scale, nw, nb, eps,
                                     norm_output_dtype(s_dtype, residual.device, feeds_matmul=True),
                                     s_out=branch if reuse else None)


class FrozenAddNormMlp(torch.autograd.Function):
    """(s, mlp(norm(s))) with s = residual + branch * scale: the add and the norm are one
    `add_layer_norm` kernel each way, and backward writes ds + d(norm input) once (the gradient of
    both the residual and the branch). Saves what `FrozenNormMlp` saves, with s in place of x."""

    @staticmethod
    def forward(ctx, residual, branch, scale, nw, nb, eps, w1, b1, w2, b2, recompute_fc1: bool, backend: str,
                reuse_branch: bool):
        add_ln = resolve(backend, "add_layer_norm", residual.device)
        act = resolve(backend, "bias_gelu", residual.device)
        s, y, mean, rstd = _add_norm(add_ln, residual, branch, scale, nw, nb, eps, reuse_branch)
        if s is branch:
            ctx.mark_dirty(branch)
        h, out = _mlp_fwd(y, w1, b1, w2, b2, act)
        ctx.save_for_backward(s, nw, nb, mean, rstd, w1, b1, w2, None if recompute_fc1 else h, scale)
        ctx.eps, ctx.act, ctx.recompute_fc1, ctx.branch_dtype = eps, act, recompute_fc1, branch.dtype
        ctx.add_ln, ctx.ln = add_ln, resolve(backend, "layer_norm", residual.device)
        ctx.set_materialize_grads(False)  # an unused s or MLP output sends None: no zero tensor is read
        return s, out

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dout):
        s, nw, nb, mean, rstd, w1, b1, w2, h, scale = ctx.saved_tensors
        hidden = [] if h is None else [h]
        del h  # as in FrozenNormMlp.backward
        dy = None if dout is None else _mlp_input_grad(ctx, dout, *sum_norm_operands(s, nw, nb), w1, b1, w2, hidden)
        d_residual, d_branch = ctx.add_ln.add_layer_norm_bwd(
            None if ds is None else ds.contiguous(), dy, s, nw, mean, rstd, scale, ctx.branch_dtype)
        return d_residual, d_branch, None, None, None, None, None, None, None, None, None, None, None


def add_norm_mlp_residual(residual: Tensor, branch: Tensor, scale: Optional[Tensor], norm: nn.LayerNorm,
                          mlp: nn.Module, backend: str) -> Tensor:
    """s + mlp(norm(s)) with s = residual + branch * scale, for inference (no autograd, no tracing):
    timm's `x = x + ls1(branch); x = x + mlp(norm2(x))` with the allocations of a forward pass cut to
    fc1's output. s is written into `branch` (which the caller hands over, as for `add_norm_mlp`'s
    `reuse_branch`), GELU runs in place on fc1's output, and the second add accumulates into s: in
    float32 outside autocast as fc2's GEMM epilogue (s += fc2 bias, then s += gelu · W2ᵀ in place,
    one GEMM with beta=1), else s += fc2(gelu). Returns s.

    The same sums as `add_norm_mlp` then `x + y`, associated differently: (s + b2) + g·W2ᵀ instead of
    s + (g·W2ᵀ + b2), within an ulp-level rounding of it (tests compare at 1e-5 relative)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        raise RuntimeError("add_norm_mlp_residual is for inference: call it without gradients, outside torch.compile")
    if branch.shape != residual.shape:
        raise ValueError(f"branch must have residual's shape {tuple(residual.shape)}, got {tuple(branch.shape)}")
    add_ln = resolve(backend, "add_layer_norm", residual.device)
    act = resolve(backend, "bias_gelu", residual.device)
    nw, nb = norm_operands(residual.device, norm.weight, norm.bias)
    s, y, _, _ = _add_norm(add_ln, residual, branch, scale, nw, nb, norm.eps, reuse_branch=True)
    g = act.bias_gelu_fwd(F.linear(y, mlp.fc1.weight, mlp.fc1.bias), None, inplace=True)
    del y
    w2, b2 = mlp.fc2.weight, mlp.fc2.bias
    if s.is_contiguous() and g.dtype == s.dtype == w2.dtype and autocast_dtype(s.device) is None:
        rows = s.view(-1, s.shape[-1])
        if b2 is not None:
            rows.add_(b2)
        torch.addmm(rows, g.view(-1, g.shape[-1]), w2.t(), out=rows)  # not addmm_: FlopCounterMode counts this one
        return s
    return s.add_(F.linear(g, w2, b2))


def is_fusable(norm: nn.Module, mlp: nn.Module) -> bool:
    """timm `Mlp` itself (not GluMlp, SwiGLU, ... which share its attribute names) with exact GELU,
    no hidden norm, after a LayerNorm, all frozen."""
    from timm.layers import Mlp
    act = getattr(mlp, "act", None)
    simple = (type(mlp) is Mlp and isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
              and isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)
              and isinstance(act, nn.GELU) and act.approximate == "none"
              and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity))
    return simple and not any_trainable(norm, mlp)


def norm_mlp(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module, recompute_fc1: bool, backend: str) -> Tensor:
    """mlp(norm(x)) for a frozen pre-norm timm MLP (see `is_fusable`)."""
    x, nw, nb = norm_operands(x.device, x, norm.weight, norm.bias)
    return FrozenNormMlp.apply(x, nw, nb, norm.eps, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                               recompute_fc1, backend)


def add_norm_mlp(residual: Tensor, branch: Tensor, scale: Optional[Tensor], norm: nn.LayerNorm, mlp: nn.Module,
                 recompute_fc1: bool, backend: str, reuse_branch: bool = False) -> tuple[Tensor, Tensor]:
    """(s, mlp(norm(s))) with s = residual + branch * scale, for a frozen pre-norm timm MLP (see
    `is_fusable`): timm's `x = x + ls1(branch)` then `mlp(norm2(x))` with the add fused into the norm.

    Args:
        residual: the residual stream (..., C), float32 under autocast.
        branch: what is added to it (the attention branch), residual's shape.
        scale: an optional frozen (C,) per-channel scale of the branch (LayerScale gamma), or None.
        norm, mlp: the block's frozen `norm2` and timm `Mlp`.
        recompute_fc1: recompute norm and fc1 in backward instead of saving fc1's output.
        backend: the backend whose primitives run.
        reuse_branch: the caller hands over `branch` (a fresh tensor that nothing else reads, such as the
            attention projection's output): s is written into it in eager mode, one buffer fewer while
            the MLP runs. The returned s is then `branch` itself.
    """
    if branch.shape != residual.shape:
        raise ValueError(f"branch must have residual's shape {tuple(residual.shape)}, got {tuple(branch.shape)}")
    if scale is not None and (scale.shape != residual.shape[-1:] or scale.requires_grad):
        raise ValueError(f"scale must be a frozen ({residual.shape[-1]},) vector, got shape {tuple(scale.shape)} "
                         f"with requires_grad={scale.requires_grad}")
    nw, nb = norm_operands(residual.device, norm.weight, norm.bias)
    return FrozenAddNormMlp.apply(residual, branch, scale, nw, nb, norm.eps, mlp.fc1.weight, mlp.fc1.bias,
                                  mlp.fc2.weight, mlp.fc2.bias, recompute_fc1, backend, reuse_branch)
