"""Exact work and memory counts (docs/design.md §2): FLOPs counted by
FlopCounterMode, bytes saved for backward by saved_tensors_hooks, and resident activation memory in
fresh processes — all below eager release-style VPT. Timings live in benchmarks/, not here."""
from __future__ import annotations

from functools import partial

import pytest

from vpt_fast.bench import (
    BenchConfig,
    activation_memory,
    build_model,
    count_flops,
    make_batch,
    saved_activation_bytes,
    training_step,
)

pytestmark = pytest.mark.slow  # ViT-S/16 models, memory probes in fresh processes

CFG = BenchConfig(model="vit_small_patch16_224", batch=2, num_prompts=50, deep=True)


@pytest.fixture(scope="module")
def counts():
    result = {}
    for backend, recompute in [("reference", "none"), ("torch", "none"), ("torch", "mlp"), ("torch", "block")]:
        model = build_model(CFG, backend, recompute)
        x, y = make_batch(CFG, model)
        result[(backend, recompute)] = (count_flops(partial(training_step, model, x, y, CFG)),
                                        saved_activation_bytes(model, x, CFG))
    return result


@pytest.mark.parametrize("recompute,max_flops,max_saved", [("none", 0.75, 0.84), ("mlp", None, 0.55),
                                                            ("block", 1.25, 0.15)])
def test_flops_and_saved_bytes_below_eager(counts, recompute, max_flops, max_saved):
    eager_flops, eager_saved = counts[("reference", "none")]
    flops, saved = counts[("torch", recompute)]
    if max_flops is not None:
        assert flops / eager_flops <= max_flops
    assert saved / eager_saved <= max_saved


def test_resident_activation_memory_below_eager():
    cfg = BenchConfig(model="vit_small_patch16_224", batch=4, num_prompts=50, deep=True)
    eager = activation_memory(cfg, "reference")["activation_bytes"]
    assert eager > 0
    for recompute, limit in [("none", 0.84), ("mlp", 0.55), ("block", 0.15)]:
        held = activation_memory(cfg, "torch", recompute)["activation_bytes"]
        assert held / eager <= limit, f"recompute={recompute}: {held / eager:.3f}"
