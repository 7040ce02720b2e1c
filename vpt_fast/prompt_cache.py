"""The prompt K/V cache (docs/design.md §8): one home for what is cached, its key and its invalidation.

Without gradients, what a block derives from the prompts entering it (norm1 and the K/V projection,
for shallow block 0 also the queries) is the same for every image and every batch, so it is computed
once and kept on the prompt source (a `PromptSource`: a model's `VisualPrompts`, or a `PromptBank`'s
task table), keyed by everything it depends on. `clear_caches` drops every cached value of a model.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Optional, Protocol

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from vpt_fast.backends import resolve_auto
from vpt_fast.backends.dtypes import autocast_dtype
from vpt_fast.fsdp import any_dtensor, local_tensor
from vpt_fast.ops import parameters_of


class PromptSource(Protocol):
    """Where a prompted model's blocks read their prompts from."""

    def prompt_sets(self, index: int, batch: int, stage: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """What block `index` of `stage` reads: (rows (1 or B, P, width), None), or (sets (S, P,
        width), per-sample set index (B,)) for a bank of tasks."""

    def cache_key(self) -> Optional[tuple]:
        """Identifies the current prompt values (see `parameter_key`), or None while prompt dropout
        draws new rows on every call (nothing to cache)."""

    @property
    def kv_cache(self) -> dict:
        """{slot: (key, cached values)}, emptied by `clear_caches`."""


class KVCacheOwner(nn.Module):
    """A module that holds per-block prompt keys/values computed without gradients (see
    `vpt_fast.models.vit.block_prompts`): derived values, never pickled or deep-copied."""

    @property
    def kv_cache(self) -> dict:
        return self.__dict__.setdefault("_kv_cache", {})

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_kv_cache", None)
        return state


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers update parameters without bumping their version counters: every
# torch.optim.Optimizer step (timm's optimizers included) changes the prompt caches' keys instead.
register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """torch.optim optimizer steps taken in this process (part of every prompt-cache key)."""
    return _optimizer_steps


def parameter_key(tensors) -> tuple:
    """(storage, offset, version, dtype, device) of every tensor: changes whenever a value may have
    changed (optimizer steps and `copy_` bump the version, `.data =` and `.to()` change the storage).
    A DTensor (an FSDP2-sharded parameter) is identified by this rank's slice."""
    tensors = [local_tensor(t) for t in tensors]
    return tuple((StorageId(t), t.storage_offset(), t._version, t.dtype, t.device) for t in tensors)


class StorageId:
    """The identity of a tensor's storage, for cache keys. A data pointer is not one: a freed
    storage's memory is soon reused by a new one (`.data =`, `.to()` and back). This holds a weak
    reference to the storage, which keeps its address from being given to another storage while
    the key lives (without keeping its memory), and equals another StorageId of the same storage."""

    __slots__ = ("ref",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = StorageWeakRef(tensor.untyped_storage())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorageId) and self.ref.cdata == other.ref.cdata and not self.ref.expired()

    def __hash__(self) -> int:
        return hash(self.ref.cdata)


def cached_prompt_values(source: PromptSource, slot: Hashable, modules: Iterable[nn.Module], backend: str,
                         device: torch.device, compute: Callable[[], Any], variant: Hashable = None) -> Optional[Any]:
    """What `compute()` derives from the prompts entering one block (their keys/values after norm1
    and the qkv projection), computed once and cached on the prompt source while no gradient is
    needed; None when it must be computed in the forward pass instead (gradients enabled, the
    reference backend, torch.compile tracing, prompt dropout drawing new rows, or block weights that
    are sharded DTensors: FSDP2 gathers them only inside the block's own forward, docs/design.md §7).

    The cache entry of `slot` is keyed by everything the values depend on: the source's
    `cache_key()` (prompt and projection parameters: storage, version, dtype, device), the
    parameters of `modules` (the block's norm and projections), the resolved backend, the device,
    the autocast dtype and `variant` (what `compute` returns, e.g. with or without queries); any
    change recomputes them. Two kinds of update leave storage and version as they were: fused
    optimizers (`torch.optim.AdamW(fused=True)`) and writes through `.data`. So the key also holds
    the number of optimizer steps taken in the process, and a forward with gradients (a training
    step) empties the source's cache. What remains unseen is a `.data` write outside training (e.g.
    loading values by hand): call `vpt_fast.clear_caches(model)` after it.

    Args:
        source: the prompt source (`VisualPrompts`, or a `PromptBank`'s task table).
        slot: the block's key in `source.kv_cache`, e.g. its index.
        modules: the block's modules `compute` reads parameters of.
        backend: the block's backend ("auto" is resolved for `device`).
        device: the device of the token rows.
        compute: builds the values, without gradients.
        variant: anything else that changes what `compute` returns.
    """
    backend = resolve_auto(backend, device)
    if torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled():
        source.kv_cache.clear()  # a training step may change parameters without a version bump
        return None
    if backend == "reference":
        return None
    params = list(parameters_of(*modules))
    if any_dtensor(params):
        return None
    key = source.cache_key()
    if key is None:
        return None
    key = (key, parameter_key(params), backend, device,
           autocast_dtype(device), optimizer_steps(), variant)
    hit = source.kv_cache.get(slot)
    if hit is None or hit[0] != key:
        hit = source.kv_cache[slot] = (key, compute())
    return hit[1]


def clear_caches(root: nn.Module) -> None:
    """Drop every value derived from parameters and cached for inference under `root`: the prompt
    keys/values of every cache owner, and what modules with a `clear_caches()` method keep (Swin's
    attention biases)."""
    for module in root.modules():
        if isinstance(module, KVCacheOwner):
            module.kv_cache.clear()
        if callable(getattr(module, "clear_caches", None)):
            module.clear_caches()
