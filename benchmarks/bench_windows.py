"""Swin window partition + reverse, forward and backward: timm's roll / pad / `window_partition` /
`window_reverse` / crop / roll (what the reference backend runs) vs one gather each way
(`vpt_fast.ops.windows`, what the prompt-aware path runs).

Swin-T stage-0 shape: 56x56 grid, C=96, window 7, shift 3; batch 8 fp32 on CPU, batch 64 bf16 on
CUDA (VPT_BENCH_DTYPE overrides the dtype). Pure data movement: per gather 2 x B*56*56*96 elements
(read + write) and no FLOPs, so the timm path's extra copies show up one to one.
Run: `python -m pytest benchmarks/bench_windows.py --benchmark-only`; compare ratios within one run.
"""
from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from conftest import default_config, run_timed
from vpt_fast.blocks.swin import SwinBlock

SIZE, DIM, WINDOW, SHIFT = 56, 96, 7, 3


def _setup(cfg):
    block = SwinBlock.from_timm(SwinTransformerBlock(DIM, (SIZE, SIZE), num_heads=3, window_size=WINDOW,
                                                     shift_size=SHIFT), backend="torch")
    batch = 8 if cfg.device == "cpu" else 64
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x, dy = (torch.randn(batch, SIZE, SIZE, DIM, device=cfg.device, dtype=cfg.torch_dtype, generator=g)
             for _ in range(2))
    return block.to(cfg.device), x.requires_grad_(), dy


@pytest.mark.parametrize("method", ["timm", "gather"])
def bench_window_partition_reverse(benchmark, cfg, env_info, method):
    block, x, dy = _setup(cfg)
    to_windows, from_windows = ((block._timm_to_windows, block._timm_from_windows) if method == "timm"
                                else (block._to_windows, block._from_windows))

    def step():
        windows, _ = to_windows(x)
        return torch.autograd.grad(from_windows(windows, SIZE, SIZE), x, dy)

    run_timed(benchmark, step, cfg, rounds=20)
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"method": method, "batch": x.shape[0], "dtype": cfg.dtype,
                                 "shape": f"{SIZE}x{SIZE}x{DIM} window {WINDOW} shift {SHIFT}"})
