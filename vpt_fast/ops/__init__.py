"""Frozen-backbone ops: each op is one autograd.Function over a backend's fwd/bwd primitives.

Backends (`vpt_fast/backends/<name>_impl.py`) provide primitives with identical signatures;
`resolve(backend, op, device)` picks the module that implements `op` for tensors on `device`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

_MODULES = {
    "torch": "vpt_fast.backends.torch_impl",
    "triton": "vpt_fast.backends.triton_impl",
    "cuda": "vpt_fast.backends.cuda_impl",
}


def _load(name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        return None
    return module if getattr(module, "AVAILABLE", True) else None


# Loaded once at import, so that resolving a backend inside a traced forward is a dict lookup
# (torch.compile does not trace importlib).
_LOADED = {name: _load(name) for name in _MODULES}


def backend_module(name: str) -> ModuleType | None:
    """The backend's primitives module, or None when it cannot be used on this machine."""
    return _LOADED[name]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The low-precision dtype autocast would run matmul-class ops in on `device`, or None."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def resolve(backend: str, op: str, device: torch.device) -> ModuleType:
    """Module whose `<op>_fwd/<op>_bwd` run `op` for `backend` on `device`.

    The cuda backend brings attention only; its other ops come from triton on CUDA tensors and
    from torch elsewhere.
    """
    chain = {"torch": ["torch"], "triton": ["triton"],
             "cuda": ["cuda", "triton" if device.type == "cuda" else "torch", "torch"]}
    if backend not in chain:
        raise ValueError(f"backend must be one of {tuple(chain)}, got {backend!r}")
    for name in chain[backend]:
        module = backend_module(name)
        if module is not None and hasattr(module, f"{op}_fwd"):
            return module
    raise RuntimeError(f"backend {backend!r} is not available on this machine for op {op!r} "
                       f"(see vpt_fast.available_backends())")
