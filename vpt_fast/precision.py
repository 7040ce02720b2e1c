"""Frozen GEMM weights stored in autocast's low dtype (docs/design.md §4, issue 25 item 1).

Under `torch.autocast(dtype=torch.bfloat16)` every frozen `nn.Linear` and the patch embedding's
`nn.Conv2d` cast their float32 weight and bias to bf16 on every call: the GEMM never reads the float32
values. `cast_frozen(model, torch.bfloat16)` stores those tensors in bf16 once. The GEMMs then get the
same operands (autocast's cast of a bf16 tensor to bf16 is the tensor itself), the weights take half
the memory and the per-step casts are gone. Everything autocast does not cast stays as it is: norms,
LayerScale, position embeddings, class/register tokens, Swin's relative-position bias tables, rotary
buffers, the attention pool's latent, the prompts, the projection and the head.

Which tensors qualify is decided per tensor from the op that reads it, not from its name: the weight
and bias of a frozen backbone module whose forward is `nn.Linear`'s (`F.linear`) or `nn.Conv2d`'s
(`F.conv2d`), when autocast on the model's device casts that op to the dtype (asked of autocast itself
on a 1x1 tensor: `autocast_casts`), and timm `EvaAttention`'s `q_bias`, `k_bias` (buffer) and
`v_bias`, whose only use is their concatenation as the fused qkv GEMM's bias (timm's forward and the
prompt-aware blocks both). A prompted block reads these tensors only through `F.linear` (`ops/linear.py`,
`ops/mlp.py`, `ops/swiglu.py`), whose backward multiplies by `weight.to(dy.dtype)`: the same values.

After the cast, the model computes only under autocast to that dtype: its forward raises a
`RuntimeError` naming `cast_frozen` otherwise (`models/common.py::check_cast_frozen`), rather than
meet float32 activations with bf16 weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpt_fast import prompt_cache
from vpt_fast.backbone import frozen_tensors
from vpt_fast.models.common import cast_frozen_dtype, mark_cast_frozen
from vpt_fast.prompting import prompts_of

LOW_DTYPES = (torch.bfloat16, torch.float16)

# the modules whose forward is one autocast-listed op on (input, weight, bias), by exact type: a
# subclass may read its weight otherwise (timm's StdConv2d standardises it first)
_GEMM_MODULES = (nn.Linear, nn.Conv2d)


def autocast_casts(kind: type, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast to `dtype` on `device` runs `kind`'s op (F.linear for nn.Linear, F.conv2d for
    nn.Conv2d) in `dtype` with float32 operands: asked of autocast on a 1x1 input."""
    if not torch.amp.is_autocast_available(device.type):
        return False
    one = torch.ones(1, 1, 1, 1, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        out = F.linear(one[0, 0], one[0, 0]) if kind is nn.Linear else F.conv2d(one, one)
    return out.dtype == dtype


def _eva_qkv_biases(module: nn.Module) -> tuple[str, ...]:
    """timm EvaAttention's separate q/k/v biases: concatenated, they are the fused qkv GEMM's bias."""
    from timm.models.eva import EvaAttention
    if type(module) is EvaAttention and isinstance(module.qkv, nn.Linear) and module.q_bias is not None:
        return ("q_bias", "k_bias", "v_bias")
    return ()


def castable_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """{name: tensor} of what `cast_frozen(model, dtype)` stores in `dtype`, in `state_dict` order
    (names as `named_parameters` / `named_buffers` give them). Raises like `cast_frozen`."""
    prompts = prompts_of(model)
    if dtype not in LOW_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16 (an autocast dtype), got {dtype}")
    device = prompts.stage_prompts(0).device
    backbone = frozen_tensors(model)  # every tensor but the prompts, the projection and the classifier
    casts = {kind: autocast_casts(kind, device, dtype) for kind in _GEMM_MODULES}
    if not casts[nn.Linear]:
        raise ValueError(f"autocast to {dtype} on {device.type!r} does not run linear layers in {dtype}: "
                         f"nothing would read the cast weights as they are")
    chosen: set[str] = set()
    for prefix, module in model.named_modules():
        names: tuple[str, ...] = ()
        if type(module) in _GEMM_MODULES and casts[type(module)]:
            names = ("weight", "bias")
        names += _eva_qkv_biases(module)
        for name in names:
            full = f"{prefix}.{name}" if prefix else name
            if full in backbone and getattr(module, name) is not None:
                chosen.add(full)
    trainable = sorted(name for name in chosen if backbone[name].requires_grad)
    if trainable:
        raise ValueError(f"cast_frozen casts frozen tensors only, but {', '.join(trainable[:4])}"
                         f"{' and more' if len(trainable) > 4 else ''} require(s) grad (unfrozen by hand): "
                         f"freeze them or leave the model in float32")
    return {name: tensor for name, tensor in backbone.items() if name in chosen}


def cast_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store a prompted model's frozen GEMM weights in `dtype`, in place, and return the model: the
    tensors every use of which autocast casts to `dtype` anyway (see the module docstring and
    `castable_frozen`), so that under `torch.autocast(dtype=dtype)` logits and gradients are unchanged
    while those weights take half the memory and are not cast again on every step.

    After the cast the model must run under `torch.autocast(device_type, dtype=dtype)`: a forward
    without it (or under another dtype) raises RuntimeError. `model.float()` stores everything in
    float32 again (with the rounded values), after which it runs anywhere. Prompt files
    (`save_prompts` / `load_prompts`) and `PromptBank` work as before (the backbone weight signature
    accepts a dtype copy); the prompt K/V cache is dropped (its keys see the new storage anyway).

    Args:
        model: a prompted model (`vpt_fast.prompt`); its backbone tensors to cast must be frozen.
        dtype: `torch.bfloat16` or `torch.float16`, the dtype of the autocast the model will train
            and run under.
    Raises:
        ValueError: the model is not prompted; `dtype` is not bf16/fp16; autocast on the model's
            device does not cast linear layers to `dtype`; a tensor to cast requires grad; or the
            model was already cast to another dtype.
    """
    previous: Optional[torch.dtype] = cast_frozen_dtype(model) if hasattr(model, "vpt") else None
    tensors = castable_frozen(model, dtype)
    if previous is not None and previous != dtype:
        raise ValueError(f"the model's frozen weights are already stored in {previous} (cast_frozen): casting "
                         f"them to {dtype} would round twice; start from a float32 model")
    if not tensors:
        raise ValueError("the prompted model has no frozen linear or convolution weights to cast")
    owners = {}
    for prefix, module in model.named_modules():
        for name in list(module._parameters) + list(module._buffers):
            owners.setdefault(f"{prefix}.{name}" if prefix else name, (module, name))
    with torch.no_grad():
        for full, tensor in tensors.items():
            module, name = owners[full]
            if name in module._parameters:
                tensor.data = tensor.data.to(dtype)  # the same Parameter object, new storage
            else:
                setattr(module, name, tensor.to(dtype))
    mark_cast_frozen(model, *owners[next(iter(tensors))])
    prompt_cache.clear_caches(model)
    return model


__all__ = ["LOW_DTYPES", "autocast_casts", "cast_frozen", "castable_frozen"]
