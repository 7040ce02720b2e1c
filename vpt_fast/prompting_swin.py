"""prompt_swin(): turn a timm SwinTransformer into a VPT model in place (DESIGN.md §1 "Swin", §4).

Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119) on Swin (arXiv 2103.14030): prompts
are prepended to stage 0; in every block they join every attention window of their image (zero
relative-position bias and shift mask for prompt pairs) and their output is the mean over windows;
patch merging repeats them [p, p, p, p] before the merging norm and reduction; deep VPT replaces
them with a learned set before every block (stage 0: the input set for block 0, then one per later
block; stages s > 0: one per block). The final norm runs on [prompts, patches] and timm's head
average-pools over both.

Parameters (`model.vpt`, a `SwinPrompts`): `prompts.<s>` of shape (n_s, P, C_s), or (n_s, P, k)
with `project=k`, in which case stage s has its own trainable `proj.<s>` = Linear(k, C_s) (the
released code has no projection for Swin; one per stage is the natural extension, since the stage
widths differ). Initialisation as the released code: uniform(-v, v) for every stage with
v = sqrt(6 / (3 * ph * pw + d0)), d0 the stage-0 prompt dimension (k, or C_0).

Prompt dropout follows the ViT code: applied after expanding a set to the batch (one mask per
sample). The released Swin code drops out deep sets before expanding (one mask per batch).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from vpt_fast.blocks.swin import SwinBlock, SwinPatchMerging
from vpt_fast.config import PromptConfig
from vpt_fast.prompting import install_prompts


class SwinPrompts(nn.Module):
    """The trainable prompt parameters of one prompted Swin model.

    Args:
        num_sets: prompt sets per stage, e.g. deep Swin-T (2, 2, 6, 2), shallow (1,).
        num_prompts: tokens per set (P).
        stage_dims: width C_s of every stage that has prompts.
        patch_size: (ph, pw) of the backbone, for the paper's initialisation.
        project: prompt dimension k with a trainable Linear(k, C_s) per stage, or None.
        dropout: prompt dropout probability.
    """

    def __init__(self, num_sets: Sequence[int], num_prompts: int, stage_dims: Sequence[int],
                 patch_size: tuple[int, int], project: Optional[int] = None, dropout: float = 0.0) -> None:
        super().__init__()
        if len(num_sets) != len(stage_dims):
            raise ValueError(f"num_sets {tuple(num_sets)} and stage_dims {tuple(stage_dims)} differ in length")
        dims = [project or dim for dim in stage_dims]
        self.prompts = nn.ParameterList([nn.Parameter(torch.empty(n, num_prompts, d)) for n, d in zip(num_sets, dims)])
        bound = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + dims[0]))
        for p in self.prompts:
            nn.init.uniform_(p, -bound, bound)
        self.proj = None
        if project is not None:
            self.proj = nn.ModuleList([nn.Linear(project, dim) for dim in stage_dims])
            for proj in self.proj:
                nn.init.kaiming_normal_(proj.weight, a=0, mode="fan_out")
        self.dropout = nn.Dropout(dropout)

    def state_tensors(self) -> dict[str, Tensor]:
        """The prompt-side entries of `prompt_state_dict` (DESIGN.md §4)."""
        named = {f"prompts.{s}": p for s, p in enumerate(self.prompts)}
        if self.proj is not None:
            for s, proj in enumerate(self.proj):
                named[f"proj.{s}.weight"], named[f"proj.{s}.bias"] = proj.weight, proj.bias
        return named

    def tokens(self, stage: int, index: int, batch: int) -> Tensor:
        """Set `index` of stage `stage` as it enters the sequence: (1, P, C_s) when it is the same
        for every sample, (B, P, C_s) when prompt dropout draws a mask per sample."""
        p = self.prompts[stage][index]
        if self.proj is not None:
            p = self.proj[stage](p)
        if self.training and self.dropout.p > 0:
            return self.dropout(p.expand(batch, -1, -1))
        return p.unsqueeze(0)


def _swin_forward_features(self, x: Tensor) -> Tensor:
    """Prompted Swin features: (B, 1, P + H*W, C) after the final norm, an NHWC map whose average
    pool (timm's head) runs over prompts and patches together (DESIGN.md §1)."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    img_size = getattr(self.patch_embed, "img_size", None)
    if getattr(self.patch_embed, "strict_img_size", False) and tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"image size {tuple(x.shape[-2:])} does not match the model's "
                         f"{tuple(img_size)} (create the model with that img_size, "
                         f"or strict_img_size=False)")
    x = self.patch_embed(x)
    vpt: SwinPrompts = self.vpt
    deep, batch = self.vpt_config.deep, x.shape[0]
    prompts = vpt.tokens(0, 0, batch)
    last_stage = len(self.layers) - 1
    for s, stage in enumerate(self.layers):
        if isinstance(stage.downsample, SwinPatchMerging) and prompts is not None:
            x, prompts = stage.downsample(x, prompts)
        else:
            x = stage.downsample(x)
        for i, block in enumerate(stage.blocks):
            if deep and (s, i) != (0, 0):
                prompts = vpt.tokens(s, i, batch)
            last = s == last_stage and i == len(stage.blocks) - 1
            x, prompts = block(x, prompts, need_prompts=not deep or last)
    tokens = torch.cat([prompts.expand(batch, -1, -1), x.flatten(1, 2)], dim=1)
    return self.norm(tokens).unsqueeze(1)


def _check_swin(model: nn.Module) -> None:
    from timm.models.swin_transformer import SwinTransformer
    if not isinstance(model, SwinTransformer):
        raise TypeError(f"prompt_swin supports timm SwinTransformer models, got {type(model).__name__}")
    pool = getattr(getattr(model.head, "global_pool", None), "pool_type", None)
    if pool != "avg":
        raise TypeError(f"prompted Swin needs global_pool='avg' (prompts and patches are averaged "
                        f"together), got {pool!r}")
    if not isinstance(model.norm, nn.LayerNorm):
        raise TypeError(f"expected the final norm to be nn.LayerNorm, got {type(model.norm).__name__}")
    for s, stage in enumerate(model.layers):
        if len(stage.blocks) < 1:
            raise TypeError(f"stage {s} has no blocks")


def prompt_swin(model: nn.Module, config: PromptConfig) -> nn.Module:
    """Add Visual Prompt Tuning to a timm `SwinTransformer`, in place, and return it.

    Swaps every block for `SwinBlock` and every `PatchMerging` for `SwinPatchMerging` (timm's
    submodules are kept, so state_dict keys do not change), adds `model.vpt` (a `SwinPrompts`) and
    `model.vpt_config`, freezes the backbone (kept in eval mode even under `model.train()`) and
    leaves prompts, projections and the classifier head trainable.
    """
    if hasattr(model, "vpt"):
        raise ValueError("model is already prompted (it has a `vpt` module); create a fresh model")
    if not isinstance(config, PromptConfig):
        raise TypeError(f"config must be a vpt_fast.PromptConfig, got {type(config).__name__}")
    _check_swin(model)
    from timm.models.swin_transformer import PatchMerging
    for s, stage in enumerate(model.layers):
        if type(stage.downsample) not in (PatchMerging, nn.Identity):
            raise TypeError(f"stage {s}: unsupported downsample layer {type(stage.downsample).__name__} "
                            f"(expected timm PatchMerging)")
    kwargs = dict(backend=config.backend, recompute=config.recompute)
    blocks = [[SwinBlock.from_timm(b, **kwargs) for b in stage.blocks] for stage in model.layers]
    mergings = [SwinPatchMerging.from_timm(stage.downsample, **kwargs)
                if isinstance(stage.downsample, PatchMerging) else None for stage in model.layers]
    for p in model.parameters():
        p.requires_grad_(False)
    for stage, stage_blocks, merging in zip(model.layers, blocks, mergings):
        for i, block in enumerate(stage_blocks):
            stage.blocks[i] = block
        if merging is not None:
            stage.downsample = merging
    stage_dims = [stage_blocks[0].dim for stage_blocks in blocks]
    num_sets = [len(stage_blocks) for stage_blocks in blocks] if config.deep else [1]
    param = next(model.parameters())
    prompts = SwinPrompts(num_sets, config.num_prompts, stage_dims[:len(num_sets)],
                          tuple(model.patch_embed.patch_size), config.project, config.dropout)
    return install_prompts(model, prompts.to(device=param.device, dtype=param.dtype), config, _swin_forward_features)
