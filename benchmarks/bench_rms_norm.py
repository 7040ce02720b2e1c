"""Frozen RMSNorm on the rows of a ViT block, forward and forward + input gradient: PyTorch's own
`F.rms_norm` eager, the same under `torch.compile`, and each vpt_fast backend's `rms_norm` op (what a
block with an RMSNorm, as AIMv2 or some Eva models have, would run for norm1 / norm2, `feeds_matmul=True`).

Shape (B, tokens, D) of the benchmark model (conftest `cfg`): ViT-B/16 (128, 197, 768) under bf16
autocast on CUDA, ViT-S/16 (8, 197, 384) fp32 on the CPU; an RMSNorm of that width (eps 1e-6) stands in
for the block's LayerNorm. The weight is frozen, the input needs its gradient. Under autocast the rows
are float32 (the residual stream) and the output feeds a matmul: eager writes float32 and casts
(inside the timed region), vpt_fast writes the low dtype once.

extra_info "bytes" is the roofline traffic of one call, every tensor read or written once:
fwd = x + y + weight; fwd_bwd = fwd + rstd written, then dy + x + rstd + weight read and dx written.
"gb_per_s" = bytes / median time. ~1 FLOP per byte: memory-bound.
Methods: eager, compile (on CUDA, or with VPT_BENCH_COMPILE=1), torch, triton (CUDA only: the
interpreter is not timed); "cuda" runs this op with triton or torch, so it is left out. Each method's
output and input gradient are checked against eager's before timing.
Run: `pytest benchmarks/bench_rms_norm.py --benchmark-only`; compare ratios within one run only
(`python benchmarks/summarize.py`).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from bench_layer_norm import METHODS, autocast_step, low_dtype, time_checked, vit_dims
from torch import Tensor, nn

from vpt_fast.bench import BenchConfig
from vpt_fast.ops.rms_norm import rms_norm

EPS = 1e-6


def _frozen_norm(dim: int, device: str) -> nn.RMSNorm:
    g = torch.Generator().manual_seed(1)
    norm = nn.RMSNorm(dim, eps=EPS)
    with torch.no_grad():  # away from the identity weight, so a dropped weight shows
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    return norm.requires_grad_(False).to(device)


def _forward(method: str, norm: nn.RMSNorm, out_dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    if method in ("eager", "compile"):
        def eager(x: Tensor) -> Tensor:
            return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps).to(out_dtype)
        return torch.compile(eager) if method == "compile" else eager
    return lambda x: rms_norm(x, norm, method, feeds_matmul=True)


def _bench(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    dims = vit_dims(cfg.model)
    shape = (cfg.batch, dims["tokens"], dims["dim"])
    norm = _frozen_norm(dims["dim"], cfg.device)
    low = low_dtype(cfg)
    out_dtype = low or torch.float32
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x = torch.randn(shape, device=cfg.device, generator=g).requires_grad_(mode == "fwd_bwd")
    dy = torch.randn(shape, device=cfg.device, generator=g).to(out_dtype)
    steps = {name: autocast_step(_forward(name, norm, out_dtype), x, dy, mode, low) for name in {"eager", method}}
    steps["exact"] = autocast_step(_forward("eager", norm, torch.float32), x, dy.float(), mode, None)

    activation, rows, dim = x.numel(), x.numel() // dims["dim"], dims["dim"]
    x_bytes, y_bytes = activation * x.element_size(), activation * dy.element_size()
    stats_bytes, weight_bytes = rows * 4, dim * norm.weight.element_size()
    fwd_bytes = x_bytes + y_bytes + weight_bytes
    bwd_bytes = stats_bytes + y_bytes + x_bytes + stats_bytes + weight_bytes + x_bytes
    benchmark.group = f"rms_norm-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": "x".join(map(str, shape)), "in_dtype": "float32",
                  "out_dtype": str(out_dtype).removeprefix("torch."),
                  "bytes": fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0)})


@pytest.mark.parametrize("method", METHODS)
def bench_rms_norm_fwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", METHODS)
def bench_rms_norm_fwd_bwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd_bwd")
