"""Test helpers: tiny prompted timm models and their inputs, comparisons that say where the largest
difference is, and FlashAttention's tolerance rule (docs/design.md §5)."""
from __future__ import annotations

import os
from typing import Optional

import timm
import torch
from timm.models.swin_transformer import window_partition, window_reverse
from torch import Tensor, nn

import vpt_fast
from vpt_fast.backends.torch_impl import attention as torch_attention

# -- tiny prompted models and their inputs --------------------------------------------------

VIT_VARIANTS = {  # timm ViT options a prompted model must support, as create_model kwargs
    "cls_token": {},
    "registers": {"reg_tokens": 2},
    "avg_pool": {"class_token": False, "global_pool": "avg"},
    "registers_avg": {"reg_tokens": 3, "class_token": False, "global_pool": "avg"},
    "layerscale_qknorm": {"init_values": 0.5, "qk_norm": True},
    "odd_size_no_qkv_bias": {"img_size": 40, "qkv_bias": False},
}

SWIN_SIZES = {  # image size, window: 56px/7 -> 14x14 grid (4 windows, shifted) then 7x7 (1 window)
    "w7": (56, 7),
    "w12": (96, 12),       # 24x24 grid (4 windows, shifted), then 12x12
    "w7_padded": (40, 7),  # 10x10 grid padded to 14x14 (shifted), then 5x5 (window shrinks to 5)
    "w4": (32, 4),         # 8x8 grid (4 windows, shifted), then 4x4: small enough for the Triton interpreter
}


def tiny_vit(**overrides) -> nn.Module:
    """A 3-block timm ViT (32px, patch 8, width 48, 3 heads, 5 classes); `overrides` go to create_model."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    kwargs.update(overrides)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)


def tiny_swin(size: str = "w7", depths=(2, 2), num_heads=(2, 4), **kwargs) -> nn.Module:
    """A timm Swin of width 32 and 5 classes; `size` is a key of SWIN_SIZES (image size, window)."""
    img, window = SWIN_SIZES[size]
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img, window_size=window,
                             embed_dim=32, depths=depths, num_heads=num_heads, num_classes=5, **kwargs)


def randomize(model: nn.Module) -> nn.Module:
    """Random, not initial, trainable state (prompts, projection, head): N(0, 0.5) in place."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def prompted_vit(seed: int = 0, variant: str = "cls_token", **prompt_kwargs) -> nn.Module:
    """`tiny_vit` with the VIT_VARIANTS options of `variant`, prompted with `prompt_kwargs`, randomized."""
    torch.manual_seed(seed)
    return randomize(vpt_fast.prompt(tiny_vit(**VIT_VARIANTS[variant]), **prompt_kwargs))


def prompted_swin(seed: int = 0, size: str = "w7", depths=(2, 2), num_heads=(2, 4), **prompt_kwargs) -> nn.Module:
    """`tiny_swin`, prompted with `prompt_kwargs` (5 prompts unless given), randomized."""
    torch.manual_seed(seed)
    return randomize(vpt_fast.prompt(tiny_swin(size, depths, num_heads), **{"num_prompts": 5, **prompt_kwargs}))


def random_batch(model: nn.Module, batch: int = 3, seed: int = 2) -> tuple[Tensor, Tensor]:
    """Images of the model's size and class labels, from their own generator, on the model's device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *model.patch_embed.img_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    device = next(model.parameters()).device
    return x.to(device), y.to(device)


# -- comparisons ------------------------------------------------------------------------------


def max_error(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def _where(actual: Tensor, expected: Tensor) -> str:
    diff = (actual.detach().double() - expected.detach().double()).abs()
    flat = torch.nan_to_num(diff, nan=float("inf")).reshape(-1).argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return (f"max abs error {diff.reshape(-1)[flat].item():.3e} at index {idx} of shape "
            f"{tuple(diff.shape)}: actual {actual.detach().reshape(-1)[flat].item():.6g}, "
            f"expected {expected.detach().reshape(-1)[flat].item():.6g}")


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-5, rtol: float = 1e-5,
                 name: str = "tensor") -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere; on failure report the worst spot."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())  # NaN counts as bad
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance "
                             f"(atol={atol:g}, rtol={rtol:g}); {_where(actual, expected)}")


def assert_flash_rule(actual: Tensor, reference: Tensor, baseline: Tensor, name: str = "tensor",
                      factor: float = 2.0, atol: float = 1e-5) -> None:
    """FlashAttention's rule: err(actual) <= factor * err(baseline) + atol, both against the high
    precision `reference`; `baseline` is the eager PyTorch result in the same low precision."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    err, base = max_error(actual, reference), max_error(baseline, reference)
    if not err <= factor * base + atol:  # NaN fails
        raise AssertionError(f"{name}: error {err:.3e} > {factor:g} x baseline error {base:.3e} + "
                             f"{atol:g}; {_where(actual, reference)}")


def rel_error(actual: Tensor, expected: Tensor, eps: Optional[float] = 1e-12) -> float:
    """max |actual - expected| / max |expected|."""
    return max_error(actual, expected) / max(expected.detach().double().abs().max().item(), eps)


def training_results(model, backend: str, x: Tensor, y: Tensor, seed: int = 1):
    """Logits and the gradients of every trainable parameter after one cross-entropy backward,
    with the model switched to `backend` and the RNG seeded (same prompt-dropout masks for all)."""
    import torch.nn.functional as F

    import vpt_fast
    vpt_fast.set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_matches_reference(model, backends, x: Tensor, y: Tensor, tol: float = 1e-4) -> None:
    """Every backend's logits and trainable gradients within `tol` (relative) of the reference."""
    ref_logits, ref_grads = training_results(model, "reference", x, y)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())
    for backend in backends:
        logits, grads = training_results(model, backend, x, y)
        assert rel_error(logits, ref_logits) < tol, f"{backend}: logits"
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            assert rel_error(grad, ref_grads[name]) < tol, f"{backend}: grad of {name}"


def eager_attention_low_precision(q, k, v, pk, pv, bias, dout, scale):
    """timm-style eager attention on the concatenated keys in the inputs' dtype, with autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pk_, pv_ = (None, None) if pk is None else (t.detach().clone().requires_grad_() for t in (pk, pv))
    kk, vv = torch_attention._joint_kv(k, v, pk_, pv_)
    s = (q * scale) @ kk.transpose(-1, -2)
    mask = torch_attention._joint_bias(bias, q.shape[0], 0 if pk is None else pk.shape[2])
    if mask is not None:
        s = s + mask.to(s.dtype)
    out = s.softmax(-1) @ vv
    leaves = [q, k, v] + ([] if pk is None else [pk_, pv_])
    grads = torch.autograd.grad(out, leaves, dout)
    return out, list(grads) + ([None, None] if pk is None else [])


def rule_factor(backend: str) -> float:
    """FlashAttention's 2x. Triton's CPU interpreter truncates when it casts to bf16/fp16 (round toward
    zero: up to 1 ulp per cast where a GPU rounds to nearest, 1/2 ulp), which doubles the per-cast error
    bound: the factor doubles with it there. On a GPU (the gpu-marked tests) it is 2."""
    return 4.0 if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else 2.0


def low_precision_results(model, backend: str, x: Tensor, y: Tensor, device_type: str,
                          dtype: torch.dtype = torch.bfloat16, fp32: bool = True):
    """{name: tensor} of the logits and every trainable gradient, four times: the reference backend in
    fp32, `backend` in fp32 (None unless `fp32`), the reference under `dtype` autocast (eager
    release-style VPT: the rule's baseline) and `backend` under it."""
    def result(name: str, precision: torch.dtype) -> dict[str, Tensor]:
        with torch.autocast(device_type, dtype=precision, enabled=precision != torch.float32):
            logits, grads = training_results(model, name, x, y)
        return {"logits": logits.float(), **{n: g.float() for n, g in grads.items()}}

    reference = result("reference", torch.float32)
    in_fp32 = result(backend, torch.float32) if fp32 else None
    return reference, in_fp32, result("reference", dtype), result(backend, dtype)


def assert_follows_reference_in_low_precision(model, backend: str, x: Tensor, y: Tensor, device_type: str,
                                              fp32_tol: Optional[float] = 1e-4,
                                              dtype: torch.dtype = torch.bfloat16) -> None:
    """Logits and every trainable gradient of `backend`: in fp32 within `fp32_tol` (relative) of the
    reference backend; under `dtype` autocast, FlashAttention's rule against that fp32 reference —
    at most 2x the error of eager release-style VPT under the same autocast, plus one `dtype` ulp at
    the tensor's scale (small tensors such as the head's are otherwise rounding-noise bound)."""
    reference, in_fp32, baseline, got = low_precision_results(model, backend, x, y, device_type, dtype,
                                                              fp32=fp32_tol is not None)
    for name, t in (in_fp32 or {}).items():
        assert rel_error(t, reference[name]) < fp32_tol, f"{backend} fp32 {name}"
    ulp = torch.finfo(dtype).eps
    for name, t in got.items():
        ref = reference[name]
        assert_flash_rule(t, ref, baseline[name], name=f"{backend} {dtype} {name}", factor=rule_factor(backend),
                          atol=ulp * ref.abs().max().item())


# -- independent transcriptions of the released VPT code (KMnP/vpt) on timm's unmodified models --

def released_vit_logits(backbone, prompts, proj, deep: bool, x):
    """The released VPT ViT forward, written out independently of vpt_fast's code on timm's own blocks:
    `incorporate_prompt` puts the (projected) prompt set 0 after the prefix tokens; in VPT-Deep,
    `forward_deep_prompt` overwrites those P rows with set i before block i > 0; the prompt rows are
    dropped before timm's final norm and head."""
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(x))))
    prefix, num_prompts = backbone.num_prefix_tokens, prompts.shape[1]

    def prompt_rows(i):
        rows = prompts[i] if proj is None else proj(prompts[i])
        return rows.expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :prefix], prompt_rows(0), x[:, prefix:]], dim=1)
    for i, block in enumerate(backbone.blocks):
        if deep and i > 0:
            x = torch.cat([x[:, :prefix], prompt_rows(i), x[:, prefix + num_prompts:]], dim=1)
        x = block(x)
    x = torch.cat([x[:, :prefix], x[:, prefix + num_prompts:]], dim=1)
    return backbone.forward_head(backbone.norm(x))


# Swin: a literal transcription of the released per-window code (PromptedSwinTransformer).
# It works on (B, P + H*W, C) rows with prompts first, attaches prompts to windows in its own batch
# order and needs every resolution to be a multiple of the window (no padding).

def released_window_attention(attn, x, mask, num_prompts):
    b_, n, c = x.shape
    qkv = attn.qkv(x).reshape(b_, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * attn.scale
    scores = q @ k.transpose(-2, -1)
    rpb = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(
        attn.window_area, attn.window_area, -1).permute(2, 0, 1).contiguous()
    heads, wa, _ = rpb.shape
    rpb = torch.cat((torch.zeros(heads, num_prompts, wa), rpb), dim=1)
    rpb = torch.cat((torch.zeros(heads, wa + num_prompts, num_prompts), rpb), dim=-1)
    scores = scores + rpb.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        mask = torch.cat((torch.zeros(nw, num_prompts, wa), mask), dim=1)
        mask = torch.cat((torch.zeros(nw, wa + num_prompts, num_prompts), mask), dim=-1)
        scores = scores.view(b_ // nw, nw, attn.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, attn.num_heads, n, n)
    scores = scores.softmax(-1)
    return attn.proj((scores @ v).transpose(1, 2).reshape(b_, n, c))


def released_block(blk, x, num_prompts, height, width):
    batch, _, c = x.shape
    ws, shift = blk.window_size[0], blk.shift_size[0]
    shortcut = x
    x = blk.norm1(x)
    prompt_emb, x = x[:, :num_prompts, :], x[:, num_prompts:, :]
    x = x.view(batch, height, width, c)
    shifted_x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)) if shift > 0 else x
    x_windows = window_partition(shifted_x, (ws, ws)).view(-1, ws * ws, c)
    num_windows = x_windows.shape[0] // batch
    prompt_emb = prompt_emb.unsqueeze(0).expand(num_windows, -1, -1, -1).reshape(-1, num_prompts, c)
    x_windows = torch.cat((prompt_emb, x_windows), dim=1)
    attn_windows = released_window_attention(blk.attn, x_windows, blk.attn_mask, num_prompts)
    prompt_emb = attn_windows[:, :num_prompts, :].view(-1, batch, num_prompts, c).mean(0)
    attn_windows = attn_windows[:, num_prompts:, :].view(-1, ws, ws, c)
    shifted_x = window_reverse(attn_windows, (ws, ws), height, width)
    x = torch.roll(shifted_x, shifts=(shift, shift), dims=(1, 2)) if shift > 0 else shifted_x
    x = torch.cat((prompt_emb, x.reshape(batch, height * width, c)), dim=1)
    x = shortcut + x
    return x + blk.mlp(blk.norm2(x))


def released_merging(merging, x, num_prompts, height, width):
    batch, _, c = x.shape
    prompt_emb, x = x[:, :num_prompts, :], x[:, num_prompts:, :]
    prompt_emb = torch.cat((prompt_emb, prompt_emb, prompt_emb, prompt_emb), dim=-1)
    x = x.view(batch, height, width, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    x = torch.cat((prompt_emb, x.view(batch, -1, 4 * c)), dim=1)
    return merging.reduction(merging.norm(x))


def released_swin_logits(timm_model, prompt_sets, deep, images):
    num_prompts = prompt_sets[0].shape[1]
    x = timm_model.patch_embed(images)
    batch, height, width, c = x.shape
    x = torch.cat((prompt_sets[0][0].expand(batch, -1, -1), x.reshape(batch, height * width, c)), dim=1)
    for s, stage in enumerate(timm_model.layers):
        if s > 0:
            x = released_merging(stage.downsample, x, num_prompts, height, width)
            height, width = height // 2, width // 2
        for i, blk in enumerate(stage.blocks):
            if deep and (s, i) != (0, 0):
                x = torch.cat((prompt_sets[s][i].expand(batch, -1, -1), x[:, num_prompts:, :]), dim=1)
            x = released_block(blk, x, num_prompts, height, width)
    x = timm_model.norm(x).mean(1)
    return timm_model.head.fc(x)
