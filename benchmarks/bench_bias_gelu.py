"""Bias + exact (erf) GELU on a ViT MLP's hidden activations, forward and forward + input gradient:
torch eager (`F.gelu(h + b)`), the same under `torch.compile`, and each vpt_fast backend's
`bias_gelu_fwd` / `bias_gelu_bwd` primitives (what `vpt_fast.ops.mlp.norm_mlp` runs between fc1 and
fc2; the model folds fc1's bias into the GEMM and passes none, this times the primitive with it).

Shape (B * tokens, hidden) of the benchmark model (conftest `cfg`): ViT-B/16 (128 * 197, 3072) in
bf16 (fc1's output and bias under autocast) on CUDA, ViT-S/16 (8 * 197, 1536) fp32 on the CPU. The
backbone is frozen: the bias needs no gradient, h does.

extra_info "bytes" is the roofline traffic of one call, every tensor read or written once:
fwd = h + bias + out; fwd_bwd = fwd + dout + h + bias read and dh written (the backward recomputes
h + bias instead of reading a saved sum). "gb_per_s" = bytes / median time. Memory-bound.
Methods: eager, compile (on CUDA, or with VPT_BENCH_COMPILE=1), torch, triton (CUDA only: the
interpreter is not timed); "cuda" runs this op with triton or torch, so it is left out. Each method's
output and input gradient are checked against eager's before timing.
Run: `pytest benchmarks/bench_bias_gelu.py --benchmark-only`; compare ratios within one run only
(`python benchmarks/summarize.py`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bench_layer_norm import METHODS, Step, time_checked, vit_dims
from torch import Tensor

from vpt_fast.backends import backend_module
from vpt_fast.bench import BenchConfig


def _eager_step(h: Tensor, bias: Tensor, dout: Tensor, mode: str, compiled: bool) -> Step:
    def forward(h: Tensor) -> Tensor:
        return F.gelu(h + bias)

    run = torch.compile(forward) if compiled else forward
    if mode == "fwd":
        return lambda: (run(h),)
    h = h.detach().requires_grad_()

    def fwd_bwd() -> tuple[Tensor, ...]:
        out = run(h)
        return (out, *torch.autograd.grad(out, h, dout))
    return fwd_bwd


def _backend_step(backend: str, h: Tensor, bias: Tensor, dout: Tensor, mode: str) -> Step:
    module = backend_module(backend)

    def fwd_bwd() -> tuple[Tensor, ...]:
        return module.bias_gelu_fwd(h, bias), module.bias_gelu_bwd(dout, h, bias)
    return (lambda: (module.bias_gelu_fwd(h, bias),)) if mode == "fwd" else fwd_bwd


def _method_step(method: str, h: Tensor, bias: Tensor, dout: Tensor, mode: str) -> Step:
    if method in ("eager", "compile"):
        return _eager_step(h, bias, dout, mode, compiled=method == "compile")
    return _backend_step(method, h, bias, dout, mode)


def _bench(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    dims = vit_dims(cfg.model)
    shape = (cfg.batch * dims["tokens"], dims["hidden"])
    g = torch.Generator(device=cfg.device).manual_seed(0)
    h, dout = (torch.randn(shape, device=cfg.device, generator=g).to(cfg.torch_dtype) for _ in range(2))
    bias = (0.1 * torch.randn(dims["hidden"], device=cfg.device, generator=g)).to(cfg.torch_dtype)
    steps: dict[str, Step] = {name: _method_step(name, h, bias, dout, mode) for name in {"eager", method}}
    steps["exact"] = _eager_step(h.float(), bias.float(), dout.float(), mode, compiled=False)

    size = h.element_size()
    activation_bytes, bias_bytes = h.numel() * size, dims["hidden"] * size
    fwd_bytes = 2 * activation_bytes + bias_bytes
    bwd_bytes = 3 * activation_bytes + bias_bytes
    benchmark.group = f"bias_gelu-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": "x".join(map(str, shape)), "dtype": cfg.dtype,
                  "bytes": fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0)})


@pytest.mark.parametrize("method", METHODS)
def bench_bias_gelu_fwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", METHODS)
def bench_bias_gelu_fwd_bwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd_bwd")
