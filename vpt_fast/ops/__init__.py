"""Frozen-backbone ops: each op is one autograd.Function over a backend's fwd/bwd primitives.

Backends (`vpt_fast/backends/<name>_impl.py`) provide primitives with identical signatures; the
registry `vpt_fast.backends.resolve(backend, op, device)` picks the module that runs `op`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Asked once here: torch.compile (torch 2.11) cannot trace `torch.amp.is_autocast_available`, and a
# graph break inside the blocks would fail fullgraph compilation.
_AUTOCAST_DEVICES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")
                              if torch.amp.is_autocast_available(t))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast would run matmul-class ops in on `device`, or None."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


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
