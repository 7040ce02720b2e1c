"""Prompted timm VisionTransformer (VPT, Jia et al., ECCV 2022, arXiv 2203.12119; docs/design.md §1).

`P` prompt tokens go after the prefix (class + register) tokens: `[prefix, prompts, patches]`, with no
position embedding. Shallow: prompt set 0 enters before block 0 and the prompts are ordinary tokens
from then on. Deep: before every block the prompt rows are replaced by that block's set, so each
`ViTBlock` takes the prompts separately and returns the token rows only. After the last block the
prompt rows are dropped, then timm's final norm and head run unchanged. Without gradients the prompts'
norm1 and projection are computed once and cached: deep, their keys/values for every block; shallow,
their queries/keys/values for block 0 (which then projects the prefix and patch rows only).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from vpt_fast.blocks.common import PromptQKV, pad_rope_rows
from vpt_fast.blocks.vit import ViTBlock
from vpt_fast.config import PromptConfig
from vpt_fast.models.common import (
    PromptedModel,
    check_cast_frozen,
    check_unprompted,
    install,
    prompt_module,
    warn_ignored_dropout,
)
from vpt_fast.ops.attention import gather_prompt_sets
from vpt_fast.prompt_cache import cached_prompt_values

SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "map", "")  # timm's pools, run after the prompt rows are dropped
HEAD_MODULES = ("fc_norm", "head_drop", "head")


class PromptedTokens:
    """The prompted forward of the ViT-like timm models (`VisionTransformer`, `Eva`): one token
    sequence, `blocks` of prompt-aware `ViTBlock`s, timm's `norm` and `forward_head`. Subclasses say
    how images become tokens (`_embed`) and which rotary embedding block i reads (`_block_rope`)."""

    SUPPORTED_POOLS: tuple[str, ...] = ()

    def _embed(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Images -> (token rows before the first block, rotary embedding of the rows after the prefix or None)."""
        raise NotImplementedError

    def _block_rope(self, rope: Optional[Tensor], i: int) -> Optional[Tensor]:
        return rope

    def _prompted_tokens(self, x: Tensor, blocks, take: Optional[set[int]] = None,
                         last_query_rows: Optional[int] = None, source=None) -> tuple[Tensor, list[Tensor]]:
        """Images -> token rows after `blocks` (prompt rows dropped), and the token rows after every
        block index in `take`. `last_query_rows=r`: the last block computes its first r rows only.
        `source`: where prompts come from (default `self.vpt`; a `PromptBank` passes its tasks')."""
        check_cast_frozen(self, x)
        x, rope = self._embed(x)
        source = self.vpt if source is None else source
        batch, npfx = x.shape[0], self.num_prefix_tokens
        deep = self.vpt_config.deep
        num_prompts, first_qkv = 0, None
        if not deep:
            sets, index = source.prompt_sets(0, batch)
            prompts = sets.expand(batch, -1, -1) if index is None else gather_prompt_sets(sets, index)
            num_prompts = prompts.shape[1]
            x = torch.cat([x[:, :npfx], prompts, x[:, npfx:]], dim=1)
            rope = None if rope is None else pad_rope_rows(rope, num_prompts)  # prompts: the identity rotation
            first_qkv = shallow_prompt_qkv(blocks[0], sets, source, self.vpt_config.backend, x.device)
        taken = []
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            rows = last_query_rows if i == last else None
            block_rope = self._block_rope(rope, i)
            if deep:
                prompts, index = block_prompts(block, i, batch, source, self.vpt_config.backend, x.device)
                x = block(x, prompts, query_rows=rows, prompt_index=index, rope=block_rope)
            elif i == 0 and first_qkv is not None:
                x = block.forward_prompt_rows(x, first_qkv, npfx, query_rows=rows, prompt_index=index, rope=block_rope)
            else:
                x = block(x, query_rows=rows, rope=block_rope)
            if take is not None and i in take:
                taken.append(torch.cat([x[:, :npfx], x[:, npfx + num_prompts:]], dim=1) if num_prompts else x)
        if num_prompts and last_query_rows is None:
            x = torch.cat([x[:, :npfx], x[:, npfx + num_prompts:]], dim=1)
        return x, taken

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _check_no_mask(attn_mask, is_causal)
        x, _ = self._prompted_tokens(x, self.blocks)
        return self.norm(x)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """Logits. With global_pool='token' the head reads the class token only, so the last block
        computes queries, attention rows, projection and MLP for that row alone (keys and values for
        every row), and the final norm runs on it: exact, and what makes the prompted model cheaper
        than its backbone."""
        _check_no_mask(attn_mask, is_causal)
        return self.head(self.forward_pre_logits(x))

    def forward_pre_logits(self, x: Tensor, source=None) -> Tensor:
        """Images -> what the classifier reads (pooled, fc-normed features after head dropout);
        `source` as in `_prompted_tokens`."""
        if self.global_pool == "token" and self.attn_pool is None:
            x, _ = self._prompted_tokens(x, self.blocks, last_query_rows=1, source=source)
        else:
            x, _ = self._prompted_tokens(x, self.blocks, source=source)
        return self.forward_head(self.norm(x), pre_logits=True)

    def forward_intermediates(
            self, x: Tensor, indices: Optional[Union[int, list[int]]] = None, return_prefix_tokens: bool = False,
            norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
            output_dict: bool = False, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]], dict[str, Any]]:
        """timm's `forward_intermediates` on the prompted model: every intermediate is computed with
        the prompts and returned in timm's shapes (prompt rows dropped)."""
        from timm.models._features import feature_take_indices
        _check_no_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        x, intermediates = self._prompted_tokens(x, blocks, set(take_indices))
        intermediates = [self.norm(y) if norm else y for y in intermediates]
        npfx = self.num_prefix_tokens
        prefix_tokens = [y[:, :npfx] for y in intermediates] if npfx else None
        intermediates = [y[:, npfx:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool not in self.SUPPORTED_POOLS:
            raise ValueError(f"a prompted {type(self).__name__} supports global_pool in {self.SUPPORTED_POOLS}, "
                             f"got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)
        self.head.train(self.training)

    def group_matcher(self, coarse: bool = False) -> dict:
        matcher = super().group_matcher(coarse)
        # blocks.<i> map to (group, i): the prompts enter block 0 (shallow) or start there (deep)
        matcher["blocks"] = list(matcher["blocks"]) + self._prompt_matchers(lambda stage: (0,))
        return matcher


class PromptedVisionTransformer(PromptedTokens, PromptedModel, VisionTransformer):
    """A timm `VisionTransformer` after `vpt_fast.prompt()` (never constructed directly)."""

    _TRAINABLE_MODULES = HEAD_MODULES
    SUPPORTED_POOLS = SUPPORTED_POOLS

    def _embed(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), None


def block_prompts(block: ViTBlock, i: int, batch: int, source, backend: str, device: torch.device):
    """(prompts, prompt_index) for deep block `i`. Without gradients, the prompt keys/values are
    computed once and cached on the source (`cached_prompt_values`: keyed by the prompt and
    projection parameters, the block's norm1 and attention parameters, backend, device and autocast
    dtype, so the cache never returns a stale value)."""
    sets, index = source.prompt_sets(i, batch)
    kv = cached_prompt_values(source, i, (block.norm1, block.attn), backend, device,
                              lambda: block.prompt_kv(sets, backend))
    return (sets if kv is None else kv), index


def shallow_prompt_qkv(block: ViTBlock, sets: Tensor, source, backend: str,
                       device: torch.device) -> Optional[PromptQKV]:
    """Shallow VPT: the prompt rows entering block 0 are the same for every image, so without
    gradients their norm1 and q/k/v projection (and qk-norm) are computed once and cached on the
    source, keyed as in `block_prompts`; None when they must be computed with the other rows."""
    return cached_prompt_values(source, 0, (block.norm1, block.attn), backend, device,
                                lambda: block.prompt_qkv(sets, backend))


def _check_no_mask(attn_mask: Optional[Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("prompted ViT models do not support attn_mask / is_causal")


def check_vit(model: VisionTransformer) -> None:
    if type(model) is not VisionTransformer:
        raise TypeError(f"vpt_fast.prompt supports timm VisionTransformer itself, not the subclass "
                        f"{type(model).__module__}.{type(model).__name__}")
    if model.global_pool not in SUPPORTED_POOLS:
        raise TypeError(f"global_pool={model.global_pool!r} is not supported: use one of {SUPPORTED_POOLS}")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise TypeError(f"blocks[{i}] is {type(block).__module__}.{type(block).__name__}; prompted ViTs "
                            f"support timm.models.vision_transformer.Block")


def install_token_model(model: nn.Module, config: PromptConfig, block_cls: type, prompted_cls: type) -> nn.Module:
    """Swap every block of a checked ViT-like model (`model.blocks`) for `block_cls`, add its prompts
    and turn it into `prompted_cls`, atomically (`install`)."""
    kwargs = dict(num_prefix_tokens=model.num_prefix_tokens, backend=config.backend, recompute=config.recompute)
    swaps = [(model.blocks, str(i), block_cls.from_timm(block, **kwargs)) for i, block in enumerate(model.blocks)]
    num_sets = len(model.blocks) if config.deep else 1
    prompts = prompt_module(model, [num_sets], [model.embed_dim], config, per_stage=False)
    warn_ignored_dropout(model, keep=HEAD_MODULES)
    return install(model, prompted_cls, prompts, config, swaps, HEAD_MODULES)


def prompt_vit(model: VisionTransformer, config: PromptConfig) -> PromptedVisionTransformer:
    """Add VPT to a timm `VisionTransformer` in place (see `vpt_fast.prompt`)."""
    check_unprompted(model)
    check_vit(model)
    return install_token_model(model, config, ViTBlock, PromptedVisionTransformer)


__all__ = ["PromptedTokens", "PromptedVisionTransformer", "install_token_model", "prompt_vit"]
