"""Frozen bias + exact (erf) GELU: gelu(h + bias) with a dX-only backward that saves h alone
(docs/design.md §2.3). The MLP ops (`ops/mlp.py`) call the same `bias_gelu` primitives inside their
own autograd node; this op runs them on their own.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve


class FrozenBiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
        impl = resolve(backend, "bias_gelu", h.device)
        ctx.save_for_backward(h, bias)
        ctx.impl = impl
        return impl.bias_gelu_fwd(h, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dg: Tensor):
        h, bias = ctx.saved_tensors
        return ctx.impl.bias_gelu_bwd(dg.contiguous(), h, bias), None, None


def bias_gelu(h: Tensor, bias: Optional[Tensor] = None, backend: str = "torch") -> Tensor:
    """gelu(h + bias) as timm's default `nn.GELU` after a linear layer, with the backend's primitives.

    Args:
        h: (..., C) pre-activations.
        bias: an optional frozen (C,) bias; a trainable one takes autograd's own path, which computes
            its gradient.
        backend: the backend whose `bias_gelu` primitives run ("auto" or one with primitives).
    """
    if bias is not None and bias.requires_grad:
        return torch.nn.functional.gelu(h + bias)
    return FrozenBiasGelu.apply(h, bias, backend)
