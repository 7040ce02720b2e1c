"""prompt(): turn a timm ViT or Swin into a VPT model in place (docs/design.md §1, §4, §7).

Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119): the backbone is frozen and kept in
eval mode; only the prompt tokens (+ optional projection) and the classifier head train.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from vpt_fast import prompt_cache
from vpt_fast.config import PromptConfig
from vpt_fast.models.common import PromptedModel, apply_block_settings
from vpt_fast.prompts import VisualPrompts


def prompt(model: nn.Module, num_prompts: int = 50, deep: bool = True, dropout: float = 0.0,
           project: Optional[int] = None, backend: str = "auto", recompute: str = "none") -> nn.Module:
    """Add Visual Prompt Tuning to a timm model, in place, and return it.

    Swaps every block for its prompt-aware twin (`ViTBlock`, `EvaBlock`, `SwinBlock`), adds the prompt
    parameters (`model.vpt`), freezes the backbone (kept in eval mode even under `model.train()`),
    leaves prompts, projection and classifier head trainable, and turns the model into an importable
    prompted subclass (`PromptedVisionTransformer`, `PromptedEva`, `PromptedSwinTransformer`) so it
    pickles and `torch.save`s like any timm model. Every argument is checked and every new module built
    before the model changes: if anything fails, the model is exactly as it was.

    Args:
        model: a timm model of a class in `vpt_fast.models.families.FAMILIES`: `VisionTransformer`
            (class and/or register tokens; 'token', 'avg', 'map' or '' pooling), `Eva` (DINOv3, EVA-02,
            PE, RoPE ViTs) or `SwinTransformer` (docs/design.md §1, §9).
        num_prompts: P, prompt tokens per prompted block (an int >= 1).
        deep: VPT-Deep (a prompt set per block) or VPT-Shallow (input only); a bool.
        dropout: prompt dropout, a float in [0, 1).
        project: prompt dimension (an int >= 1) with a trainable projection to the model width, or None.
        backend: one of `vpt_fast.backends.BACKENDS` (must be available here).
        recompute: "none", "mlp" or "block".
    """
    config = PromptConfig(num_prompts=num_prompts, deep=deep, dropout=dropout, project=project,
                          backend=backend, recompute=recompute)
    from vpt_fast.models.families import family_of
    return family_of(model).prompt(model, config)


def prompts_of(model: nn.Module) -> VisualPrompts:
    """The prompt module of a prompted model (ValueError otherwise)."""
    if not isinstance(model, PromptedModel) or not isinstance(getattr(model, "vpt", None), VisualPrompts):
        raise ValueError("model is not prompted: call vpt_fast.prompt(model, ...) first")
    return model.vpt


def set_backend(model: nn.Module, backend: str, recompute: Optional[str] = None) -> nn.Module:
    """Switch a prompted model's backend (and optionally its recompute policy) in place. Both are
    validated before anything changes. A recompute policy given here replaces timm's gradient
    checkpointing (which is recompute="block")."""
    prompts_of(model)
    current = model.vpt_config
    config = PromptConfig(**{**current.to_dict(), "backend": backend,
                             "recompute": current.recompute if recompute is None else recompute})
    if recompute is not None:
        model.__dict__.pop("_recompute_before_checkpointing", None)
    model.vpt_config = config
    apply_block_settings(model)
    return model


def clear_caches(model: nn.Module) -> nn.Module:
    """Drop every value derived from parameters and cached for inference in `model` (a prompted
    model or a `PromptBank`): the prompt keys/values and Swin's attention biases. They rebuild on the
    next forward. Needed only after a write the caches cannot see: values put into a parameter
    through `.data` outside a training step. Optimizer steps (fused ones too), `load_prompts`,
    `load_state_dict`, `.to()` and in-place updates under `torch.no_grad()` are seen."""
    if not isinstance(model, prompt_cache.KVCacheOwner):  # a PromptBank owns its cache
        prompts_of(model)
    prompt_cache.clear_caches(model)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
