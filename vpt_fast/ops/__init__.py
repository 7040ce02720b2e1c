"""Frozen-backbone ops: each op is one autograd.Function over a backend's fwd/bwd primitives.

Backends (`vpt_fast/backends/<name>_impl.py`) provide primitives with identical signatures; the
registry `vpt_fast.backends.resolve(backend, op, device)` picks the module that runs `op`.
"""
from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast would run matmul-class ops in on `device`, or None."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
