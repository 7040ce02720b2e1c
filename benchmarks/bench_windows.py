"""Swin window partition + reverse, forward and backward: timm's roll / pad / `window_partition` /
`window_reverse` / crop / roll (what the reference backend runs) vs one gather each way
(`vpt_fast.ops.windows`, what the prompt-aware path runs). And the attention bias of a shifted block
(relative-position bias + shift mask, (nW, heads, N, N)): rebuilt on every call (what timm does per
forward) vs `SwinBlock`'s cache, with timm's static mask buffer and with its dynamic mask.

Swin-T stage-0 shape: 56x56 grid, C=96, window 7, shift 3; batch 8 fp32 on CPU, batch 64 bf16 on
CUDA (VPT_BENCH_DTYPE overrides the dtype). Pure data movement: per gather 2 x B*56*56*96 elements
(read + write) and no FLOPs, so the timm path's extra copies show up one to one.
Run: `python -m pytest benchmarks/bench_windows.py --benchmark-only`; compare ratios within one run.
"""
from __future__ import annotations

import pytest
import torch
from conftest import run_timed
from timm.models.swin_transformer import SwinTransformerBlock

from vpt_fast.blocks.swin import SwinBlock

SIZE, DIM, WINDOW, SHIFT = 56, 96, 7, 3


def _setup(cfg, dynamic_mask: bool = False):
    block = SwinBlock.from_timm(SwinTransformerBlock(DIM, (SIZE, SIZE), num_heads=3, window_size=WINDOW,
                                                     shift_size=SHIFT, dynamic_mask=dynamic_mask), backend="torch")
    batch = 8 if cfg.device == "cpu" else 64
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x, dy = (torch.randn(batch, SIZE, SIZE, DIM, device=cfg.device, dtype=cfg.torch_dtype, generator=g)
             for _ in range(2))
    return block.to(cfg.device), x.requires_grad_(), dy


@pytest.mark.parametrize("method", ["timm", "gather"])
def bench_window_partition_reverse(benchmark, cfg, env_info, method):
    block, x, dy = _setup(cfg)
    if method == "timm":
        to_windows, from_windows = (lambda grid: block._timm_to_windows(grid)[0]), block._timm_from_windows
    else:
        to_windows, from_windows = block._to_windows, block._from_windows

    def step():
        return torch.autograd.grad(from_windows(to_windows(x), SIZE, SIZE), x, dy)

    run_timed(benchmark, step, cfg, rounds=20)
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"method": method, "batch": x.shape[0], "dtype": cfg.dtype,
                                 "shape": f"{SIZE}x{SIZE}x{DIM} window {WINDOW} shift {SHIFT}"})


@pytest.mark.parametrize("mask", ["static_mask", "dynamic_mask"])
@pytest.mark.parametrize("method", ["rebuild", "cached"])
def bench_attention_bias(benchmark, cfg, env_info, method, mask):
    block = _setup(cfg, dynamic_mask=mask == "dynamic_mask")[0].requires_grad_(False)
    build = block._build_bias if method == "rebuild" else block._bias
    bias = build(SIZE, SIZE)
    assert torch.equal(bias, block._build_bias(SIZE, SIZE))
    run_timed(benchmark, lambda: build(SIZE, SIZE), cfg, rounds=200)
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"method": method, "mask": mask, "dtype": str(bias.dtype).removeprefix("torch."),
                                 "shape": "x".join(map(str, bias.shape))})
