"""Swin window partition / reverse as one gather (`vpt_fast.ops.windows`): bit-exact against timm's
roll + pad + `window_partition` and `window_reverse` + crop + roll, values and gradients; the
SwinBlock's prompt-aware path against its timm path, through `set_input_size`, dynamic masks,
autocast and `torch.compile(fullgraph=True)` (inductor included)."""
from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import swin_transformer as timm_swin

import vpt_fast
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


def prompted_swin(img_size: int = 56, backend: str = "torch") -> torch.nn.Module:
    """A tiny timm Swin (patch 4, window 7, width 16, 2 + 2 blocks), 3 deep prompts, random prompts."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, window_size=7,
                              embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=5)
    model = vpt_fast.prompt(model, num_prompts=3, deep=True, backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def timm_block(size, window, shift, **kwargs):
    torch.manual_seed(0)
    return timm_swin.SwinTransformerBlock(dim=8, input_resolution=size, num_heads=2, window_size=window,
                                          shift_size=shift, **kwargs)


def assert_windows_match_timm(block: SwinBlock, x: torch.Tensor) -> None:
    size = x.shape[1:3]
    windows, mask = block._to_windows(x), block._shift_mask(*size, x.device, x.dtype)
    windows_ref, mask_ref = block._timm_to_windows(x)
    assert torch.equal(windows, windows_ref)
    assert (mask is None and mask_ref is None) or torch.equal(mask, mask_ref)
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


@pytest.mark.slow
@pytest.mark.parametrize("case", ["w7_shift", "rect_padded_shift"])
def test_torch_compile_inductor_maps_in_graph(case):
    """Inductor (C++ code generation) with the maps built inside the graph, as SwinBlock does under
    compile: they fuse into the gathers as index arithmetic, forward and backward. With a negative
    operand of `%` in the maps, inductor could not bound the fused index and failed to generate code."""
    (height, width), window, shift = CASES[case]

    def round_trip(x):
        index, inverse = window_index(height, width, window, shift, x.device)
        return window_reverse(window_partition(x, index, inverse) * 2, index, inverse)  # exact: bit-equal

    x = torch.randn(2, height * width, 4)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = round_trip(x_eager)
    torch._dynamo.reset()
    y_compiled = torch.compile(round_trip, backend="inductor", fullgraph=True)(x_compiled)
    assert torch.equal(y_compiled, y_eager)
    y_eager.sum().backward()
    y_compiled.sum().backward()
    assert torch.equal(x_compiled.grad, x_eager.grad)


@pytest.mark.slow
def test_prompted_swin_compiles_fullgraph():
    """The whole prompt-aware model compiles once: the window maps and the bias caches, filled by
    eager calls in between, do not change the guarded state."""
    model = prompted_swin(img_size=40).train()  # 10x10 grid padded to 14x14, shifted
    x = torch.randn(2, 3, 40, 40)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo tracing, no codegen
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits = compiled(x)
        assert torch.equal(model(x), logits)
        assert torch.equal(compiled(x), logits)


# -- empty batch ---------------------------------------------------------------------------------


def test_empty_batch_raises_like_timm():
    """timm's own Swin fails on an empty batch (WindowAttention cannot reshape 0 rows), so there is no
    empty result to match: the prompted block and model say what is wrong instead of dividing by zero."""
    block = timm_block((14, 14), 7, 3).eval()
    x = torch.randn(0, 14, 14, 8)
    with pytest.raises(RuntimeError):
        block(x)
    ours = SwinBlock.from_timm(block, backend="torch")
    for backend in ("torch", "reference"):
        ours.backend = backend
        with pytest.raises(ValueError, match=r"at least one image.*\(batch 0\)"):
            ours(x, torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"batch 0"):
        prompted_swin()(torch.randn(0, 3, 56, 56))


# -- relative-position bias + shift mask, built once ---------------------------------------------


def shifted_block(dynamic_mask: bool = False) -> SwinBlock:
    block = timm_block((14, 14), 7, 3, dynamic_mask=dynamic_mask).eval()
    with torch.no_grad():  # a random table (timm initialises it to tiny values)
        block.attn.relative_position_bias_table.normal_()
    return SwinBlock.from_timm(block, backend="torch").requires_grad_(False)


def forward_backward(block: SwinBlock, x: torch.Tensor, prompts: torch.Tensor):
    x, prompts = x.clone().requires_grad_(), prompts.clone().requires_grad_()
    y, p = block(x, prompts)
    torch.autograd.backward((y, p), (torch.ones_like(y), torch.ones_like(p)))
    return y, p, x.grad, prompts.grad


@pytest.mark.parametrize("dynamic_mask", [False, True], ids=["static_mask", "dynamic_mask"])
def test_bias_cache_is_bit_equal_to_rebuilding(dynamic_mask):
    block = shifted_block(dynamic_mask)
    sizes = [(14, 14), (10, 12)] if dynamic_mask else [(14, 14)]
    for size in sizes:
        x, prompts = torch.randn(2, *size, 8), torch.randn(1, 3, 8)
        cached = [forward_backward(block, x, prompts) for _ in range(2)]  # builds, then reads the cache
        assert block._bias(*size) is block._bias(*size)
        rebuilding = copy.deepcopy(block)
        assert rebuilding._bias_cache == {}  # caches are not copied (nor pickled)
        rebuilding._bias = rebuilding._build_bias
        uncached = forward_backward(rebuilding, x, prompts)
        for got in cached:
            assert all(torch.equal(a, b) for a, b in zip(got, uncached))
    assert len(block._bias_cache) == len(sizes)  # one entry per grid
    assert pickle.loads(pickle.dumps(block))._bias_cache == {}


def test_bias_cache_rebuilds_when_the_table_changes():
    block = shifted_block()
    attn = block.attn
    table = attn.relative_position_bias_table

    def assert_fresh(before):
        after = block._bias(14, 14)
        assert after is not before and torch.equal(after, block._build_bias(14, 14))
        assert not torch.equal(after, before)
        return after

    bias = block._bias(14, 14)
    state = {k: v.clone() for k, v in attn.state_dict().items()}
    state["relative_position_bias_table"].normal_()
    attn.load_state_dict(state)  # copies into the same Parameter: its version counter moves
    bias = assert_fresh(bias)
    with torch.no_grad():
        table.mul_(2)  # an in-place update, as an optimizer step on an unfrozen table does
    bias = assert_fresh(bias)
    table.data = torch.randn_like(table)  # a new storage, same version counter
    bias = assert_fresh(bias)
    attn.load_state_dict({**state, "relative_position_bias_table": torch.randn_like(table)}, assign=True)
    bias = assert_fresh(bias)  # a new Parameter object
    block.set_input_size((14, 14), (4, 4))  # new window: new table, index and mask (16x16 padded grid)
    assert torch.equal(block._bias(14, 14), block._build_bias(14, 14))
    assert block._bias(14, 14).shape[-1] == 16


def test_bias_cache_is_not_used_for_a_table_that_requires_grad():
    block = shifted_block()
    block._bias(14, 14)
    block.attn.relative_position_bias_table.requires_grad_(True)
    bias = block._bias(14, 14)
    assert bias.requires_grad and bias is not block._bias(14, 14)
    bias.sum().backward()
    assert block.attn.relative_position_bias_table.grad is not None


def test_bias_cache_follows_dtype_and_inference_mode():
    block = shifted_block()
    x, prompts = torch.randn(2, 14, 14, 8), torch.randn(1, 3, 8)
    assert block._bias(14, 14).dtype == torch.float32
    block.to(torch.float64)
    bias = block._bias(14, 14)
    assert bias.dtype == torch.float64 and torch.equal(bias, block._build_bias(14, 14))
    assert forward_backward(block, x.double(), prompts.double())[0].dtype == torch.float64
    block.to(torch.float32).clear_caches()
    with torch.inference_mode():  # the bias built here is a normal tensor, saved for backward below
        y = block(x, prompts)[0]
    assert not block._bias(14, 14).is_inference()
    # inference accumulates fc2 into the residual (ops/mlp.py::add_norm_mlp_residual): ulp-level apart
    torch.testing.assert_close(forward_backward(block, x, prompts)[0], y, rtol=1e-6, atol=1e-6)
