"""torch.compile with inductor (C++ code generation on the CPU) on whole prompted models: a tiny ViT
and a tiny Swin, deep prompts, fp32. The compiled model gives eager's logits and eager's gradients of
the prompts and the head, and a second call with new images of the same shape does not recompile.

The "cuda" backend runs here too when the extension is built: its attention is a registered
torch.library op with a fake implementation, so inductor calls it as an external kernel (its CPU
twin on this machine).
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vpt_fast

BACKENDS = [b for b in ("torch", "cuda") if b in vpt_fast.available_backends()]
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32: inductor may reorder sums, nothing else differs


def tiny_vit() -> nn.Module:
    """2 blocks, 32px, patch 8 (16 patches + class token), width 32, 2 heads, 5 classes."""
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5)


def tiny_swin() -> nn.Module:
    """32px, patch 4, window 4: stage 0 is an 8x8 grid (4 windows, the second block shifted by 2), then
    patch merging and a 4x4 stage (1 window, no shift); width 16, 5 classes."""
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(2, 1), num_heads=(1, 2), num_classes=5)


def tiny_dinov3() -> nn.Module:
    """timm Eva with DINOv3's RoPE, 4 storage tokens and LayerScale."""
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5)


def prompted(factory, backend: str) -> nn.Module:
    torch.manual_seed(0)
    model = vpt_fast.prompt(factory(), num_prompts=3, deep=True, backend=backend)
    with torch.no_grad():  # random, not initial, trainable state
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def logits_and_grads(model: nn.Module, forward, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """Logits and the gradients of the cross-entropy loss for every trainable parameter."""
    logits = forward(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return (logits.detach(), *torch.autograd.grad(F.cross_entropy(logits, y), params))


def assert_compiled_equals_eager(model: nn.Module, batch: int = 2) -> None:
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)]
    y = torch.randint(0, 5, (batch,), generator=g)
    names = ["logits"] + [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("prompts" in n for n in names) and any(n.startswith("head") for n in names)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    logits_and_grads(model, compiled, images[0], y)  # compiles forward and backward
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in images:
            got = logits_and_grads(model, compiled, x, y)
            want = logits_and_grads(model, model, x, y)
            for name, a, b in zip(names, got, want):
                torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


# Inductor compiles every generated kernel with the C++ compiler (about 50 for the Swin forward and
# backward, a few seconds each): one backend per family in the quick selection, the other marked slow.
FAMILY_BACKENDS = [pytest.param(b, marks=[pytest.mark.slow] if b != "torch" else []) for b in BACKENDS]


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAMILY_BACKENDS)
def test_vit_inductor_equals_eager(backend):
    assert_compiled_equals_eager(prompted(tiny_vit, backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAMILY_BACKENDS)
def test_swin_inductor_equals_eager(backend):
    """Window maps, shift mask and relative-position bias are built inside the graph (inductor used
    to fail there on the window maps' modulo of negative numbers)."""
    assert_compiled_equals_eager(prompted(tiny_swin, backend))


@pytest.mark.slow
def test_eva_inductor_equals_eager():
    """The rotary embedding of the patch rows and the LayerScale vectors trace into one graph (torch
    backend: the other backends' ops are the ViT test's)."""
    assert_compiled_equals_eager(prompted(tiny_dinov3, "torch"))
