"""The dtype policy, in one place: which dtype autocast, attention's operands, a residual sum, a frozen
LayerNorm (its operands, its output) and an accumulation use (docs/design.md §2.5). The ops decide
with it before calling a backend, and the backends accumulate with it, so it sits at the lowest layer
that reads it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Asked once here: torch.compile (torch 2.11) cannot trace `torch.amp.is_autocast_available`, and a
# graph break inside the blocks would fail fullgraph compilation.
_AUTOCAST_DEVICES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")
                              if torch.amp.is_autocast_available(t))

_HALF = (torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast would run matmul-class ops in on `device`, or None."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float32 accumulation for low precision; float64 stays float64 (exact references in tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def sum_dtype(residual: Tensor, branch: Tensor, scale: Optional[Tensor]) -> torch.dtype:
    """The dtype of `residual + branch * scale` under torch's type promotion (autocast leaves adds alone)."""
    dtype = torch.promote_types(residual.dtype, branch.dtype)
    return dtype if scale is None else torch.promote_types(dtype, scale.dtype)


def norm_operands(device: torch.device, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The rows and affine of a frozen LayerNorm on `device` as it reads them. Under autocast every
    half-precision one is upcast to float32: CUDA autocast's float32 policy for layer_norm (what timm's
    eager blocks run there), affine included, so a bf16 model's affine never meets float32 rows. CPU
    autocast leaves layer_norm in the rows' dtype; float32 on every device is one policy, no less exact."""
    if autocast_dtype(device) is None:
        return tensors
    return tuple(t if t is None or t.dtype not in _HALF else t.float() for t in tensors)


def norm_output_dtype(dtype: torch.dtype, device: torch.device, feeds_matmul: bool) -> Optional[torch.dtype]:
    """The dtype a frozen LayerNorm of `dtype` rows writes: under autocast float32, or autocast's low
    dtype when the output feeds a matmul (the values autocast's cast would give, without the float32
    round trip through memory); None (the rows' own dtype) without autocast or for float64 rows."""
    low = autocast_dtype(device)
    if low is None or dtype not in (torch.float32, *_HALF):
        return None
    return low if feeds_matmul else torch.float32


def attention_operands(tensors: list[Optional[Tensor]], device: torch.device) -> list[Optional[Tensor]]:
    """q, k, v, pk, pv as the attention op reads them: under autocast in its low dtype (as autocast does
    for scaled_dot_product_attention); otherwise they must share one dtype."""
    low = autocast_dtype(device)
    if low is not None:
        return [None if t is None else t.to(low) for t in tensors]
    if len({t.dtype for t in tensors if t is not None}) > 1:
        raise TypeError(f"q, k, v, pk, pv must share one dtype, got {[t.dtype for t in tensors if t is not None]}")
    return tensors


def sum_norm_operands(s: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The residual sum s and the LayerNorm affine as the add + LayerNorm normalises them: in s's
    accumulation dtype (half-precision rows or a mixed affine are upcast, as autocast's LayerNorm
    does), so a recompute reruns the same arithmetic."""
    acc = accumulation_dtype(s)
    return tuple(None if t is None else t.to(acc) for t in (s, weight, bias))
