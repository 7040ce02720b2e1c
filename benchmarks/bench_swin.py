"""Prompted Swin (docs/design.md §1 "Swin", §6): a training step (forward + backward of the cross-entropy
on prompts and head), eager release-style VPT (`reference`) vs each vpt_fast backend, and on CUDA the
fastest backend under torch.compile.

CPU: Swin-T 224px, 50 deep prompts, batch 2, fp32. CUDA: Swin-B 224px (the GPU target model),
50 deep prompts, batch 64, bf16 autocast. Override with
VPT_BENCH_SWIN_MODEL / VPT_BENCH_SWIN_BATCH / VPT_BENCH_DTYPE. extra_info: FLOPs per step
(FlopCounterMode, CPU flash attention counted by `vpt_fast.bench.flop_mapping`), bytes saved for
backward, CUDA peak memory above the resident state, device and versions. Compare ratios within one run only.
"""
from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch
from conftest import default_config, per_second, run_timed

import vpt_fast
from vpt_fast.backends import resolve_auto
from vpt_fast.bench import count_flops, create_timm_model, make_batch, saved_activation_bytes, training_step
from vpt_fast.config import PromptConfig
from vpt_fast.models.swin import prompt_swin


def swin_config():
    cfg = default_config()
    cuda = cfg.device == "cuda"
    default_model = "swin_base_patch4_window7_224" if cuda else "swin_tiny_patch4_window7_224"
    return dataclasses.replace(
        cfg, model=os.environ.get("VPT_BENCH_SWIN_MODEL", default_model),
        batch=int(os.environ.get("VPT_BENCH_SWIN_BATCH", 64 if cuda else 2)), num_prompts=50, deep=True)


_CFG = swin_config()
_BACKENDS = [b for b in vpt_fast.available_backends() if b != "reference"
             and (b == "torch" or _CFG.device == "cuda")]  # triton/cuda: timed on a CUDA device only
_COMPILE = _CFG.device == "cuda" or os.environ.get("VPT_BENCH_COMPILE") == "1"
# "<method>_compile": the same model under torch.compile
METHODS = (["eager"] + _BACKENDS
           + ([f"{resolve_auto('auto', torch.device(_CFG.device))}_compile"] if _COMPILE else []))


def build_swin(cfg, backend: str) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = create_timm_model(cfg)
    model = prompt_swin(model, PromptConfig(num_prompts=cfg.num_prompts, deep=cfg.deep, backend=backend))
    with torch.no_grad():  # random, not initial, prompts
        for p in model.vpt.prompts:
            p.normal_(0, 0.5)
    return model.to(cfg.device).train()


@pytest.mark.parametrize("method", METHODS)
def bench_swin_training_step(benchmark, env_info, method):
    cfg = _CFG
    name = method.removesuffix("_compile")
    model = build_swin(cfg, "reference" if name == "eager" else name)
    x, y = make_batch(cfg, model)
    runner = torch.compile(model) if method.endswith("_compile") else model
    if cfg.device == "cuda":  # peak above what is resident before the step (models of earlier
        gc.collect()          # methods may still be referenced by pytest-benchmark)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    run_timed(benchmark, lambda: training_step(runner, x, y, cfg), cfg)
    if cfg.device == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - resident
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({
        "method": method, "model": cfg.model, "batch": cfg.batch, "dtype": cfg.dtype,
        "num_prompts": cfg.num_prompts, "deep": cfg.deep,
        "img_per_s": per_second(benchmark, cfg.batch),
        "train_flops": count_flops(lambda: training_step(model, x, y, cfg)),
        "saved_activation_bytes": saved_activation_bytes(model, x, cfg),
    })
