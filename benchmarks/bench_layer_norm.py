"""Frozen LayerNorm on the rows of a ViT block, forward and forward + input gradient: torch eager
(`F.layer_norm`), the same under `torch.compile`, and each vpt_fast backend's `layer_norm` op (what
the blocks run for norm1 / norm2, `feeds_matmul=True`).

Shape (B, tokens, D) of the benchmark model (conftest `cfg`): ViT-B/16 (128, 197, 768) under bf16
autocast on CUDA, ViT-S/16 (8, 197, 384) fp32 on the CPU. The backbone is frozen: weight and bias
need no gradient, the input does. Under autocast the rows are float32 (the residual stream) and the
output feeds a matmul, so it is wanted in the autocast dtype: eager writes float32 and casts (what
the next matmul's autocast does; inside the timed region), vpt_fast writes the low dtype once.

extra_info "bytes" is the roofline traffic of one call, every tensor read or written once:
fwd = x + y + weight + bias; fwd_bwd = fwd + mean/rstd written, then dy + x + mean/rstd + weight read
and dx written. "gb_per_s" = bytes / median time. ~1 FLOP per byte: memory-bound.
Methods: eager, compile (on CUDA, or with VPT_BENCH_COMPILE=1), torch, triton (CUDA only: the
interpreter is not timed). The "cuda" backend runs these ops with triton or torch, so it is left out.
Each method's output and input gradient are checked against eager's before timing.
Run: `pytest benchmarks/bench_layer_norm.py --benchmark-only`; compare ratios within one run only
(`python benchmarks/summarize.py`).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional, Sequence

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import default_config, per_second, run_timed
from torch import Tensor, nn

from vpt_fast.backends import backend_module
from vpt_fast.bench import BenchConfig
from vpt_fast.ops.layer_norm import layer_norm

_CFG = default_config()
COMPILE = _CFG.device == "cuda" or os.environ.get("VPT_BENCH_COMPILE") == "1"
BACKENDS = [name for name in ("torch", "triton")
            if backend_module(name) is not None and not (name == "triton" and _CFG.device != "cuda")]
METHODS = ["eager"] + (["compile"] if COMPILE else []) + BACKENDS
ROUNDS = 50 if _CFG.device == "cuda" else 10

Step = Callable[[], tuple[Tensor, ...]]


@functools.lru_cache
def vit_dims(model_name: str) -> dict:
    """Token count, width, LayerNorm eps and MLP hidden width of the timm ViT `model_name` (built on
    the meta device: no weights are allocated)."""
    with torch.device("meta"):
        model = timm.create_model(model_name)
    block = model.blocks[0] if hasattr(model, "blocks") and hasattr(model, "patch_embed") else None
    if block is None or not isinstance(getattr(block, "norm1", None), nn.LayerNorm):
        raise ValueError(f"VPT_BENCH_MODEL must name a timm ViT with LayerNorm blocks, got {model_name!r}")
    return {"tokens": model.patch_embed.num_patches + model.num_prefix_tokens, "dim": model.embed_dim,
            "eps": block.norm1.eps, "hidden": block.mlp.fc1.out_features}


def low_dtype(cfg: BenchConfig) -> Optional[torch.dtype]:
    """The autocast dtype of `cfg`, or None when it runs in float32 (no autocast)."""
    return None if cfg.torch_dtype == torch.float32 else cfg.torch_dtype


def check_matches_eager(method: str, got: Sequence[Tensor], eager: Sequence[Tensor],
                        exact: Sequence[Tensor]) -> float:
    """Fail unless every result of `method` matches eager's; return the largest |got - eager|.

    Args:
        method: the benchmarked method, for the message.
        got, eager: the method's and eager's results (output, then gradients), same dtypes.
        exact: the same results computed in float32 from the same inputs. Float32 results must be
            within 1e-5 (rtol and atol) of eager's; a low-precision result, which eager rounds too,
            must be at most twice as far from `exact` as eager's is, plus one unit in the last place
            of the largest |exact| (the rounding step where eager's own error may happen to be small).
    """
    largest = 0.0
    for index, (mine, theirs, ref) in enumerate(zip(got, eager, exact, strict=True)):
        what = f"{method}: result {index} ({tuple(mine.shape)})"
        if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
            raise AssertionError(f"{what}: expected eager's {theirs.dtype} {tuple(theirs.shape)}, "
                                 f"got {mine.dtype} {tuple(mine.shape)}")
        if mine.dtype == torch.float32:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, what=what: f"{what} vs eager: {m}")
        else:
            error = (mine.float() - ref).abs().max().item()
            eager_error = (theirs.float() - ref).abs().max().item()
            top_ulp = math.ldexp(torch.finfo(mine.dtype).eps, math.frexp(ref.abs().max().item())[1] - 1)
            if error > 2 * eager_error + top_ulp:
                raise AssertionError(f"{what}: max error {error:.3g} against float32, more than twice "
                                     f"eager's {eager_error:.3g} + {top_ulp:.3g} (one ulp at the largest value)")
        largest = max(largest, (mine.float() - theirs.float()).abs().max().item())
    return largest


def time_checked(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str, steps: dict[str, Step],
                 extra: dict) -> None:
    """Check `steps[method]` against `steps["eager"]` (and `steps["exact"]`), then time it.

    Args:
        steps: "eager", "exact" (float32) and `method`, each a call returning (output, *gradients).
        extra: shape, dtypes and "bytes" of one call, for extra_info.
    """
    diff = check_matches_eager(method, steps[method](), steps["eager"](), steps["exact"]())
    run_timed(benchmark, steps[method], cfg, rounds=ROUNDS)
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(extra, method=method, mode=mode, max_abs_diff_vs_eager=diff,
                                gb_per_s=per_second(benchmark, extra["bytes"] / 1e9))


def _frozen_norm(dim: int, eps: float, device: str) -> nn.LayerNorm:
    g = torch.Generator().manual_seed(1)
    norm = nn.LayerNorm(dim, eps=eps)
    with torch.no_grad():  # away from the identity affine, so a dropped weight or bias shows
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
        norm.bias.copy_(0.1 * torch.randn(dim, generator=g))
    return norm.requires_grad_(False).to(device)


def _forward(method: str, norm: nn.LayerNorm, out_dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    if method in ("eager", "compile"):
        def eager(x: Tensor) -> Tensor:
            return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps).to(out_dtype)
        return torch.compile(eager) if method == "compile" else eager
    return lambda x: layer_norm(x, norm, method, feeds_matmul=True)


def autocast_step(forward: Callable[[Tensor], Tensor], x: Tensor, dy: Tensor, mode: str,
                  autocast: Optional[torch.dtype]) -> Step:
    """One call of `forward(x)` under `autocast` (None: off), with x's gradient for `dy` in "fwd_bwd"."""
    def step() -> tuple[Tensor, ...]:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            y = forward(x)
        return (y,) if mode == "fwd" else (y, *torch.autograd.grad(y, x, dy))
    return step


def _bench(benchmark, cfg: BenchConfig, env_info: dict, method: str, mode: str) -> None:
    dims = vit_dims(cfg.model)
    shape = (cfg.batch, dims["tokens"], dims["dim"])
    norm = _frozen_norm(dims["dim"], dims["eps"], cfg.device)
    low = low_dtype(cfg)
    out_dtype = low or torch.float32
    g = torch.Generator(device=cfg.device).manual_seed(0)
    x = torch.randn(shape, device=cfg.device, generator=g).requires_grad_(mode == "fwd_bwd")
    dy = torch.randn(shape, device=cfg.device, generator=g).to(out_dtype)
    steps = {name: autocast_step(_forward(name, norm, out_dtype), x, dy, mode, low) for name in {"eager", method}}
    steps["exact"] = autocast_step(_forward("eager", norm, torch.float32), x, dy.float(), mode, None)

    activation, rows, dim = x.numel(), x.numel() // dims["dim"], dims["dim"]
    x_bytes, y_bytes = activation * x.element_size(), activation * dy.element_size()
    stats_bytes, weight_bytes = 2 * rows * 4, dim * norm.weight.element_size()
    fwd_bytes = x_bytes + y_bytes + 2 * weight_bytes
    bwd_bytes = stats_bytes + y_bytes + x_bytes + stats_bytes + weight_bytes + x_bytes
    benchmark.group = f"layer_norm-{mode}"
    time_checked(benchmark, cfg, env_info, method, mode, steps,
                 {"shape": "x".join(map(str, shape)), "in_dtype": "float32",
                  "out_dtype": str(out_dtype).removeprefix("torch."),
                  "bytes": fwd_bytes + (bwd_bytes if mode == "fwd_bwd" else 0)})


@pytest.mark.parametrize("method", METHODS)
def bench_layer_norm_fwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd")


@pytest.mark.parametrize("method", METHODS)
def bench_layer_norm_fwd_bwd(benchmark, cfg, env_info, method):
    _bench(benchmark, cfg, env_info, method, "fwd_bwd")
