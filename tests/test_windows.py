"""Swin window partition / reverse as one gather (`vpt_fast.ops.windows`): bit-exact against timm's
roll + pad + `window_partition` and `window_reverse` + crop + roll, values and gradients; the
SwinBlock's prompt-aware path against its timm path, through `set_input_size`, dynamic masks,
autocast and `torch.compile(fullgraph=True)`."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models import swin_transformer as timm_swin

from utils import prompted_swin as prompted
from vpt_fast.blocks.swin import SwinBlock
from vpt_fast.ops.windows import window_index, window_partition, window_reverse

CASES = {  # (H, W), window, shift
    "w7_shift": ((14, 14), (7, 7), (3, 3)),
    "w7_noshift": ((14, 14), (7, 7), (0, 0)),
    "w7_padded_shift": ((10, 10), (7, 7), (3, 3)),
    "w7_padded_noshift": ((10, 12), (7, 7), (0, 0)),
    "rect_shift": ((6, 9), (4, 3), (2, 1)),
    "rect_padded_shift": ((5, 7), (4, 3), (2, 1)),
    "window_over_grid": ((5, 5), (7, 7), (3, 3)),  # timm's always_partition
}
DTYPES = [torch.float32, torch.bfloat16]


def padded(size, window):
    return tuple(-(-s // w) * w for s, w in zip(size, window))


def timm_partition(x, window, shift):
    """timm's SwinTransformerBlock._attn up to the windows: (B, H, W, C) -> (B*nW, N, C)."""
    height, width = x.shape[1:3]
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    hp, wp = padded((height, width), window)
    x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))
    return timm_swin.window_partition(x, window).view(-1, window[0] * window[1], x.shape[-1])


def timm_reverse(windows, window, shift, height, width):
    """timm's SwinTransformerBlock._attn after the attention: (B*nW, N, C) -> (B, H, W, C)."""
    hp, wp = padded((height, width), window)
    x = timm_swin.window_reverse(windows.view(-1, *window, windows.shape[-1]), window, hp, wp)
    return torch.roll(x[:, :height, :width], shifts=shift, dims=(1, 2))


def randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_partition_and_reverse_equal_timm(case, dtype, batch):
    (height, width), window, shift = CASES[case]
    dim, area = 5, window[0] * window[1]
    index, inverse = window_index(height, width, window, shift, torch.device("cpu"))
    num_rows = index.numel()  # nW * N over the padded grid
    assert num_rows == padded((height, width), window)[0] * padded((height, width), window)[1]

    x = randn((batch, height, width, dim), dtype, seed=0)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = timm_partition(x_ref, window, shift)
    actual = window_partition(x_ours.view(batch, height * width, dim), index, inverse)
    assert torch.equal(actual.view(-1, area, dim), expected)
    dy = randn(expected.shape, dtype, seed=1)
    expected.backward(dy)
    actual.backward(dy.view(batch, num_rows, dim))
    assert torch.equal(x_ours.grad, x_ref.grad)

    w = randn((batch * num_rows // area, area, dim), dtype, seed=2)
    w_ref, w_ours = w.clone().requires_grad_(), w.clone().requires_grad_()
    expected = timm_reverse(w_ref, window, shift, height, width)
    actual = window_reverse(w_ours.view(batch, num_rows, dim), index, inverse)
    assert torch.equal(actual.view(batch, height, width, dim), expected)
    dx = randn(expected.shape, dtype, seed=3)
    expected.backward(dx)
    actual.backward(dx.view(batch, height * width, dim))
    assert torch.equal(w_ours.grad, w_ref.grad)  # padding rows: zero in both


def test_maps_are_inverse_permutations():
    (height, width), window, shift = CASES["rect_padded_shift"]
    index, inverse = window_index(height, width, window, shift, torch.device("cpu"))
    real = index < height * width
    assert torch.equal(index[inverse], torch.arange(height * width))  # every grid row exactly once
    assert torch.equal(inverse[index[real]], torch.nonzero(real).squeeze(1))


def timm_block(size, window, shift, **kwargs):
    torch.manual_seed(0)
    return timm_swin.SwinTransformerBlock(dim=8, input_resolution=size, num_heads=2, window_size=window,
                                          shift_size=shift, **kwargs)


def assert_windows_match_timm(block: SwinBlock, x: torch.Tensor) -> None:
    windows, mask = block._to_windows(x)
    windows_ref, mask_ref = block._timm_to_windows(x)
    assert torch.equal(windows, windows_ref)
    assert (mask is None and mask_ref is None) or torch.equal(mask, mask_ref)
    size = x.shape[1:3]
    assert torch.equal(block._from_windows(windows, *size), block._timm_from_windows(windows, *size))


@pytest.mark.parametrize("dynamic_mask", [False, True], ids=["static_mask", "dynamic_mask"])
def test_block_windows_follow_input_size(dynamic_mask):
    """One map per grid size: after `set_input_size`, and for inputs of other sizes (dynamic mask)."""
    block = SwinBlock.from_timm(timm_block((14, 14), 7, 3, dynamic_mask=dynamic_mask), backend="torch")
    assert_windows_match_timm(block, torch.randn(2, 14, 14, 8))
    block.set_input_size((14, 14), (4, 4))  # same grid, window 4, shift 2, padded to 16x16
    assert_windows_match_timm(block, torch.randn(2, 14, 14, 8))
    if dynamic_mask:
        assert_windows_match_timm(block, torch.randn(2, 9, 13, 8))
    assert len(block._window_cache) == (3 if dynamic_mask else 2)


@pytest.mark.parametrize("size", [(14, 14), (10, 10)], ids=["divisible", "padded"])
def test_block_equals_timm_block(size):
    """The prompt-aware path (gathers) without prompts is timm's block, forward and input gradient."""
    block = timm_block(size, 7, 3).eval()
    ours = SwinBlock.from_timm(copy.deepcopy(block), backend="torch")
    x = torch.randn(3, *size, 8)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = block(x_ref), ours(x_ours)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ours.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_autocast_keeps_dtype():
    (height, width), window, shift = CASES["w7_padded_shift"]
    index, inverse = window_index(height, width, window, shift, torch.device("cpu"))
    x = torch.randn(2, height * width, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        windows = window_partition(x, index, inverse)
        back = window_reverse(windows, index, inverse)
    assert windows.dtype == back.dtype == torch.float32
    assert torch.equal(back, x)


@pytest.mark.parametrize("case", ["w7_shift", "w7_padded_shift"])
def test_torch_compile_fullgraph(case):
    """dynamo traces the autograd.Function (aot_eager: forward and backward graphs, no codegen)."""
    (height, width), window, shift = CASES[case]
    index, inverse = window_index(height, width, window, shift, torch.device("cpu"))

    def round_trip(x):
        return window_reverse(window_partition(x, index, inverse).sin(), index, inverse)

    x = torch.randn(2, height * width, 4)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = round_trip(x_eager)
    y_compiled = torch.compile(round_trip, backend="aot_eager", fullgraph=True)(x_compiled)
    assert torch.equal(y_compiled, y_eager)
    y_eager.sum().backward()
    y_compiled.sum().backward()
    assert torch.equal(x_compiled.grad, x_eager.grad)


def test_prompted_swin_compiles_fullgraph():
    """The whole prompt-aware model compiles once: the window maps do not change the guarded state."""
    model = prompted(size="w7_padded", num_prompts=3, deep=True, backend="torch").train()
    x = torch.randn(2, 3, 40, 40)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo tracing, no codegen
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits = compiled(x)
        assert torch.equal(compiled(x), logits)
    assert torch.equal(logits, model(x))
