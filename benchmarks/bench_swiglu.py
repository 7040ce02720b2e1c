"""SwiGLU, forward and forward + input gradient, two ways:

- `swiglu`: the gate silu(gate) * up on the halves of a packed fc1 output (timm `GluMlp`'s chunk):
  PyTorch eager (`F.silu(gate) * up`), the same under `torch.compile`, and each vpt_fast backend's
  `swiglu_fwd` / `swiglu_bwd` primitives. extra_info "bytes": fwd = gate + up + out; fwd_bwd = fwd +
  dout + gate + up read and dgate + dup written. Memory-bound.
- `swiglu_mlp`: a frozen timm `SwiGLU` MLP (fc1_g, fc1_x, SiLU, fc2): the module itself (eager and
  compiled, autograd saving what it saves) and each backend's `swiglu_mlp` op (one autograd node, dX
  only). GEMM-bound; "bytes" is not reported.

Shape: (B * tokens, hidden) of the benchmark model (conftest `cfg`) with SwiGLU's hidden width 2/3 of
the ViT MLP's (ViT-B/16: 128 * 197 rows, 2048 per half, bf16 under autocast on CUDA; ViT-S/16: 8 * 197
rows, 1024, fp32 on the CPU). The MLP is frozen: its weights need no gradient, its input does.
Methods: eager, compile (on CUDA, or with VPT_BENCH_COMPILE=1), torch, triton (CUDA only: the
interpreter is not timed); "cuda" runs these ops with triton or torch, so it is left out. Each
method's output and input gradients are checked against eager's before timing.
Run: `pytest benchmarks/bench_swiglu.py --benchmark-only`; compare ratios within one run only
(`python benchmarks/summarize.py`).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from bench_layer_norm import METHODS, Step, autocast_step, low_dtype, time_checked, vit_dims
from timm.layers import SwiGLU
from torch import Tensor

from vpt_fast.backends import backend_module
from vpt_fast.bench import BenchConfig
from vpt_fast.ops.swiglu import swiglu_mlp


def _hidden(dims: dict) -> int:
    return dims["hidden"] * 2 // 3


def _gate_step(method: str, h: Tensor, dout: Tensor, mode: str) -> Step:
    gate, up = h.chunk(2, dim=-1)
    if method in ("eager", "compile"):
        def forward(gate: Tensor, up: Tensor) -> Tensor:
            return F.silu(gate) * up

        run = torch.compile(forward) if method == "compile" else forward
        if mode == "fwd":
            return lambda: (run(gate, up),)
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()

        def fwd_bwd() -> tuple[Tensor, ...]:
            out = run(g, u)
            return (out, *torch.autograd.grad(out, (g, u), dout))
        return fwd_bwd
    module = backend_module(method)
    if mode == "fwd":
        return lambda: (module.swiglu_fwd(gate, up),)
    return lambda: (module.swiglu_fwd(gate, up), *module.swiglu_bwd(dout, gate, up))


def _bench_gate(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    dims = vit_dims(cfg.model)
    rows, hidden = cfg.batch * dims["tokens"], _hidden(dims)
    g = torch.Generator(device=cfg.device).manual_seed(0)
    h = torch.randn(rows, 2 * hidden, device=cfg.device, generator=g).to(cfg.torch_dtype)
    dout = torch.randn(rows, hidden, device=cfg.device, generator=g).to(cfg.torch_dtype)
    steps: dict[str, Step] = {name: _gate_step(name, h, dout, mode) for name in {"eager", method}}
    steps["exact"] = _gate_step("eager", h.float(), dout.float(), mode)
    tensor_bytes = rows * hidden * h.element_size()
    benchmark.group = f"swiglu-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": f"{rows}x{hidden}", "dtype": cfg.dtype,
                  "bytes": 3 * tensor_bytes + (5 * tensor_bytes if mode == "fwd_bwd" else 0)})


def _frozen_mlp(dim: int, hidden: int, device: str) -> SwiGLU:
    torch.manual_seed(1)
    return SwiGLU(dim, hidden).eval().requires_grad_(False).to(device)


def _mlp_forward(method: str, mlp: SwiGLU) -> Callable[[Tensor], Tensor]:
    if method in ("eager", "compile"):
        return torch.compile(mlp) if method == "compile" else mlp
    return lambda x: swiglu_mlp(x, mlp, method)


def _bench_mlp(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    dims = vit_dims(cfg.model)
    shape = (cfg.batch, dims["tokens"], dims["dim"])
    mlp = _frozen_mlp(dims["dim"], _hidden(dims), cfg.device)
    low = low_dtype(cfg)
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x = torch.randn(shape, device=cfg.device, generator=g).requires_grad_(mode == "fwd_bwd")
    dout = torch.randn(shape, device=cfg.device, generator=g).to(low or torch.float32)
    steps = {name: autocast_step(_mlp_forward(name, mlp), x, dout, mode, low) for name in {"eager", method}}
    steps["exact"] = autocast_step(_mlp_forward("eager", mlp), x, dout.float(), mode, None)
    benchmark.group = f"swiglu_mlp-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": "x".join(map(str, shape)), "hidden": _hidden(dims), "dtype": cfg.dtype, "bytes": 0})


@pytest.mark.parametrize("method", METHODS)
def bench_swiglu_fwd(benchmark, cfg, env_info, method):
    _bench_gate(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", METHODS)
def bench_swiglu_fwd_bwd(benchmark, cfg, env_info, method):
    _bench_gate(benchmark, cfg, env_info, method, "fwd_bwd")


@pytest.mark.parametrize("method", METHODS)
def bench_swiglu_mlp_fwd(benchmark, cfg, env_info, method):
    _bench_mlp(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", METHODS)
def bench_swiglu_mlp_fwd_bwd(benchmark, cfg, env_info, method):
    _bench_mlp(benchmark, cfg, env_info, method, "fwd_bwd")
