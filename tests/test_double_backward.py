"""Second-order gradients through the prompt-aware backends raise instead of being silently wrong.

The frozen-backbone ops (`vpt_fast/ops/`) have hand-written backwards that are not themselves
differentiable (under create_graph=True their backward math would be recorded, but not correctly
for a second derivative), so every one is `once_differentiable`: the first gradient works, a
backward through it raises."""
import pytest
import timm
import torch

import vpt_fast


def tiny_prompted_vit(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=5)
    return vpt_fast.prompt(model, num_prompts=4, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_double_backward_raises(backend):
    if backend not in vpt_fast.available_backends():
        pytest.skip(f"backend {backend!r} not available here")
    model = tiny_prompted_vit(backend)
    prompts = model.vpt.prompts
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = model(images).logsumexp(-1).sum()
    (grad,) = torch.autograd.grad(loss, prompts, create_graph=True)
    assert grad.shape == prompts.shape and grad.abs().sum() > 0  # first order still works
    penalty = grad.square().sum()
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        penalty.backward(retain_graph=True)
    # autograd.grad checks reachability first: the once_differentiable outputs are cut from the graph
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(penalty, prompts)

