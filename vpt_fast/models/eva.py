"""Prompted timm `Eva` (DINOv3, EVA-02, PE, RoPE ViTs; docs/design.md §9).

The ViT contract (`models/vit.py`) on timm's Eva: prompts after the prefix (class + register /
storage) tokens, before the patches, with no absolute and no rotary position embedding: timm's
rotation applies to the patch rows only, so the prompt rows sit before them unrotated, which is timm's
own rotation with its prefix/patch split moved by P. Deep replaces the prompt rows before every block;
after the last block they are dropped and timm's final norm and head (`'token'`, `'avg'`, `'max'`,
`'avgmax'`, `'map'` attention pool, fc_norm) run unchanged. RoPE-Mixed models (per-layer frequencies)
hand block i its own rotary embedding.
"""
from __future__ import annotations

import warnings
from typing import Optional

from timm.models.eva import Eva
from timm.models.eva import EvaBlock as TimmEvaBlock
from torch import Tensor

from vpt_fast.blocks.common import stacklevel_outside_libraries
from vpt_fast.blocks.eva import EvaBlock
from vpt_fast.config import PromptConfig
from vpt_fast.models.common import PromptedModel, check_unprompted
from vpt_fast.models.vit import HEAD_MODULES, SUPPORTED_POOLS, PromptedTokens, install_token_model

# timm rotary embeddings with the `get_embed()` / `cat(sin, cos)` layout these blocks apply
_ROPE_TYPES = ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMixed")


class PromptedEva(PromptedTokens, PromptedModel, Eva):
    """A timm `Eva` after `vpt_fast.prompt()` (never constructed directly)."""

    _TRAINABLE_MODULES = HEAD_MODULES
    SUPPORTED_POOLS = SUPPORTED_POOLS

    def _embed(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        x = self.patch_embed(x)
        x, rope = self._pos_embed(x)
        return self.norm_pre(x), rope

    def _block_rope(self, rope: Optional[Tensor], i: int) -> Optional[Tensor]:
        return rope[i] if rope is not None and getattr(self, "rope_mixed", False) else rope


def check_eva(model: Eva) -> None:
    if type(model) is not Eva:
        raise TypeError(f"vpt_fast.prompt supports timm Eva itself, not the subclass "
                        f"{type(model).__module__}.{type(model).__name__}")
    if model.global_pool not in SUPPORTED_POOLS:
        raise TypeError(f"global_pool={model.global_pool!r} is not supported: use one of {SUPPORTED_POOLS}")
    rope = model.rope
    if rope is not None and type(rope).__name__ not in _ROPE_TYPES:
        raise TypeError(f"rotary embedding {type(rope).__module__}.{type(rope).__name__} is not supported: "
                        f"prompted Eva models support RoPE types 'cat', 'dinov3' and 'mixed' "
                        f"({', '.join(_ROPE_TYPES)})")
    for i, block in enumerate(model.blocks):
        if type(block) is not TimmEvaBlock:
            raise TypeError(f"blocks[{i}] is {type(block).__module__}.{type(block).__name__}; prompted Eva models "
                            f"support timm.models.eva.EvaBlock (pre-norm)")


def warn_train_time_rope(model: Eva) -> None:
    """timm's train-time RoPE augmentations (coordinate shift, jitter, rescale) act only in training
    mode, which the frozen backbone never enters: say so once, as for dropout."""
    rope = model.rope
    augment = {name: getattr(rope, name, None) for name in ("shift_coords", "jitter_coords", "rescale_coords")}
    active = {name: value for name, value in augment.items() if value}
    if active:
        warnings.warn(f"the prompted backbone stays in eval mode (as in the released VPT code), so timm's train-time "
                      f"RoPE augmentation is ignored: {active}", stacklevel=stacklevel_outside_libraries())


def prompt_eva(model: Eva, config: PromptConfig) -> PromptedEva:
    """Add VPT to a timm `Eva` in place (see `vpt_fast.prompt`)."""
    check_unprompted(model)
    check_eva(model)
    warn_train_time_rope(model)
    return install_token_model(model, config, EvaBlock, PromptedEva)


__all__ = ["PromptedEva", "prompt_eva"]
