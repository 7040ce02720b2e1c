"""Frozen-backbone ops: each op is one autograd.Function over a backend's fwd/bwd primitives.

Backends (`vpt_fast/backends/<name>_impl`) provide primitives with identical signatures; the
registry `vpt_fast.backends.resolve(backend, op, device)` picks the module that runs `op`. The dtype
policy every op follows (autocast's dtype, a residual sum's, a LayerNorm's operands and output) is
`vpt_fast.backends.dtypes`, which the backends read too.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn


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
