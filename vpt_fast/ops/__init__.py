"""Frozen-backbone ops: each op is one autograd.Function over a backend's fwd/bwd primitives.

Backends (`vpt_fast/backends/<name>_impl.py`) provide primitives with identical signatures; the
registry `vpt_fast.backends.resolve(backend, op, device)` picks the module that runs `op`. The dtype
policy every op follows (autocast's dtype, a residual sum's, a LayerNorm's operands and output) is here.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn

# Asked once here: torch.compile (torch 2.11) cannot trace `torch.amp.is_autocast_available`, and a
# graph break inside the blocks would fail fullgraph compilation.
_AUTOCAST_DEVICES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")
                              if torch.amp.is_autocast_available(t))


# -- the dtype policy: which dtype a sum, a LayerNorm and its output use, with or without autocast --

_HALF = (torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast would run matmul-class ops in on `device`, or None."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


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


def parameters_of(*modules: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of `modules` and their submodules in `Module.parameters()` order (shared ones
    not de-duplicated). The blocks ask on every forward whether their frozen parts are still frozen;
    this walk costs ~1 us per module where `parameters()` costs ~10 (ViT-S: 70 us per block)."""
    stack = list(reversed(modules))
    while stack:
        module = stack.pop()
        for param in module._parameters.values():
            if param is not None:
                yield param
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)


def any_trainable(*modules: nn.Module) -> bool:
    """Whether any parameter of `modules` (or their submodules) requires a gradient."""
    return any(p.requires_grad for p in parameters_of(*modules))
