"""Prompted timm SwinTransformer (VPT, arXiv 2203.12119, on Swin, arXiv 2103.14030; docs/design.md §1).

Prompts are prepended to stage 0; in every block they join every attention window of their image
(zero relative-position bias and shift mask for prompt pairs) and their output is the mean over the
windows; patch merging repeats them [p, p, p, p] before the merging norm and reduction; deep VPT
replaces them with a learned set before every block (stage 0: the input set for block 0, then one per
later block; stages s > 0: one per block). The final norm runs on [prompts, patches] and the average
pool of timm's head runs over both. Without gradients, the norm1 and K/V projection of the prompts
that are parameters (every block deep, the first block shallow) are computed once and cached.

Parameters (`model.vpt`): `prompts.<s>` of shape (n_s, P, C_s), or (n_s, P, k) with `project=k`, in
which case stage s has its own `proj.<s>` = Linear(k, C_s) (the released code has no projection for
Swin; one per stage is the natural extension, since the stage widths differ). Prompt dropout follows
the ViT code: applied after expanding a set to the batch (one mask per sample).

timm entry points: `forward_features` returns timm's (B, H, W, C) map of the patches (computed with the
prompts); `forward_tokens` returns the normalised [prompts, patches] rows (B, P + H*W, C) that the head
pools; `forward_head` takes those rows (a patch map alone would silently drop the prompts from the
pool, so it is refused); `forward_intermediates` returns prompted stage outputs in timm's shapes.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from torch import Tensor, nn

from vpt_fast.blocks.common import PromptQKV
from vpt_fast.blocks.swin import SwinBlock, SwinPatchMerging
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

_HEAD = ("head",)


class PromptedSwinTransformer(PromptedModel, SwinTransformer):
    """A timm `SwinTransformer` after `vpt_fast.prompt()` (never constructed directly)."""

    _TRAINABLE_MODULES = _HEAD

    def _prompted_stages(self, x: Tensor, num_stages: int, need_last_prompts: bool,
                         take: Optional[set[int]] = None, source=None) -> tuple[Tensor, Optional[Tensor], list[Tensor]]:
        """Images -> (patch grid (B, H, W, C) after `num_stages` stages, the prompt rows after the
        last block when `need_last_prompts` (else possibly None), the grids after stages in `take`).
        `source`: where prompts come from (default `self.vpt`; a `PromptBank` passes its tasks')."""
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"expected images of shape (B, C, H, W) with B >= 1, got {tuple(x.shape)}"
                             f"{' (batch 0)' if x.dim() == 4 else ''}")
        img_size = getattr(self.patch_embed, "img_size", None)
        if getattr(self.patch_embed, "strict_img_size", False) and tuple(x.shape[-2:]) != tuple(img_size):
            raise ValueError(f"image size {tuple(x.shape[-2:])} does not match the model's {tuple(img_size)} "
                             f"(create the model with that img_size, or strict_img_size=False)")
        check_cast_frozen(self, x)
        x = self.patch_embed(x)
        source = self.vpt if source is None else source
        deep, batch = self.vpt_config.deep, x.shape[0]
        sets, index = source.prompt_sets(0, batch)
        prompts = _sample_rows(sets, index)
        prompts_are_sets = True  # the prompt rows entering the next block are the source's parameters
        taken = []
        for s, stage in enumerate(self.layers[:num_stages]):
            if isinstance(stage.downsample, SwinPatchMerging) and prompts is not None:
                x, prompts = stage.downsample(x, prompts)
                prompts_are_sets = False
            else:
                x = stage.downsample(x)
            for i, block in enumerate(stage.blocks):
                if deep and (s, i) != (0, 0):
                    sets, index = source.prompt_sets(i, batch, stage=s)
                    prompts, prompts_are_sets = _sample_rows(sets, index), True
                last = s == num_stages - 1 and i == len(stage.blocks) - 1
                need_prompts = not deep or (last and need_last_prompts)
                qkv = None
                if prompts_are_sets:
                    # the model's last block caches its prompt queries whether or not this call
                    # needs them, so forward and forward_features share one entry
                    queries = need_prompts or (s, i) == (len(self.layers) - 1, len(stage.blocks) - 1)
                    qkv = block_prompt_qkv(block, (s, i), sets, index, source, queries,
                                           self.vpt_config.backend, x.device)
                x, prompts = block(x, prompts, need_prompts=need_prompts, prompt_qkv=qkv)
                prompts_are_sets = False
            if take is not None and s in take:
                taken.append(x)
        return x, prompts, taken

    def forward_tokens(self, x: Tensor, source=None) -> Tensor:
        """Images -> the final-normalised [prompts, patches] rows (B, P + H*W, C) the head pools."""
        x, prompts, _ = self._prompted_stages(x, len(self.layers), need_last_prompts=True, source=source)
        tokens = torch.cat([prompts.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        return self.norm(tokens)

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's features, (B, H, W, C) after the final norm, computed with the prompts. The head
        pools prompts too, so use `forward_tokens` (or the model itself) for what the head sees."""
        x, _, _ = self._prompted_stages(x, len(self.layers), need_last_prompts=False)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's head on the rows of `forward_tokens` (B, P + H*W, C): the average pool runs over
        prompts and patches together, as in the released code."""
        if x.dim() != 3:
            raise ValueError(f"a prompted Swin's head pools prompts and patches together: pass the (B, P + H*W, C) "
                             f"rows of model.forward_tokens(images), not a {tuple(x.shape)} feature map "
                             f"(forward_features has no prompt rows)")
        return self.head(x.unsqueeze(1), pre_logits=True) if pre_logits else self.head(x.unsqueeze(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_tokens(x))

    def forward_pre_logits(self, x: Tensor, source=None) -> Tensor:
        """Images -> what the classifier reads (the pool over prompts and patches, after head dropout)."""
        return self.forward_head(self.forward_tokens(x, source), pre_logits=True)

    def forward_intermediates(
            self, x: Tensor, indices: Optional[Union[int, list[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """timm's `forward_intermediates` on the prompted model: stage outputs computed with the
        prompts, in timm's shapes (patch grids, NCHW)."""
        from timm.models._features import feature_take_indices
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        num_stages = len(self.layers)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        run = max_index + 1 if stop_early else num_stages
        x, _, taken = self._prompted_stages(x, run, need_last_prompts=False, take=set(take_indices))
        intermediates = []
        for s, y in zip(sorted(take_indices), taken):
            y = self.norm(y) if norm and s == num_stages - 1 else y
            intermediates.append(y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        return (self.norm(x) if run == num_stages else x), intermediates

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"a prompted Swin pools prompts and patches with global_pool='avg', got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)
        self.head.train(self.training)

    def group_matcher(self, coarse: bool = False) -> dict:
        matcher = super().group_matcher(coarse)
        blocks = matcher["blocks"]
        blocks = [(blocks, None)] if isinstance(blocks, str) else list(blocks)
        # stage s's prompts enter its first block: (s,) coarse, (s, 0) fine
        matcher["blocks"] = blocks + self._prompt_matchers(lambda s: (s,) if coarse else (s, 0))
        return matcher


def block_prompt_qkv(block: SwinBlock, slot: tuple[int, int], sets: Tensor, index: Optional[Tensor], source,
                     queries: bool, backend: str, device: torch.device) -> Optional[PromptQKV]:
    """The prompts' keys/values (and, with `queries`, queries) for block `slot` = (stage, block),
    whose prompts are the parameter sets `sets`: without gradients computed once per set and cached
    on the source (`cached_prompt_values`: keyed by the prompt and projection parameters, the block's
    norm1/qkv parameters, backend, device and autocast dtype; every window of an image reads them,
    whatever the window grid), then taken per image as `_sample_rows` takes the rows; None when they
    must be computed in the block."""
    qkv = cached_prompt_values(source, slot, (block.norm1, block.attn.qkv), backend, device,
                               lambda: block.prompt_qkv(sets, backend, queries), variant=queries)
    if qkv is None or index is None:
        return qkv
    return PromptQKV(*(None if t is None else gather_prompt_sets(t, index) for t in qkv))


def _sample_rows(sets: Tensor, index: Optional[Tensor]) -> Tensor:
    """Prompt rows as a Swin block takes them: (1 or B, P, C); a bank's sets are gathered per image
    (each image's prompts also join every one of its windows as queries)."""
    return sets if index is None else gather_prompt_sets(sets, index)


def check_swin(model: SwinTransformer) -> None:
    if type(model) is not SwinTransformer:
        raise TypeError(f"vpt_fast.prompt supports timm SwinTransformer itself, not the subclass "
                        f"{type(model).__module__}.{type(model).__name__}")
    pool = getattr(getattr(model.head, "global_pool", None), "pool_type", None)
    if pool != "avg":
        raise TypeError(f"prompted Swin needs global_pool='avg' (prompts and patches are averaged together), "
                        f"got {pool!r}")
    if not isinstance(model.norm, nn.LayerNorm):
        raise TypeError(f"expected the final norm to be nn.LayerNorm, got {type(model.norm).__name__}")
    for s, stage in enumerate(model.layers):
        if len(stage.blocks) < 1:
            raise TypeError(f"stage {s} has no blocks")
        if type(stage.downsample) not in (PatchMerging, nn.Identity):
            raise TypeError(f"stage {s}: unsupported downsample layer {type(stage.downsample).__name__} "
                            f"(expected timm PatchMerging)")
        for i, block in enumerate(stage.blocks):
            if type(block) is not SwinTransformerBlock:
                raise TypeError(f"layers[{s}].blocks[{i}] is {type(block).__name__}; prompted Swin supports "
                                f"timm SwinTransformerBlock")


def prompt_swin(model: SwinTransformer, config: PromptConfig) -> PromptedSwinTransformer:
    """Add VPT to a timm `SwinTransformer` in place (see `vpt_fast.prompt`)."""
    check_unprompted(model)
    check_swin(model)
    kwargs = dict(backend=config.backend, recompute=config.recompute)
    swaps = []
    for stage in model.layers:
        swaps += [(stage.blocks, str(i), SwinBlock.from_timm(b, **kwargs)) for i, b in enumerate(stage.blocks)]
        if isinstance(stage.downsample, PatchMerging):
            swaps.append((stage, "downsample", SwinPatchMerging.from_timm(stage.downsample, **kwargs)))
    widths = [stage.blocks[0].dim for stage in model.layers]
    num_sets = [len(stage.blocks) for stage in model.layers] if config.deep else [1]
    prompts = prompt_module(model, num_sets, widths[:len(num_sets)], config, per_stage=True)
    warn_ignored_dropout(model, keep=_HEAD)
    return install(model, PromptedSwinTransformer, prompts, config, swaps, _HEAD)
