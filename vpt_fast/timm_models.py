"""timm registry entries `vpt_<name>` for every timm ViT and Swin model that `vpt_fast.prompt` accepts
(docs/design.md §4).

    vpt_fast.register_timm()
    model = timm.create_model("vpt_vit_base_patch16_224.augreg_in21k", pretrained=True,
                              num_classes=100, num_prompts=50, deep=True)

An entry builds the base timm model with every keyword that is not one of `prompt()`'s (pretrained
weights, `num_classes`, `img_size`, ...), then calls `vpt_fast.prompt` with the rest. Its pretrained
configurations are the base model's own (same objects, same tags, same weights), so timm resolves
tags, input size, mean/std and weight downloads exactly as for the base model, and scripts that take a
`--model` name (timm's `train.py`) train prompted models with `--model-kwargs num_prompts=50`.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vpt_fast.models.families import registry_modules

PREFIX = "vpt_"
# timm modules whose models are candidates (the family table's); only those prompt() accepts are registered
BASE_MODULES = registry_modules()
# prompt() checks every block alike, so its verdict does not depend on depth: a candidate is built with
# one block (per stage) when its entrypoint takes one of these arguments, else at full size
_SHALLOW = ({"depth": 1}, {"depths": (1, 1, 1, 1)}, {})
_verdicts: dict[str, bool] = {}  # base name -> accepted, once per process

__all__ = ["register_timm"]


def _prompt_kwargs() -> tuple[str, ...]:
    from vpt_fast.prompting import prompt
    return tuple(name for name in inspect.signature(prompt).parameters if name != "model")


class _NoRandomInit(TorchFunctionMode):
    """Skips the random initialisation of meta tensors: they hold no values, and torch runs these ops
    on the meta device through Python decompositions (`normal_` ~30 ms a call), which was most of the
    time spent building a model there."""

    _OPS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.erfinv_, torch.Tensor.clamp_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._OPS and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def prompt_accepts(base: str) -> bool:
    """Whether `vpt_fast.prompt` accepts the timm model named `base`: the model is built on the meta
    device (no memory, no weights) and prompted there; the verdict is kept for the process."""
    if base not in _verdicts:
        _verdicts[base] = _build_and_prompt(base)
    return _verdicts[base]


def _build_and_prompt(base: str) -> bool:
    from timm.models import model_entrypoint

    from vpt_fast.prompting import prompt
    with warnings.catch_warnings(), torch.device("meta"), _NoRandomInit():
        warnings.simplefilter("ignore")  # dropout and deprecation notices of models nobody asked for
        for kwargs in _SHALLOW:
            try:
                model = model_entrypoint(base)(pretrained=False, **kwargs)
                break
            except Exception:
                if not kwargs:
                    return False  # cannot be built at all
        try:
            prompt(model, num_prompts=1, backend="reference")
        except Exception:
            return False
    return True


def _entrypoint(base: str, prompt_kwargs: tuple[str, ...]) -> Callable[..., nn.Module]:
    """A timm entrypoint named `vpt_<base>`: the base entrypoint without the prompt keywords, then
    `prompt()` with them."""
    from timm.models import model_entrypoint

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from vpt_fast.prompting import prompt
        prompting = {name: kwargs.pop(name) for name in prompt_kwargs if name in kwargs}
        model = prompt(model_entrypoint(base)(pretrained=pretrained, **kwargs), **prompting)
        # what rebuilds a model from its config (a Hub push's config.json) must rebuild the prompted one
        for attr in ("pretrained_cfg", "default_cfg"):
            if isinstance(getattr(model, attr, None), dict):
                setattr(model, attr, {**getattr(model, attr), "architecture": PREFIX + base})
        return model

    create.__name__ = create.__qualname__ = PREFIX + base
    create.__module__ = __name__
    create.__doc__ = f"timm `{base}` with Visual Prompt Tuning; keywords {prompt_kwargs} go to vpt_fast.prompt."
    create.vpt_base = base  # marks the entry as ours (register_timm is idempotent)
    return create


def _alias_pretrained_cfgs(registry: Any, base: str, name: str) -> None:
    """Give `name` the base model's pretrained configurations under the same tags (`name.<tag>`).
    timm has no public call for this; these are the tables `register_model` fills from a module's
    `default_cfgs`."""
    if base in registry._model_default_cfgs:
        registry._model_default_cfgs[name] = registry._model_default_cfgs[base]
    tagged = registry._model_with_tags.get(base, [])
    registry._model_with_tags[name] = [PREFIX + t for t in tagged]
    for base_name in {base, *tagged}:
        if base_name in registry._model_pretrained_cfgs:
            registry._model_pretrained_cfgs[PREFIX + base_name] = registry._model_pretrained_cfgs[base_name]
        if base_name in registry._model_has_pretrained:
            registry._model_has_pretrained.add(PREFIX + base_name)


def register_timm() -> list[str]:
    """Register `vpt_<name>` in timm's model registry for every timm model whose entrypoint lives in
    `timm.models.vision_transformer`, `vision_transformer_hybrid`, `deit`, `swin_transformer` or `eva`
    (deprecated aliases excluded) and that `vpt_fast.prompt` accepts. Models it refuses (distilled DeiT,
    attention pooling, RmsNorm or other block types, ...) get no name. Whether it accepts one is decided
    by building the model on the meta device and prompting it, once per model and process: the first
    call takes a few seconds (timm 1.0.31: 157 of 267 candidates accepted in 4-5 s of CPU time, ~2 s
    of it for the 14 hybrid ViTs, whose ResNet stem runs a forward pass when built), later calls are
    instant.
    Idempotent: names registered by an earlier call are kept; models timm gained since are added.

    Model keywords `num_prompts`, `deep`, `dropout`, `project`, `backend`, `recompute` go to
    `vpt_fast.prompt`; all others to the base model.

    Returns:
        The `vpt_` names added by this call (empty when everything was registered already).
    """
    import sys

    import timm
    from timm.models import _registry as registry
    from timm.models import register_model

    tables = ("_model_entrypoints", "_model_default_cfgs", "_model_with_tags", "_model_pretrained_cfgs",
              "_model_has_pretrained")
    absent = [table for table in tables if not hasattr(registry, table)]
    if absent:
        raise RuntimeError(f"timm {timm.__version__} has no registry tables {absent}; vpt_fast.register_timm "
                           f"is written against the registry of timm 1.0")
    prompt_kwargs = _prompt_kwargs()
    module = sys.modules[__name__]
    added = []
    for base in timm.list_models(module=list(BASE_MODULES)):
        name = PREFIX + base
        existing = registry._model_entrypoints.get(name)
        if existing is not None:
            if getattr(existing, "vpt_base", None) != base:
                raise RuntimeError(f"timm already has a model named {name!r} that is not vpt_fast's "
                                   f"(from {existing.__module__}); refusing to overwrite it")
            continue
        if not prompt_accepts(base):
            continue
        fn = _entrypoint(base, prompt_kwargs)
        setattr(module, name, fn)  # timm lists entrypoints in the module's __all__; keep them resolvable
        register_model(fn)
        _alias_pretrained_cfgs(registry, base, name)
        added.append(name)
    return added
