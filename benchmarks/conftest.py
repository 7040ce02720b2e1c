"""Benchmark configuration: one setting per device, shared by every bench_*.py.

CUDA: ViT-B/16, 224px, batch 128, 50 deep prompts, bf16 autocast (the GPU headline shape).
CPU: ViT-S/16, batch 8, 50 deep prompts, fp32 (the `vpt-fast bench` default).
Override with VPT_BENCH_MODEL / VPT_BENCH_BATCH / VPT_BENCH_DTYPE. Every result carries the device
and versions in extra_info; compare ratios within one run only (`python benchmarks/summarize.py`).
"""
from __future__ import annotations

import os

import pytest
import torch

from vpt_fast.bench import BenchConfig, environment

if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def default_config() -> BenchConfig:
    cuda = torch.cuda.is_available()
    return BenchConfig(
        model=os.environ.get("VPT_BENCH_MODEL", "vit_base_patch16_224" if cuda else "vit_small_patch16_224"),
        batch=int(os.environ.get("VPT_BENCH_BATCH", 128 if cuda else 8)),
        dtype=os.environ.get("VPT_BENCH_DTYPE", "bfloat16" if cuda else "float32"),
        device="cuda" if cuda else "cpu",
        num_prompts=50, deep=True,
    )


@pytest.fixture(scope="session")
def cfg() -> BenchConfig:
    return default_config()


@pytest.fixture(scope="session")
def env_info() -> dict:
    return environment()


def per_second(benchmark, amount: float) -> float | None:
    """`amount` over the median time of one timed call; None under --benchmark-disable (nothing is timed)."""
    return None if benchmark.stats is None else amount / benchmark.stats.stats.median


def run_timed(benchmark, fn, cfg: BenchConfig, rounds: int | None = None):
    """pytest-benchmark with device synchronisation inside the timed call."""
    cuda = cfg.device.startswith("cuda")

    def call():
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out

    rounds = rounds or (20 if cuda else 3)
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=3 if cuda else 1)
