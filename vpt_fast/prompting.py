"""prompt(): turn a timm VisionTransformer into a VPT model in place (DESIGN.md §1, §4).

Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119): the backbone is frozen and kept in
eval mode; only the prompt tokens (+ optional projection) and the classifier head train.
"""
from __future__ import annotations

import math
from types import MethodType
from typing import Optional

import torch
from torch import Tensor, nn

from vpt_fast.backends import available_backends, validate_backend
from vpt_fast.blocks.vit import ViTBlock
from vpt_fast.config import PromptConfig


class VisualPrompts(nn.Module):
    """The trainable prompt parameters of one model.

    Args:
        num_sets: prompt sets (1 for shallow, one per block for deep).
        num_prompts: tokens per set.
        embed_dim: model width D.
        patch_size: (ph, pw) of the backbone, for the paper's initialisation.
        project: prompt dimension k with a trainable Linear(k, D), or None (prompts live in D).
        dropout: prompt dropout probability.
    """

    def __init__(self, num_sets: int, num_prompts: int, embed_dim: int, patch_size: tuple[int, int],
                 project: Optional[int] = None, dropout: float = 0.0) -> None:
        super().__init__()
        prompt_dim = project or embed_dim
        self.prompts = nn.Parameter(torch.empty(num_sets, num_prompts, prompt_dim))
        bound = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + prompt_dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.proj = None
        if project is not None:
            self.proj = nn.Linear(prompt_dim, embed_dim)
            nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        self.dropout = nn.Dropout(dropout)

    def state_tensors(self) -> dict[str, Tensor]:
        """The prompt-side entries of `prompt_state_dict` (DESIGN.md §4)."""
        named = {"prompts": self.prompts}
        if self.proj is not None:
            named["proj.weight"], named["proj.bias"] = self.proj.weight, self.proj.bias
        return named

    def tokens(self, index: int, batch: int) -> Tensor:
        """Prompt set `index` as it enters the sequence: (1, P, D) when it is the same for every
        sample, (B, P, D) when prompt dropout draws a mask per sample (as the released code, which
        applies dropout after expanding to the batch)."""
        p = self.prompts[index]
        if self.proj is not None:
            p = self.proj(p)
        if self.training and self.dropout.p > 0:
            return self.dropout(p.expand(batch, -1, -1))
        return p.unsqueeze(0)


def _vit_forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    if attn_mask is not None or is_causal:
        raise ValueError("prompted ViT models do not support attn_mask / is_causal")
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    vpt: VisualPrompts = self.vpt
    batch, npfx = x.shape[0], self.num_prefix_tokens
    if self.vpt_config.deep:
        for i, block in enumerate(self.blocks):
            x = block(x, vpt.tokens(i, batch))
    else:
        prompts = vpt.tokens(0, batch).expand(batch, -1, -1)
        x = torch.cat([x[:, :npfx], prompts, x[:, npfx:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = torch.cat([x[:, :npfx], x[:, npfx + prompts.shape[1]:]], dim=1)
    return self.norm(x)


def _train_prompts_only(self, mode: bool = True):
    """model.train(): the frozen backbone stays in eval mode; only prompt dropout follows `mode`."""
    nn.Module.train(self, False)
    self.vpt.train(mode)
    return self


def _check_vit(model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vpt_fast.prompt supports timm VisionTransformer models, got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("global_pool='map' (attention pooling) is not supported: use 'token' or 'avg'")
    if model.global_pool not in ("token", "avg", ""):
        raise TypeError(f"global_pool={model.global_pool!r} is not supported: use 'token' or 'avg'")


def prompt(model: nn.Module, num_prompts: int = 50, deep: bool = True, dropout: float = 0.0,
           project: Optional[int] = None, backend: str = "auto", recompute: str = "none") -> nn.Module:
    """Add Visual Prompt Tuning to a timm model, in place, and return it.

    Swaps every block for its prompt-aware twin (`ViTBlock.from_timm`), adds the prompt parameters
    (`model.vpt.prompts`, shape (Lp, P, D) or (Lp, P, project)), freezes the backbone (kept in eval
    mode even under `model.train()`) and leaves prompts, projection and classifier head trainable.

    Args:
        model: a timm `VisionTransformer` (class and/or register tokens, 'token' or 'avg' pooling)
            or `SwinTransformer` (DESIGN.md §1 "Swin").
        num_prompts: P, prompt tokens per prompted block.
        deep: VPT-Deep (a prompt set per block) or VPT-Shallow (input only).
        dropout: prompt dropout.
        project: prompt dimension with a trainable projection to the model width, or None.
        backend: "auto", "reference", "torch", "triton" or "cuda".
        recompute: "none", "mlp" or "block".
    """
    if hasattr(model, "vpt"):
        raise ValueError("model is already prompted (it has a `vpt` module); create a fresh model")
    config = PromptConfig(num_prompts=num_prompts, deep=deep, dropout=dropout, project=project,
                          backend=backend, recompute=recompute)
    from timm.models.swin_transformer import SwinTransformer
    if isinstance(model, SwinTransformer):
        from vpt_fast.prompting_swin import prompt_swin
        return prompt_swin(model, config)
    _check_vit(model)
    blocks = [ViTBlock.from_timm(b, num_prefix_tokens=model.num_prefix_tokens, backend=config.backend,
                                 recompute=config.recompute) for b in model.blocks]
    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(blocks):
        model.blocks[i] = block
    patch_size = tuple(model.patch_embed.patch_size)
    param = next(model.parameters())
    prompts = VisualPrompts(len(blocks) if deep else 1, num_prompts, model.embed_dim, patch_size, project, dropout)
    return install_prompts(model, prompts.to(device=param.device, dtype=param.dtype), config, _vit_forward_features)


def install_prompts(model: nn.Module, prompts: nn.Module, config: PromptConfig, forward_features) -> nn.Module:
    """Attach the prompt module as `model.vpt`, make the classifier head trainable, and route the
    model's `forward_features` and `train` through VPT (the backbone is already frozen)."""
    model.vpt = prompts
    model.vpt_config = config
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    model.forward_features = MethodType(forward_features, model)
    model.train = MethodType(_train_prompts_only, model)
    model.train(model.training)
    return model


def _prompted(model: nn.Module) -> nn.Module:
    vpt = getattr(model, "vpt", None)
    if not hasattr(vpt, "state_tensors"):
        raise ValueError("model is not prompted: call vpt_fast.prompt(model, ...) first")
    return vpt


def set_backend(model: nn.Module, backend: str, recompute: Optional[str] = None) -> nn.Module:
    """Switch a prompted model's backend (and optionally its recompute policy) in place."""
    _prompted(model)
    validate_backend(backend)
    model.vpt_config.backend = backend
    if recompute is not None:
        model.vpt_config.recompute = recompute
        PromptConfig(**model.vpt_config.to_dict())  # validates
    for module in model.modules():
        if getattr(module, "is_vpt_block", False):
            module.backend = backend
            if recompute is not None:
                module.recompute = recompute
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
