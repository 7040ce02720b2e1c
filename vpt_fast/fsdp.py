"""What the library needs to know about FSDP2 (`torch.distributed.fsdp.fully_shard`) models
(docs/design.md §7, "Sharded training (FSDP2)").

`fully_shard` turns a module's parameters into DTensors (each rank holds a slice) and swaps in whole
tensors only inside that module's forward (and backward), and it changes the module's class to a
subclass named `FSDP<class>`. Nothing here imports torch.distributed: a DTensor or an FSDP module can
only exist once the user has imported it, so the checks look it up in `sys.modules`.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch
from torch import Tensor, nn


def _dtensor_class():
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _fsdp_module_class():
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor (a sharded parameter of an FSDP2 module outside its forward)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors: Iterable[Tensor]) -> bool:
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's slice of a DTensor (its storage and version identify the values); `t` otherwise."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor is all-gathered (a collective: every rank must call this), any
    other tensor is returned as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def is_fsdp_module(module: nn.Module) -> bool:
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` or to any of its submodules."""
    return is_fsdp_module(model) or any(is_fsdp_module(m) for m in model.modules())


def unwrapped_class(module: nn.Module) -> type:
    """The module's own class: `fully_shard` makes it `FSDP<class>`, a subclass of FSDPModule and of it."""
    cls = _fsdp_module_class()
    if cls is None or not isinstance(module, cls):
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, cls))


def writes_files() -> bool:
    """Whether this process writes the file of a collective save: rank 0 of the default process
    group, or the only process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def register_forward_method(model: nn.Module, name: str) -> None:
    """Make `model.<name>` run FSDP2's pre/post-forward hooks (gather the root's parameters first) when
    `model` is an FSDP module, once; nothing otherwise."""
    if not is_fsdp_module(model) or name in model.__dict__.setdefault("_vpt_fsdp_methods", set()):
        return
    from torch.distributed.fsdp import register_fsdp_forward_method
    register_fsdp_forward_method(model, name)
    model.__dict__["_vpt_fsdp_methods"].add(name)
