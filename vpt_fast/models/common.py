"""What every prompted timm model shares (docs/design.md §1, §7).

`prompt()` turns a timm model into an instance of an importable subclass (`PromptedVisionTransformer`,
`PromptedSwinTransformer`) by switching its class, so a prompted model pickles, deep-copies and
`torch.save`s like any timm model. `install()` does it atomically: every argument is checked and every
new module built before the model changes, and any failure restores the model exactly.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from vpt_fast.backends.dtypes import autocast_dtype
from vpt_fast.blocks.common import stacklevel_outside_libraries
from vpt_fast.config import PromptConfig
from vpt_fast.prompts import VisualPrompts


class PromptedModel:
    """Behaviour shared by prompted timm models (mixed in before the timm class).

    Attributes set by `install`: `vpt` (a `VisualPrompts`), `vpt_config` (a `PromptConfig`).
    """

    vpt: VisualPrompts
    vpt_config: PromptConfig

    # Modules that follow train()/eval(): the head (and its dropout); the rest stays in eval mode.
    _TRAINABLE_MODULES: tuple[str, ...] = ()
    # (module, tensor name) of one tensor `vpt_fast.cast_frozen` stored in a low dtype, or None
    _cast_frozen_probe: Optional[tuple[nn.Module, str]] = None

    def train(self, mode: bool = True):
        """Released-code semantics: the frozen backbone stays in eval mode (no dropout or
        drop-path); the model itself, prompt dropout and the classifier head follow `mode`."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        nn.Module.train(self, False)
        self.training = mode
        for name in ("vpt",) + self._TRAINABLE_MODULES:
            module = getattr(self, name, None)
            if module is not None:
                module.train(mode)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's gradient checkpointing is `recompute="block"`: every block saves its input only and
        recomputes itself in backward, and `vpt_config.recompute` says "block" while it is on.
        Disabling it restores the policy in effect before it was enabled ("none" if it was "block")."""
        config = self.vpt_config
        if enable and config.recompute != "block":
            self._recompute_before_checkpointing = config.recompute
            self.vpt_config = dataclasses.replace(config, recompute="block")
        elif not enable and config.recompute == "block":
            restored = self.__dict__.pop("_recompute_before_checkpointing", "none")
            self.vpt_config = dataclasses.replace(config, recompute=restored)
        apply_block_settings(self)

    def prune_intermediate_layers(self, *args, **kwargs):
        raise NotImplementedError("prune_intermediate_layers is not supported on a prompted model: "
                                  "prune the timm model first, then call vpt_fast.prompt()")

    def set_input_size(self, *args, **kwargs) -> None:
        """timm's `set_input_size`; parameters it creates (a resampled position embedding) stay
        frozen like the rest of the backbone."""
        before = {id(p) for p in self.parameters()}
        super().set_input_size(*args, **kwargs)
        for p in self.parameters():
            if id(p) not in before:
                p.requires_grad_(False)

    def _prompt_matchers(self, stage_suffix: Callable[[int], tuple[int, ...]]) -> list[tuple[str, tuple]]:
        """group_matcher entries (regex, suffix) placing each stage's prompts and projection in the
        layer group of the first block they enter; `stage_suffix(s)` is that block's suffix."""
        if self.vpt_config.deep:
            warnings.warn("a stage's deep prompts are one parameter, so layer-wise groups (layer decay) "
                          "give all of them the layer id of the stage's first block",
                          stacklevel=stacklevel_outside_libraries())
        if not self.vpt.per_stage:
            return [(r"^vpt\.", stage_suffix(0))]
        return [(rf"^vpt\.(?:prompts|proj)\.{s}(?:\.|$)", stage_suffix(s)) for s in range(len(self.vpt.prompts))]


def apply_block_settings(model: nn.Module) -> None:
    """Push the model's backend and recompute policy to every prompt-aware module; timm's
    `grad_checkpointing` flag says whether block recompute is on."""
    from vpt_fast.ops.mlp import is_fusable
    from vpt_fast.ops.swiglu import is_swiglu_mlp
    config = model.vpt_config
    recompute = config.recompute
    model.grad_checkpointing = recompute == "block"
    unfused = 0
    for module in model.modules():
        if getattr(module, "is_vpt_block", False):
            module.backend = config.backend
            module.recompute = recompute
            if hasattr(module, "mlp") and not (is_fusable(module.norm2, module.mlp) or is_swiglu_mlp(module.mlp)):
                unfused += 1
    if recompute == "mlp" and config.backend == "reference":
        warnings.warn('recompute="mlp" has no effect with backend="reference" (timm\'s own modules run and '
                      'autograd saves what they need); use a prompt-aware backend or recompute="block"',
                      stacklevel=stacklevel_outside_libraries())
    elif recompute == "mlp" and unfused:
        warnings.warn(f'recompute="mlp" applies to timm\'s standard Mlp, SwiGLU and GluMlp only: {unfused} '
                      f"block(s) with another MLP save their activations as with recompute=\"none\" (results are "
                      f"the same)", stacklevel=stacklevel_outside_libraries())


def mark_cast_frozen(model: nn.Module, module: nn.Module, name: str) -> None:
    """Record that `vpt_fast.cast_frozen` stored `module.<name>` (and the other frozen GEMM weights) in
    a low dtype: from now on `check_cast_frozen` guards every forward. A plain attribute holding the
    module, so not a submodule, not in `state_dict`, and copied along with the model."""
    model._cast_frozen_probe = (module, name)


def cast_frozen_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype `cast_frozen` stored the model's frozen GEMM weights in, or None when they are in the
    prompts' dtype (never cast, or stored in one dtype again by `model.float()` / `model.to(dtype)`)."""
    probe = getattr(model, "_cast_frozen_probe", None)
    if probe is None:
        return None
    dtype = getattr(*probe).dtype
    return None if dtype == model.vpt.stage_prompts(0).dtype else dtype


def check_cast_frozen(model: nn.Module, x: Tensor) -> None:
    """Refuse a forward of a model whose frozen GEMM weights `cast_frozen` stored in a low dtype
    outside autocast to that dtype: float32 activations would meet them in F.linear (a dtype error at
    best), or a fused op would read them in another precision than the one they were cast for."""
    if getattr(model, "_cast_frozen_probe", None) is None:
        return  # the common case: one attribute lookup
    dtype = cast_frozen_dtype(model)
    if dtype is None:
        return
    running = autocast_dtype(x.device)
    if running != dtype:
        now = "without autocast" if running is None else f"under autocast to {running}"
        raise RuntimeError(f"vpt_fast.cast_frozen stored this model's frozen weights in {dtype}: run it under "
                           f"torch.autocast({x.device.type!r}, dtype={dtype}) (called {now}), or store them in "
                           f"float32 again with model.float()")


def warn_ignored_dropout(model: nn.Module, keep: tuple[str, ...]) -> None:
    """The frozen backbone runs in eval mode (released code), so its dropout and drop-path never
    apply: say so once, when the model is prompted."""
    ignored = []
    for name, module in model.named_modules():
        if any(name == k or name.startswith(k + ".") for k in keep):
            continue
        from timm.layers import PatchDropout
        p = (getattr(module, "p", None) if isinstance(module, nn.Dropout) else
             getattr(module, "prob", None) if isinstance(module, PatchDropout) else getattr(module, "drop_prob", None))
        if isinstance(p, float) and p > 0:
            ignored.append(f"{name}={p}")
    if ignored:
        shown = ", ".join(ignored[:4]) + (f" and {len(ignored) - 4} more" if len(ignored) > 4 else "")
        warnings.warn(f"the prompted backbone stays in eval mode (as in the released VPT code), so its "
                      f"dropout/drop-path is ignored: {shown}", stacklevel=stacklevel_outside_libraries())


def install(model: nn.Module, cls: type, prompts: VisualPrompts, config: PromptConfig,
            swaps: list[tuple[nn.Module, str, nn.Module]], head_names: tuple[str, ...]) -> nn.Module:
    """Turn `model` into a `cls` instance, atomically.

    Args:
        model: the timm model, already validated.
        cls: the prompted subclass of `type(model)`.
        prompts: the new prompt module, already on the model's device and dtype.
        config: the validated configuration.
        swaps: (parent, child name, new module) for every block to replace.
        head_names: the top-level children that form the classifier head, in order; `vpt` is inserted
            before them so that the head's parameters stay last (timm's `get_clip_parameters`).
    """
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_children = [(parent, name, parent._modules[name]) for parent, name, _ in swaps]
    saved_order = dict(model._modules)
    saved_class = model.__class__
    saved_ckpt = getattr(model, "grad_checkpointing", None)
    # timm Swin keeps set_grad_checkpointing's flag on its stages, ViT on the model
    checkpointing = bool(saved_ckpt) or any(getattr(m, "grad_checkpointing", False) is True for m in model.modules())
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for parent, name, module in swaps:
            parent._modules[name] = module
        children = dict(model._modules)
        head = {name: children.pop(name) for name in head_names if name in children}
        model._modules.clear()
        model._modules.update(children)
        model._modules["vpt"] = prompts
        model._modules.update(head)
        model.vpt_config = config
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
        model.__class__ = cls
        if checkpointing:
            model.set_grad_checkpointing(True)
        apply_block_settings(model)
        model.train(model.training)
    except BaseException:
        model.__class__ = saved_class
        model._modules.clear()
        model._modules.update(saved_order)
        for parent, name, module in saved_children:
            parent._modules[name] = module
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.__dict__.pop("vpt_config", None)
        model.__dict__.pop("_recompute_before_checkpointing", None)
        if saved_ckpt is None:
            model.__dict__.pop("grad_checkpointing", None)
        else:
            model.grad_checkpointing = saved_ckpt
        raise
    return model


def check_unprompted(model: nn.Module) -> None:
    if isinstance(model, PromptedModel) or hasattr(model, "vpt"):
        raise ValueError("model is already prompted (it has a `vpt` module); create a fresh model")


def prompt_module(model: nn.Module, num_sets: list[int], widths: list[int], config: PromptConfig,
                  per_stage: bool) -> VisualPrompts:
    """Build the prompt parameters on the model's device and dtype (before the model changes)."""
    param = next(model.parameters(), None)
    if param is None:
        raise TypeError(f"{type(model).__name__} has no parameters")
    prompts = VisualPrompts(num_sets, config.num_prompts, widths, tuple(model.patch_embed.patch_size),
                            config.project, config.dropout, per_stage=per_stage)
    return prompts.to(device=param.device, dtype=param.dtype)
