"""The frozen pre-norm MLP of a ViT block, forward and forward + input gradient: torch eager
(timm's `Mlp` after `F.layer_norm`, what the reference blocks run), the same under `torch.compile`,
and each vpt_fast backend's `norm_mlp` op (LayerNorm -> fc1 -> bias_gelu -> fc2 as one autograd node,
what the blocks run when the MLP is fusable).

Shape (B, tokens, D) -> hidden (4 D) of the benchmark model (conftest `cfg`): ViT-B/16 (128, 197, 768)
under bf16 autocast on CUDA, ViT-S/16 (8, 197, 384) fp32 on the CPU. The backbone is frozen: the
LayerNorm and both linears need no gradient, the input does.

extra_info "flops": the two GEMMs, 2 * rows * D * hidden * 2 forward; the dX-only backward runs two
GEMMs of the same size (dout W2, dh W1), so fwd_bwd is twice the forward. "tflop_per_s" = flops /
median time. "bytes" is the roofline traffic with every tensor read or written once (x, the fc1
output h written and read, the output, both weights; fwd_bwd adds dout, h, dh and dx): at the CPU
shape ~60 FLOPs per byte, compute-bound on the GEMMs.
Methods: eager, compile (on CUDA, or with VPT_BENCH_COMPILE=1), torch, triton (CUDA only: the
interpreter is not timed); "cuda" runs this op with triton or torch, so it is left out. Each method's
output and input gradient are checked against eager's before timing.
Run: `pytest benchmarks/bench_mlp.py --benchmark-only`; compare ratios within one run only
(`python benchmarks/summarize.py`).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from bench_layer_norm import METHODS, autocast_step, low_dtype, time_checked, vit_dims
from conftest import per_second
from timm.layers import Mlp
from torch import Tensor, nn

from vpt_fast.bench import BenchConfig
from vpt_fast.ops.mlp import norm_mlp


def _frozen_mlp(dims: dict, device: str) -> tuple[nn.LayerNorm, Mlp]:
    torch.manual_seed(1)
    norm, mlp = nn.LayerNorm(dims["dim"], eps=dims["eps"]), Mlp(dims["dim"], dims["hidden"])
    with torch.no_grad():  # away from the identity affine, so a dropped weight or bias shows
        norm.weight.add_(0.1 * torch.randn(dims["dim"]))
        norm.bias.add_(0.1 * torch.randn(dims["dim"]))
    return norm.requires_grad_(False).to(device), mlp.requires_grad_(False).to(device)


def _forward(method: str, norm: nn.LayerNorm, mlp: Mlp) -> Callable[[Tensor], Tensor]:
    if method in ("eager", "compile"):
        def eager(x: Tensor) -> Tensor:
            return mlp(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        return torch.compile(eager) if method == "compile" else eager
    return lambda x: norm_mlp(x, norm, mlp, recompute_fc1=False, backend=method)


def _bench(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    dims = vit_dims(cfg.model)
    shape = (cfg.batch, dims["tokens"], dims["dim"])
    norm, mlp = _frozen_mlp(dims, cfg.device)
    low = low_dtype(cfg)
    out_dtype = low or torch.float32
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x = torch.randn(shape, device=cfg.device, generator=g).requires_grad_(mode == "fwd_bwd")
    dout = torch.randn(shape, device=cfg.device, generator=g).to(out_dtype)
    steps = {name: autocast_step(_forward(name, norm, mlp), x, dout, mode, low) for name in {"eager", method}}
    steps["exact"] = autocast_step(_forward("eager", norm, mlp), x, dout.float(), mode, None)

    rows, dim, hidden = cfg.batch * dims["tokens"], dims["dim"], dims["hidden"]
    size = torch.finfo(out_dtype).bits // 8
    weight_bytes = 2 * dim * hidden * size
    fwd_bytes = rows * dim * 4 + 2 * rows * hidden * size + rows * dim * size + weight_bytes
    bwd_bytes = rows * dim * size + 3 * rows * hidden * size + rows * dim * 4 + weight_bytes
    flops = 2 * rows * dim * hidden * 2 * (2 if mode == "fwd_bwd" else 1)
    benchmark.group = f"mlp-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": "x".join(map(str, shape)), "hidden": hidden, "dtype": str(out_dtype).removeprefix("torch."),
                  "bytes": fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0), "flops": flops})
    benchmark.extra_info["tflop_per_s"] = per_second(benchmark, flops / 1e12)


@pytest.mark.parametrize("method", METHODS)
def bench_mlp_fwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", METHODS)
def bench_mlp_fwd_bwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd_bwd")
