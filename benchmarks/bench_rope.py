"""Rotary position embedding on the rows of q after the prefix, forward and forward + input gradient:
timm's out-of-place `torch.cat([t[:, :, :start], apply_rot_embed_cat(t[:, :, start:], emb, half)])`
eager (and under `torch.compile`), and each vpt_fast backend's in-place `rope_` op.

Shape: ViT-S/16 DINOv3 (`vit_small_patch16_dinov3`): B = 8, H = 6 heads, N = 201 rows (start = 5: class
+ 4 register tokens), d = 64, the interleaved layout, emb (196, 128) float32; q is a view of a packed
q/k/v GEMM output (B, N, 3 * H * d) in the benchmark dtype (bf16 autocast on CUDA, fp32 on the CPU).
Every step first copies the source into a fresh GEMM-output buffer (a clone, the same cost for every
method, standing in for the projection that writes it) so the in-place op starts from the same data.

extra_info "bytes" is the roofline traffic of the rotation alone: q rows read and written, the emb
rows read once (fwd); the same again on the gradient (fwd_bwd). Memory-bound (~3 FLOP per element).
Methods: eager, compile (on CUDA, or with VPT_BENCH_COMPILE=1), torch, triton (CUDA only). Each method's
output and input gradient are checked against eager's before timing.
Run: `pytest benchmarks/bench_rope.py --benchmark-only`; compare ratios within one run only
(`python benchmarks/summarize.py`).
"""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
from bench_layer_norm import METHODS, low_dtype, time_checked
from timm.layers import apply_rot_embed_cat
from torch import Tensor

from vpt_fast.bench import BenchConfig
from vpt_fast.ops.rope import rope_

B, H, N, START, D = 8, 6, 201, 5, 64
HALF = False


def _rotate(method: str, emb: Tensor) -> Callable[[Tensor], Tensor]:
    if method in ("eager", "compile"):
        def eager(q: Tensor) -> Tensor:
            rotated = apply_rot_embed_cat(q[:, :, START:], emb.narrow(-2, 0, N - START), half=HALF)
            return torch.cat([q[:, :, :START], rotated], dim=2)
        return torch.compile(eager) if method == "compile" else eager
    return lambda q: rope_(q, emb, START, HALF, method)


def _step(rotate: Callable[[Tensor], Tensor], src: Tensor, dy: Tensor, mode: str,
          dtype: Optional[torch.dtype]) -> Callable[[], tuple[Tensor, ...]]:
    def step() -> tuple[Tensor, ...]:
        s = src if dtype is None else src.to(dtype)
        qkv = s.clone().view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # the GEMM's output, q a view of it
        q = rotate(qkv[0])
        return (q,) if mode == "fwd" else (q, *torch.autograd.grad(q, src, dy))
    return step


def _bench(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    low = low_dtype(cfg)
    g = torch.Generator(device=cfg.device).manual_seed(0)
    src = torch.randn(B, N, 3 * H * D, device=cfg.device, generator=g).requires_grad_(mode == "fwd_bwd")
    emb = torch.randn(N - START, 2 * D, device=cfg.device, generator=g)
    dy = torch.randn(B, H, N, D, device=cfg.device, generator=g).to(low or torch.float32)
    steps = {name: _step(_rotate(name, emb), src, dy, mode, low) for name in {"eager", method}}
    steps["exact"] = _step(_rotate("eager", emb), src, dy.float(), mode, None)
    rows = B * H * (N - START)
    q_bytes = rows * D * dy.element_size()
    fwd_bytes = 2 * q_bytes + emb.numel() * emb.element_size()
    benchmark.group = f"rope-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": f"{B}x{H}x{N}x{D}", "start": START, "dtype": str(dy.dtype).removeprefix("torch."),
                  "bytes": fwd_bytes * (2 if mode == "fwd_bwd" else 1)})


@pytest.mark.parametrize("method", METHODS)
def bench_rope_fwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", METHODS)
def bench_rope_fwd_bwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd_bwd")
