"""Pre-norm MLP of a frozen transformer block: fc2(gelu(fc1(norm(x)))), dX-only backward.

Saves the block's residual input x with its LayerNorm statistics, and the fc1 output (4x the width)
unless `recompute_fc1` is set, in which case norm and fc1 run again in backward (recompute="mlp").
fc1's bias rides in the GEMM epilogue (addmm); GELU and its dX-only backward are the `bias_gelu`
primitives; the GEMMs stay on cuBLAS/BLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve
from vpt_fast.ops.layer_norm import matmul_input_dtype, upcast_for_autocast


class FrozenNormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nw, nb, eps, w1, b1, w2, b2, recompute_fc1: bool, backend: str):
        ln = resolve(backend, "layer_norm", x.device)
        act = resolve(backend, "bias_gelu", x.device)
        y, mean, rstd = ln.layer_norm_fwd(x, nw, nb, eps, matmul_input_dtype(x))
        h = F.linear(y, w1, b1)
        g = act.bias_gelu_fwd(h, None)
        out = F.linear(g, w2, b2)
        ctx.save_for_backward(x, nw, nb, mean, rstd, w1, b1, w2, None if recompute_fc1 else h)
        ctx.eps, ctx.ln, ctx.act, ctx.recompute_fc1 = eps, ln, act, recompute_fc1
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, nw, nb, mean, rstd, w1, b1, w2, h = ctx.saved_tensors
        if ctx.recompute_fc1:
            cdt = dout.dtype
            y = ctx.ln.layer_norm_fwd(x, nw, nb, ctx.eps, cdt)[0]
            h = F.linear(y, w1.to(cdt), None if b1 is None else b1.to(cdt))
        cdt = h.dtype
        dg = torch.matmul(dout.to(cdt), w2.to(cdt))
        dh = ctx.act.bias_gelu_bwd(dg, h, None)
        dy = torch.matmul(dh, w1.to(cdt))  # LayerNorm's backward reads it in this dtype
        dx = ctx.ln.layer_norm_bwd(dy, x, nw, mean, rstd)
        return dx, None, None, None, None, None, None, None, None, None


def is_fusable(norm: nn.Module, mlp: nn.Module) -> bool:
    """timm `Mlp` with exact GELU, no hidden norm, after a LayerNorm, all frozen."""
    act = getattr(mlp, "act", None)
    simple = (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
              and isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)
              and isinstance(act, nn.GELU) and act.approximate == "none"
              and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity))
    frozen = not any(p.requires_grad for p in list(norm.parameters()) + list(mlp.parameters()))
    return simple and frozen


def norm_mlp(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module, recompute_fc1: bool, backend: str) -> Tensor:
    """mlp(norm(x)) for a frozen pre-norm timm MLP (see `is_fusable`)."""
    return FrozenNormMlp.apply(upcast_for_autocast(x), norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias,
                               mlp.fc2.weight, mlp.fc2.bias, recompute_fc1, backend)
