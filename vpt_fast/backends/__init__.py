"""The backend registry: names, availability, "auto", and which module runs each op.

Backends (docs/design.md §4):
- "reference": release-style eager VPT (concatenation at every block, timm math), run by the blocks;
- "torch": the prompt-aware primitives in plain PyTorch (`torch_impl`), any device;
- "triton": fused Triton kernels (`triton_impl`), CUDA tensors or Triton's CPU interpreter;
- "cuda": the C++/CUDA extension's prompt-aware attention (`cuda_impl`); its other ops come from
  triton on CUDA tensors and from torch elsewhere;
- "auto": triton on CUDA tensors when Triton is usable, torch otherwise.

Backend modules are imported once, here, so that resolving a backend inside a traced forward is a
dict lookup (torch.compile does not trace importlib).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
"""Every backend name `prompt()`, `set_backend()` and the blocks accept."""
ALWAYS_AVAILABLE = ("auto", "reference", "torch")

_MODULES = {
    "torch": "vpt_fast.backends.torch_impl",
    "triton": "vpt_fast.backends.triton_impl",
    "cuda": "vpt_fast.backends.cuda_impl",
}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) when the backend can run here, else (None, why not)."""
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        return None, f"{_MODULES[name]} did not import ({exc})"
    if not getattr(module, "AVAILABLE", True):
        return None, getattr(module, "UNAVAILABLE_REASON", f"{_MODULES[name]}.AVAILABLE is False")
    return module, None


_LOADED: dict[str, ModuleType | None] = {}
_REASONS: dict[str, str] = {}
for _name in _MODULES:
    _LOADED[_name], _reason = _load(_name)
    if _reason is not None:
        _REASONS[_name] = _reason
del _name, _reason


def backend_module(name: str) -> ModuleType | None:
    """The primitives module of backend `name` ("torch", "triton" or "cuda"), or None when it cannot
    be used on this machine."""
    if name not in _MODULES:
        raise ValueError(f"backend_module: name must be one of {tuple(_MODULES)}, got {name!r}")
    return _LOADED[name]


def available_backends() -> list[str]:
    """Backends usable on this machine, in order of preference after "auto"."""
    return ["reference", "torch"] + [name for name in ("triton", "cuda") if _LOADED[name] is not None]


def validate_backend(name: str) -> str:
    """Return `name` if it is a backend usable on this machine.

    Raises:
        ValueError: `name` is not one of `BACKENDS`.
        RuntimeError: `name` is a known backend that cannot run here (the message names the
            available ones and why this one is not).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name not in ALWAYS_AVAILABLE and _LOADED[name] is None:
        raise RuntimeError(f"backend {name!r} is not available on this machine: {_REASONS[name]}; "
                           f"available: {available_backends()}")
    return name


def resolve_auto(backend: str, device: torch.device) -> str:
    """The concrete backend `backend` runs as for tensors on `device` ("auto": triton on CUDA
    tensors when Triton is usable, else torch; any other name is returned as is)."""
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and _LOADED["triton"] is not None else "torch"


def _chain(backend: str, device: torch.device) -> tuple[str, ...]:
    """Backend modules tried in order for an op; the first that has the op runs it."""
    if backend == "cuda":  # attention only: the other ops fall back to triton on CUDA, else torch
        return ("cuda", "triton", "torch") if device.type == "cuda" else ("cuda", "torch")
    return (backend,)


def resolve(backend: str, op: str, device: torch.device) -> ModuleType:
    """Module whose `<op>_fwd` / `<op>_bwd` run `op` for `backend` on tensors on `device`.

    Args:
        backend: "auto", "torch", "triton" or "cuda" ("reference" has no primitives: the blocks run
            timm's own modules for it).
        op: the op name, e.g. "attention", "layer_norm", "bias_gelu".
        device: where the op's tensors live.
    """
    backend = resolve_auto(backend, device)
    if backend not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + tuple(_MODULES)} for op {op!r}, got {backend!r}")
    for name in _chain(backend, device):
        module = _LOADED[name]
        if module is not None and hasattr(module, f"{op}_fwd"):
            return module
    reason = _REASONS.get(backend, f"no module in {_chain(backend, device)} implements it")
    raise RuntimeError(f"backend {backend!r} cannot run op {op!r} on {device.type} tensors: {reason}; "
                       f"available: {available_backends()}")
