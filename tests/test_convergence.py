"""VPT learns: a tiny frozen random ViT whose prompts and head train on a synthetic task (which colour
channel holds a bright square placed anywhere in the image) gets its loss far below chance, and
every prompt-aware backend follows the reference backend's loss curve step by step (fp32, same
batches, same updates)."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vpt_fast

IMG, SQUARE, CLASSES = 16, 4, 3
STEPS, BATCH, LR = 200, 32, 0.03
TRITON_STEPS = 3  # the Triton interpreter takes seconds per step, not milliseconds
CURVE_TOL = 1e-5  # relative, per step
CHANCE = math.log(CLASSES)


def colour_task(num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noise images with a bright SQUARE x SQUARE patch at a random spot in one colour channel; the
    label is that channel."""
    x = 0.3 * torch.randn(num, 3, IMG, IMG, generator=generator)
    y = torch.randint(0, CLASSES, (num,), generator=generator)
    top, left = torch.randint(0, IMG - SQUARE + 1, (2, num, 1), generator=generator)
    pixels = torch.arange(IMG)
    rows = (pixels >= top) & (pixels < top + SQUARE)
    cols = (pixels >= left) & (pixels < left + SQUARE)
    square = (rows[:, :, None] & cols[:, None, :]).float()
    return x + 3.0 * square[:, None] * F.one_hot(y, 3).float()[:, :, None, None], y


def initial_model() -> nn.Module:
    """A frozen random 2-block ViT (head dim 16, as the Triton kernels need) with 4 deep prompts.
    timm's "jax" init (Xavier) keeps the image's content in the features; its default init (std
    0.02) leaves too little of it for a frozen random backbone to learn from in a few hundred steps."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=IMG, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2, num_classes=CLASSES, weight_init="jax")
    return vpt_fast.prompt(model, num_prompts=4, deep=True, backend="reference").train()


def train(model: nn.Module, backend: str, steps: int) -> tuple[list[float], nn.Module]:
    """Adam on the prompts and head of a copy of `model`, a fresh batch every step (the same batches
    for every backend): the loss of every step and the trained copy."""
    model = copy.deepcopy(model)
    vpt_fast.set_backend(model, backend)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    batches = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = colour_task(BATCH, batches)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def held_out_accuracy(model: nn.Module) -> float:
    x, y = colour_task(512, torch.Generator().manual_seed(2))
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: a 16px model gains nothing from more, and on a busy machine a second
    thread that has to wait for its core makes every op ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference_run(one_thread) -> tuple[list[float], float]:
    """The reference backend's loss curve and held-out accuracy."""
    losses, model = train(initial_model(), "reference", STEPS)
    return losses, held_out_accuracy(model)


def test_reference_learns_the_task(reference_run):
    losses, accuracy = reference_run
    assert losses[0] > 0.9 * CHANCE, f"first loss {losses[0]:.3f}: the task should start at chance"
    final = sum(losses[-20:]) / 20
    assert final < 0.25 * CHANCE, f"mean loss of the last 20 steps {final:.3f} vs chance {CHANCE:.3f}"
    assert accuracy > 0.9, f"held-out accuracy {accuracy:.3f}"


def assert_same_curve(losses: list[float], reference: list[float], backend: str) -> None:
    assert len(losses) == len(reference)
    for step, (loss, ref) in enumerate(zip(losses, reference)):
        assert abs(loss - ref) <= CURVE_TOL * abs(ref), \
            f"{backend}: step {step} loss {loss:.8f} vs reference {ref:.8f} (rel {abs(loss - ref) / abs(ref):.2e})"


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_backend_follows_reference_curve(reference_run, backend):
    if backend not in vpt_fast.available_backends():
        pytest.skip(f"backend {backend} not available")
    losses, _ = train(initial_model(), backend, STEPS)
    assert_same_curve(losses, reference_run[0], backend)


@pytest.mark.slow
def test_triton_follows_reference_curve(reference_run, impl):
    losses, _ = train(initial_model(), "triton", TRITON_STEPS)
    assert_same_curve(losses, reference_run[0][:TRITON_STEPS], "triton")
