"""RMSNorm over the last dim in plain PyTorch: `rms_norm_fwd` / `rms_norm_bwd` (dX only: the weight
is frozen), with the statistic and the products in the accumulation dtype and one rounding at the end
(torch.rms_norm's arithmetic: y = (x * rstd) * weight).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.dtypes import accumulation_dtype


def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim: y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps). Returns
    (y, rstd): y in `out_dtype` (default x's dtype), rounded once from the accumulation dtype; rstd of
    shape x.shape[:-1] in the accumulation dtype (float32, float64 for float64 inputs). `eps` is a
    number (the op resolves nn.RMSNorm's eps=None)."""
    acc = accumulation_dtype(x)
    xa = x.to(acc)
    rstd = torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
    y = xa * rstd
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(out_dtype or x.dtype), rstd.squeeze(-1)


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor) -> Tensor:
    """dX only (in x's dtype; dy may be in another dtype): the weight is frozen.
    dx = rstd * (g - xhat * mean(g * xhat)), g = dy * weight, xhat = x * rstd."""
    acc = accumulation_dtype(x)
    r = rstd.to(acc).unsqueeze(-1)
    g = dy.to(acc)
    if weight is not None:
        g = g * weight.to(acc)
    xhat = x.to(acc) * r
    return ((g - xhat * (g * xhat).mean(-1, keepdim=True)) * r).to(x.dtype)
