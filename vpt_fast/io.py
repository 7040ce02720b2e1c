"""Prompt checkpoints: the trainable state of a prompted model (DESIGN.md §4), as safetensors with
metadata that identifies the configuration it was trained for."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor, nn

from vpt_fast.prompting import _prompted

_FORMAT = "vpt_fast.prompts/1"


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    named = dict(_prompted(model).state_tensors())
    for name, p in model.get_classifier().named_parameters():
        named[f"head.{name}"] = p
    return named


def prompt_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable state: {"prompts": (Lp, P, dim)}, "proj.weight"/"proj.bias" if projected,
    and "head.weight"/"head.bias" (detached copies)."""
    return {name: t.detach().clone() for name, t in _named_tensors(model).items()}


def load_prompt_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a `prompt_state_dict`, strictly: missing, unexpected or mis-shaped entries raise
    ValueError and leave the model unchanged."""
    named = _named_tensors(model)
    missing = sorted(set(named) - set(state))
    unexpected = sorted(set(state) - set(named))
    if missing or unexpected:
        raise ValueError(f"prompt state does not match the model: missing {missing}, unexpected {unexpected}")
    for name, target in named.items():
        if tuple(state[name].shape) != tuple(target.shape):
            raise ValueError(f"prompt state {name!r} has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(target.shape)}")
    with torch.no_grad():
        for name, target in named.items():
            target.copy_(state[name])


def metadata(model: nn.Module) -> dict[str, str]:
    from vpt_fast import __version__
    _prompted(model)
    config = model.vpt_config
    depth = len(model.blocks) if hasattr(model, "blocks") else [len(s.blocks) for s in model.layers]
    return {
        "format": _FORMAT,
        "model_family": type(model).__name__,
        "embed_dim": str(model.embed_dim),
        "depth": str(depth),
        "num_prompts": str(config.num_prompts),
        "deep": str(config.deep),
        "project": str(config.project),
        "num_classes": str(model.num_classes),
        "vpt_fast_version": __version__,
    }


def save_prompts(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the trainable state and its metadata to a .safetensors file."""
    from safetensors.torch import save_file
    tensors = {name: t.contiguous() for name, t in prompt_state_dict(model).items()}
    save_file(tensors, os.fspath(path), metadata=metadata(model))


def load_prompts(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a file written by `save_prompts`. A checkpoint made for another configuration (family,
    width, depth, prompts, deep/shallow, projection, classes) raises ValueError naming the
    differences, and the model is left unchanged."""
    from safetensors import safe_open
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {name: f.get_tensor(name) for name in f.keys()}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a vpt_fast prompt checkpoint (format {meta.get('format')!r})")
    expected = metadata(model)
    diffs = {k: (meta.get(k), v) for k, v in expected.items()
             if k not in ("vpt_fast_version", "format") and meta.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"checkpoint {os.fspath(path)} was made for another configuration ({detail})")
    load_prompt_state_dict(model, state)

