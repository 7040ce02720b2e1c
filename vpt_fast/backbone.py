"""What a prompted model's frozen backbone is, for prompt files and `PromptBank` (docs/design.md §4, §8).

Prompts and a head are trained for one function: a backbone's configuration (how the head reads the
tokens), its structure (module types and the settings that change what they compute: norm eps,
activation, qk-norm, heads, window sizes, image size, ...) and its frozen weights. Anywhere else their
logits are not the ones they were trained for, silently. This module describes the three so that
`save_prompts` can record them and `load_prompts` / `PromptBank.add` can refuse a mismatch, naming it.

- `configuration(model)`: the readable fields that decide what the prompts and head mean (family,
  pool, fc_norm, class/register tokens, norm_pre) and the geometry (image size, Swin windows).
- `structure(model)`: every backbone module's type and function-changing settings.
- `weights_signature(model)`: per frozen tensor, its shape, L1 norm and 8 sampled values: cheap,
  cached per model, device-independent, and equal within tolerance for dtype copies of the same
  weights (a bf16 or fp16 copy passes; any other weights fail by far more than the tolerance).
"""
from __future__ import annotations

import enum
import json
import math
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vpt_fast.fsdp import full_tensor, unwrapped_class
from vpt_fast.models.families import family_of
from vpt_fast.prompt_cache import optimizer_steps, parameter_key

# Modules that are the identity in eval mode, where the frozen backbone always runs.
_EVAL_IDENTITY = ("Identity", "Dropout", "DropPath", "PatchDropout")
# Attributes that do not change what a module computes in eval mode (kernel choice, training flags,
# vpt_fast's own backend settings, the classifier's size, documentation).
_NON_FUNCTIONAL = frozenset({
    "training", "fused_attn", "backend", "recompute", "grad_checkpointing", "num_classes", "feature_info",
    "weight_init_mode", "fix_init", "p", "inplace", "drop_prob", "scale_by_keep", "is_vpt_block",
    "pretrained_cfg", "default_cfg",
})
# Configuration fields a file may be checked against even with `check_backbone=False`: they decide
# what the prompts and the head mean, not only which backbone computes them.
HEAD_FIELDS = ("global_pool", "fc_norm", "class_token", "reg_tokens", "norm_pre")
GEOMETRY_FIELDS = ("img_size", "window_size")

_SAMPLES = 8
_SUM_RTOL = 5e-3      # bf16's unit roundoff is 2^-8: a bf16 copy changes an L1 norm by at most 0.4%
_SAMPLE_RTOL = 5e-3
_SAMPLE_ATOL = 1e-3   # of the tensor's mean |value|
_FP16_SPACING = 2.0 ** -24  # fp16's subnormal spacing: tiny values (timm's 1e-6 class token init) round by it


def _is_backbone(name: str, classifier_names: set[str]) -> bool:
    top = name.split(".", 1)[0]
    return top != "vpt" and name not in classifier_names and not any(name.startswith(c + ".")
                                                                     for c in classifier_names)


def _classifier_names(model: nn.Module) -> set[str]:
    """The trainable head's module names (with `head_drop`, a dropout that follows train())."""
    classifier = model.get_classifier()
    names = {name for name, module in model.named_modules() if module is classifier}
    return names | ({"head_drop"} if hasattr(model, "head_drop") else set())


def frozen_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of the backbone: all but the prompts (`vpt.`) and the classifier."""
    heads = _classifier_names(model)
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    return {name: t for name, t in named.items() if _is_backbone(name, heads)}


def _plain(value: Any) -> Any:
    """`value` as JSON data when it is a setting (a number, string, bool or a tuple of those), else None."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, enum.Enum):  # timm's Format
        return _plain(value.value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return None


def structure(model: nn.Module) -> list[list]:
    """[name, type, {setting: value}] for every backbone module (the root's own settings under ''),
    with modules that are the identity in eval mode (dropout, drop-path) shown as `Identity`."""
    heads = _classifier_names(model)
    described = []
    for name, module in model.named_modules():
        if name and not _is_backbone(name, heads):
            continue
        kind = unwrapped_class(module).__name__  # a module under fully_shard is its own class
        if kind in _EVAL_IDENTITY:
            described.append([name, "Identity", {}])
            continue
        settings = {}
        for key, value in vars(module).items():
            if key.startswith("_") or key in _NON_FUNCTIONAL:
                continue
            plain = _plain(value)
            if plain is not None or value is None:
                settings[key] = plain
        described.append([name, "" if not name else kind, settings])
    return described


def structure_difference(theirs: list, mine: list, what: tuple[str, str]) -> Optional[str]:
    """The first difference between two `structure`s, in words (None when equal); `what` names the
    two sides, e.g. ("the file's", "the model's")."""
    a, b = {entry[0]: entry for entry in theirs}, {entry[0]: entry for entry in mine}
    for name in list(a) + [n for n in b if n not in a]:
        label = name or "the model itself"
        if name not in b:
            return f"{label} ({a[name][1]}) is in {what[0]} backbone only"
        if name not in a:
            return f"{label} ({b[name][1]}) is in {what[1]} backbone only"
        (_, kind_a, set_a), (_, kind_b, set_b) = a[name], b[name]
        if kind_a != kind_b:
            return f"{label} is {kind_a} in {what[0]} backbone, {kind_b} in {what[1]}"
        for key in list(set_a) + [k for k in set_b if k not in set_a]:
            if set_a.get(key, "<unset>") != set_b.get(key, "<unset>"):
                return (f"{label}.{key} is {set_a.get(key, '<unset>')!r} in {what[0]} backbone, "
                        f"{set_b.get(key, '<unset>')!r} in {what[1]}")
    return None


def configuration(model: nn.Module) -> dict[str, str]:
    """The configuration fields a prompt file records (as strings), see HEAD_FIELDS and GEOMETRY_FIELDS."""
    fields = {"global_pool": str(model.global_pool)}
    if not family_of(model).staged:  # ViT, Eva
        fields.update(fc_norm=str(not isinstance(model.fc_norm, nn.Identity)),
                      class_token=str(getattr(model, "cls_token", None) is not None),
                      reg_tokens=str(int(getattr(model, "num_reg_tokens", 0))),
                      norm_pre=str(not isinstance(model.norm_pre, nn.Identity)))
    else:  # Swin
        fields["window_size"] = str([list(stage.blocks[0].window_size) for stage in model.layers])
    img_size = getattr(model.patch_embed, "img_size", None)
    fields["img_size"] = str(None if img_size is None else tuple(img_size))
    return fields


_signatures: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def weights_signature(model: nn.Module) -> Optional[dict[str, list]]:
    """{tensor name: [shape, L1 norm, sampled values]} for every frozen tensor (`frozen_tensors`),
    or None for a model on the meta device. Computed once per model and weights (cached, keyed by
    the tensors' storage and version), with one device-to-host copy. Sharded (FSDP2) tensors are
    gathered one at a time: then it is a collective, every rank must call it."""
    tensors = frozen_tensors(model)
    if any(t.is_meta for t in tensors.values()):
        return None
    key = (parameter_key(tensors.values()), optimizer_steps())
    hit = _signatures.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    pieces, layout = [], []
    with torch.no_grad():
        for name, t in tensors.items():
            flat = full_tensor(t.detach()).reshape(-1)
            # the norm is returned in the input's dtype: bf16/fp16/integers are summed as fp32
            flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.to(torch.float32)
            index = torch.linspace(0, max(flat.numel() - 1, 0), min(_SAMPLES, flat.numel()),
                                   device=flat.device).round().long()
            l1 = torch.linalg.vector_norm(flat, 1).float()  # no |x| temporary
            pieces.append(torch.cat([l1.reshape(1), flat[index].float()]))
            layout.append((name, list(t.shape), index.numel()))
        values = torch.cat([p.to(pieces[0].device) for p in pieces]).cpu().tolist() if pieces else []
    signature, at = {}, 0
    for name, shape, count in layout:
        samples = values[at + 1:at + 1 + count]
        signature[name] = [shape, float(f"{values[at]:.9g}"), [float(f"{v:.9g}") for v in samples]]
        at += 1 + count
    _signatures[model] = (key, signature)
    return signature


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + atol


def weights_difference(theirs: dict, mine: dict, what: tuple[str, str]) -> Optional[str]:
    """The first tensor whose `weights_signature` entries differ beyond a dtype copy's rounding, in
    words (None when the weights are the same); `what` names the two sides."""
    for name in list(theirs) + [n for n in mine if n not in theirs]:
        if name not in mine:
            return f"{name} is in {what[0]} backbone only"
        if name not in theirs:
            return f"{name} is in {what[1]} backbone only"
        (shape_a, sum_a, samples_a), (shape_b, sum_b, samples_b) = theirs[name], mine[name]
        if list(shape_a) != list(shape_b):
            return f"{name} has shape {tuple(shape_a)} in {what[0]} backbone, {tuple(shape_b)} in {what[1]}"
        count = max(1, math.prod(shape_a))
        scale = max(abs(sum_a), abs(sum_b)) / count
        same_sum = _close(sum_a, sum_b, _SUM_RTOL, _FP16_SPACING / 2 * count)
        same_samples = len(samples_a) == len(samples_b) and all(
            _close(x, y, _SAMPLE_RTOL, _SAMPLE_ATOL * scale + _FP16_SPACING) for x, y in zip(samples_a, samples_b))
        if not (same_sum and same_samples):
            return f"{name} holds other values in {what[0]} backbone than in {what[1]}"
    return None


def exact_weights_difference(theirs: nn.Module, mine: nn.Module) -> Optional[str]:
    """The first frozen tensor (parameter or buffer) of two models that differs in name, shape or value,
    compared exactly in `mine`'s dtype and device, both directions (None when all are equal)."""
    a, b = frozen_tensors(theirs), frozen_tensors(mine)
    for name in list(a) + [n for n in b if n not in a]:
        if name not in b:
            return f"{name} is in the task's backbone only"
        if name not in a:
            return f"{name} is in the bank's backbone only"
        x, y = a[name], b[name]
        if x is y:
            continue
        if x.shape != y.shape:
            return f"{name} has shape {tuple(x.shape)} in the task's backbone, {tuple(y.shape)} in the bank's"
        if not torch.equal(x.detach().to(y.device, y.dtype), y.detach()):
            return f"{name} holds other values in the task's backbone than in the bank's"
    return None


def dumps(value: Any) -> str:
    """Compact JSON for safetensors metadata (str -> str)."""
    return json.dumps(value, separators=(",", ":"))
