"""Residual add + frozen LayerNorm on the rows of a ViT block (the attention branch joining the
residual stream, then norm2), forward and forward + input gradients: torch eager (`residual + branch`,
then `F.layer_norm`), the same under `torch.compile`, each vpt_fast backend's fused `add_layer_norm`
op (what the blocks run before the MLP), and on CUDA "triton_unfused": torch's add, then the triton
`layer_norm` op (what the blocks ran before the fusion).

Shape (B, tokens, D) of the benchmark model (conftest `cfg`): ViT-B/16 (128, 197, 768) under bf16
autocast on CUDA, ViT-S/16 (8, 197, 384) fp32 on the CPU. Under autocast the residual stream and s
are float32, the branch (the attention projection's output), y (it feeds fc1) and dy are in the
autocast dtype; eager writes y in float32 and casts (what fc1's autocast does; inside the timed
region). Backward gets the gradient of both outputs: ds (from the next residual add) and dy.

extra_info "bytes" is the roofline traffic of one call, every tensor read or written once:
fwd = residual + branch + s + y + weight + bias; fwd_bwd = fwd + mean/rstd written, then ds + dy +
s + mean/rstd + weight read and d residual written, plus d branch when its dtype differs from s's (else
the two gradients are one tensor). "gb_per_s" = bytes / median time. Memory-bound.
Methods: eager, compile (on CUDA, or with VPT_BENCH_COMPILE=1), torch, triton and triton_unfused
(CUDA only: the interpreter is not timed); "cuda" runs this op with triton or torch, so it is left
out. Each method's outputs and input gradients are checked against eager's before timing.
Run: `pytest benchmarks/bench_add_layer_norm.py --benchmark-only`; compare ratios within one run only
(`python benchmarks/summarize.py`).
"""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from bench_layer_norm import METHODS, Step, _frozen_norm, low_dtype, time_checked, vit_dims
from torch import Tensor, nn

from vpt_fast.bench import BenchConfig
from vpt_fast.ops.add_layer_norm import add_layer_norm
from vpt_fast.ops.layer_norm import layer_norm

ADD_METHODS = METHODS + (["triton_unfused"] if "triton" in METHODS else [])

Forward = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _forward(method: str, norm: nn.LayerNorm, out_dtype: torch.dtype) -> Forward:
    if method in ("eager", "compile"):
        def eager(residual: Tensor, branch: Tensor) -> tuple[Tensor, Tensor]:
            s = residual + branch
            return s, F.layer_norm(s, norm.normalized_shape, norm.weight, norm.bias, norm.eps).to(out_dtype)
        return torch.compile(eager) if method == "compile" else eager
    if method == "triton_unfused":
        def unfused(residual: Tensor, branch: Tensor) -> tuple[Tensor, Tensor]:
            s = residual + branch
            return s, layer_norm(s, norm, "triton", feeds_matmul=True)
        return unfused
    return lambda residual, branch: add_layer_norm(residual, branch, norm, method, feeds_matmul=True)


def _step(forward: Forward, residual: Tensor, branch: Tensor, ds: Tensor, dy: Tensor, mode: str,
          autocast: Optional[torch.dtype]) -> Step:
    def step() -> tuple[Tensor, ...]:
        with torch.autocast(residual.device.type, dtype=autocast, enabled=autocast is not None):
            s, y = forward(residual, branch)
        if mode == "fwd":
            return s, y
        return (s, y, *torch.autograd.grad((s, y), (residual, branch), (ds, dy)))
    return step


def _bench(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    dims = vit_dims(cfg.model)
    shape = (cfg.batch, dims["tokens"], dims["dim"])
    norm = _frozen_norm(dims["dim"], dims["eps"], cfg.device)
    low = low_dtype(cfg)
    branch_dtype = low or torch.float32
    g = torch.Generator(device=cfg.device).manual_seed(0)
    residual = torch.randn(shape, device=cfg.device, generator=g).requires_grad_(mode == "fwd_bwd")
    branch = torch.randn(shape, device=cfg.device, generator=g).to(branch_dtype).requires_grad_(mode == "fwd_bwd")
    ds = torch.randn(shape, device=cfg.device, generator=g)
    dy = torch.randn(shape, device=cfg.device, generator=g).to(branch_dtype)
    steps = {name: _step(_forward(name, norm, branch_dtype), residual, branch, ds, dy, mode, low)
             for name in {"eager", method}}
    exact_branch = branch.detach().float().requires_grad_(mode == "fwd_bwd")
    steps["exact"] = _step(_forward("eager", norm, torch.float32), residual, exact_branch, ds, dy.float(), mode,
                           None)

    rows, dim = residual.numel() // dims["dim"], dims["dim"]
    stream_bytes, low_bytes = residual.numel() * 4, residual.numel() * branch.element_size()
    stats_bytes, weight_bytes = 2 * rows * 4, dim * norm.weight.element_size()
    fwd_bytes = stream_bytes + low_bytes + stream_bytes + low_bytes + 2 * weight_bytes
    bwd_bytes = (stats_bytes + stream_bytes + low_bytes + stream_bytes + stats_bytes + weight_bytes + stream_bytes
                 + (low_bytes if branch_dtype != torch.float32 else 0))
    benchmark.group = f"add_layer_norm-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": "x".join(map(str, shape)), "stream_dtype": "float32",
                  "branch_dtype": str(branch_dtype).removeprefix("torch."),
                  "bytes": fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0)})


@pytest.mark.parametrize("method", ADD_METHODS)
def bench_add_layer_norm_fwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", ADD_METHODS)
def bench_add_layer_norm_fwd_bwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd_bwd")
