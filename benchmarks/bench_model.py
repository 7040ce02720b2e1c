"""Whole-model VPT: training step (forward + backward + optimizer step on prompts and head) and
inference, eager release-style vs eager under torch.compile vs each vpt_fast backend (docs/design.md §6).

extra_info: FLOPs per step (FlopCounterMode), bytes saved for backward, CUDA peak memory, device
and versions. Ratios: `python benchmarks/summarize.py <json>` (same run only).
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import default_config, per_second, run_timed

import vpt_fast
from vpt_fast.backends import resolve_auto
from vpt_fast.bench import build_model, count_flops, make_batch, saved_activation_bytes, training_step

_CFG = default_config()
_BACKENDS = [b for b in vpt_fast.available_backends() if b != "reference"
             and not (b == "triton" and _CFG.device == "cpu")]  # the interpreter is not timed
_COMPILE = _CFG.device == "cuda" or os.environ.get("VPT_BENCH_COMPILE") == "1"
_FASTEST = resolve_auto("auto", torch.device(_CFG.device))
# "<backend>_mlp": the same backend with recompute="mlp" (norm2 + fc1 recomputed in backward);
# "<method>_compile": the same model under torch.compile
METHODS = (["eager"] + (["eager_compile"] if _COMPILE else []) + _BACKENDS + [f"{_FASTEST}_mlp"]
           + ([f"{_FASTEST}_compile"] if _COMPILE else []))


def _setup(method: str, cfg):
    name = method.removesuffix("_compile")
    backend = "reference" if name == "eager" else name.removesuffix("_mlp")
    model = build_model(cfg, backend, "mlp" if name.endswith("_mlp") else "none")
    x, y = make_batch(cfg, model)
    runner = torch.compile(model) if method.endswith("_compile") else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    return model, runner, x, y, optimizer


def _extra(benchmark, cfg, env_info, method, model, x, y, optimizer):
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"method": method, "model": cfg.model, "batch": cfg.batch, "dtype": cfg.dtype,
                                 "num_prompts": cfg.num_prompts, "deep": cfg.deep})
    if not method.endswith("_compile"):
        benchmark.extra_info["train_flops"] = count_flops(lambda: training_step(model, x, y, cfg))
        benchmark.extra_info["saved_activation_bytes"] = saved_activation_bytes(model, x, cfg)


@pytest.mark.parametrize("method", METHODS)
def bench_training_step(benchmark, cfg, env_info, method):
    model, runner, x, y, optimizer = _setup(method, cfg)
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run_timed(benchmark, lambda: training_step(runner, x, y, cfg, optimizer), cfg)
    if cfg.device == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    benchmark.extra_info["img_per_s"] = per_second(benchmark, cfg.batch)
    _extra(benchmark, cfg, env_info, method, model, x, y, optimizer)


@pytest.mark.parametrize("method", METHODS)
def bench_inference(benchmark, cfg, env_info, method):
    model, runner, x, y, optimizer = _setup(method, cfg)

    def infer():
        with torch.inference_mode(), torch.autocast(cfg.device, dtype=cfg.torch_dtype,
                                                    enabled=cfg.torch_dtype != torch.float32):
            return runner(x)

    run_timed(benchmark, infer, cfg)
    benchmark.extra_info["img_per_s"] = per_second(benchmark, cfg.batch)
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({"method": method, "model": cfg.model, "batch": cfg.batch})
