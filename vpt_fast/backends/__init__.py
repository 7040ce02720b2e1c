"""The backend registry: one `Backend` registration per backend in `REGISTRY`, the only list of backend
names; availability, "auto" and which module runs each op are read from it.

Backends (docs/design.md §4):
- "reference": release-style eager VPT (concatenation at every block, timm math), run by the blocks;
- "torch": the prompt-aware primitives in plain PyTorch (`torch_impl`), any device;
- "triton": fused Triton kernels (`triton_impl`), CUDA tensors or Triton's CPU interpreter;
- "cuda": the C++/CUDA extension's prompt-aware attention (`cuda_impl`); its other ops come from
  triton on CUDA tensors and from torch elsewhere;
- "auto": the available backend with the highest `auto_priority` that serves the tensors' device
  (triton on CUDA tensors when Triton is usable, torch otherwise).

Backend modules are imported once, here, so that resolving a backend inside a traced forward is a
dict lookup (torch.compile does not trace importlib). They are named by string so that a backend
whose dependency is missing makes itself unavailable instead of breaking `import vpt_fast`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch


@dataclass(frozen=True)
class Backend:
    """One backend.

    Attributes:
        name: what `prompt()`, `set_backend()` and the blocks accept.
        module: its primitives module (`<op>_fwd` / `<op>_bwd` per op it runs), or None when the blocks
            run timm's own modules for it ("reference"); a backend without a module is always available.
        devices: the device types on which "auto" and other backends' fallback chains pick it (named
            explicitly, a backend runs wherever its module accepts the tensors); None: every device.
        fallbacks: the backends that run, in order, the ops its module lacks (on devices they serve).
        auto_priority: "auto" picks the available backend serving the device with the highest one;
            None: "auto" never picks it.
    """
    name: str
    module: Optional[str]
    devices: Optional[tuple[str, ...]] = None
    fallbacks: tuple[str, ...] = ()
    auto_priority: Optional[int] = None

    def serves(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices


REGISTRY: dict[str, Backend] = {backend.name: backend for backend in (
    Backend("reference", module=None),
    Backend("torch", "vpt_fast.backends.torch_impl", auto_priority=0),
    Backend("triton", "vpt_fast.backends.triton_impl", devices=("cuda",), auto_priority=1),
    Backend("cuda", "vpt_fast.backends.cuda_impl", fallbacks=("triton", "torch")),
)}
"""Every backend, in order of preference after "auto" (what `available_backends()` lists)."""

BACKENDS = ("auto", *REGISTRY)
"""Every backend name `prompt()`, `set_backend()` and the blocks accept."""
_WITH_MODULES = tuple(name for name, backend in REGISTRY.items() if backend.module is not None)
# sorted once: the blocks resolve "auto" on every forward, also inside torch.compile's trace
_AUTO_ORDER = tuple(sorted((b for b in REGISTRY.values() if b.auto_priority is not None and b.module is not None),
                           key=lambda b: b.auto_priority, reverse=True))


def _load(backend: Backend) -> tuple[ModuleType | None, str | None]:
    """(module, None) when the backend can run here, else (None, why not)."""
    try:
        module = importlib.import_module(backend.module)
    except ImportError as exc:
        return None, f"{backend.module} did not import ({exc})"
    if not getattr(module, "AVAILABLE", True):
        return None, getattr(module, "UNAVAILABLE_REASON", f"{backend.module}.AVAILABLE is False")
    return module, None


_LOADED: dict[str, ModuleType | None] = {}
_REASONS: dict[str, str] = {}
for _name in _WITH_MODULES:
    _LOADED[_name], _reason = _load(REGISTRY[_name])
    if _reason is not None:
        _REASONS[_name] = _reason
del _name, _reason


def _available(name: str) -> bool:
    return REGISTRY[name].module is None or _LOADED[name] is not None


def backend_module(name: str) -> ModuleType | None:
    """The primitives module of backend `name` (one registered with a module), or None when it cannot
    be used on this machine."""
    if name not in _WITH_MODULES:
        raise ValueError(f"backend_module: name must be one of {_WITH_MODULES}, got {name!r}")
    return _LOADED[name]


def available_backends() -> list[str]:
    """Backends usable on this machine, in order of preference after "auto"."""
    return [name for name in REGISTRY if _available(name)]


def validate_backend(name: str) -> str:
    """Return `name` if it is a backend usable on this machine.

    Raises:
        ValueError: `name` is not one of `BACKENDS`.
        RuntimeError: `name` is a known backend that cannot run here (the message names the
            available ones and why this one is not).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto" and not _available(name):
        raise RuntimeError(f"backend {name!r} is not available on this machine: {_REASONS[name]}; "
                           f"available: {available_backends()}")
    return name


def resolve_auto(backend: str, device: torch.device) -> str:
    """The concrete backend `backend` runs as for tensors on `device` ("auto": the available backend
    with the highest `auto_priority` that serves `device`; any other name is returned as is)."""
    if backend != "auto":
        return backend
    device_type = device.type
    for candidate in _AUTO_ORDER:  # inlined checks: this runs on every block's forward
        if (candidate.devices is None or device_type in candidate.devices) and _LOADED[candidate.name] is not None:
            return candidate.name
    raise RuntimeError(f"no backend that 'auto' may pick is available for {device.type} tensors")


def _chain_on(backend: str, device_type: str) -> tuple[str, ...]:
    """Backend modules tried in order for an op: the backend's own, then its fallbacks that serve
    `device_type`; the first that has the op runs it."""
    fallbacks = REGISTRY[backend].fallbacks
    return (backend, *(name for name in fallbacks if REGISTRY[name].serves(device_type)))


# built once for the usual devices: every op's forward resolves its module
_CHAINS = {(name, device_type): _chain_on(name, device_type)
           for name in _WITH_MODULES if REGISTRY[name].fallbacks for device_type in ("cpu", "cuda")}


def _chain(backend: str, device: torch.device) -> tuple[str, ...]:
    if not REGISTRY[backend].fallbacks:
        return (backend,)
    return _CHAINS.get((backend, device.type)) or _chain_on(backend, device.type)


def resolve(backend: str, op: str, device: torch.device) -> ModuleType:
    """Module whose `<op>_fwd` / `<op>_bwd` run `op` for `backend` on tensors on `device`.

    Args:
        backend: "auto" or a registered backend with a module ("reference" has none: the blocks run
            timm's own modules for it).
        op: the op name, e.g. "attention", "layer_norm", "bias_gelu".
        device: where the op's tensors live.
    """
    backend = resolve_auto(backend, device)
    if backend not in _WITH_MODULES:
        raise ValueError(f"backend must be one of {('auto', *_WITH_MODULES)} for op {op!r}, got {backend!r}")
    for name in _chain(backend, device):
        module = _LOADED[name]
        if module is not None and hasattr(module, f"{op}_fwd"):
            return module
    reason = _REASONS.get(backend, f"no module in {_chain(backend, device)} implements it")
    raise RuntimeError(f"backend {backend!r} cannot run op {op!r} on {device.type} tensors: {reason}; "
                       f"available: {available_backends()}")
