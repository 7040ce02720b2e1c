"""The memory planner (`vpt-fast memory --plan`, `vpt_fast.bench.plan`): predicted peaks of a training
step from a simulation on fake tensors, checked for sense on ViT, Swin and DINOv3, for not allocating
the model, and against a measured step. The README's accuracy table (ViT-S/B, batches 8 and 32, every
method) is the full check; this file stays under a minute."""
from __future__ import annotations

import resource
import time

import pytest

from vpt_fast.bench import BenchConfig
from vpt_fast.bench.memory import methods, step_memory
from vpt_fast.bench.plan import plan, plan_methods, simulate_step, step_model
from vpt_fast.cli import main

SMALL = {  # two blocks (Swin: two stages, a shifted block in the second), so that each plan takes seconds
    "vit_small_patch16_224": {"depth": 2},
    "swin_tiny_patch4_window7_224": {"depths": (1, 2), "num_heads": (3, 6)},
    "vit_small_patch16_dinov3": {"depth": 2},
}


def _plan(model: str, keys, batches=(8, 64), dtype="float32", **kwargs):
    catalogue = plan_methods()
    return plan(BenchConfig(model=model, dtype=dtype, model_kwargs=SMALL[model]), {k: catalogue[k] for k in keys},
                batches, **kwargs)


@pytest.mark.parametrize("model", list(SMALL))
def test_plans_are_monotone(model):
    """Peaks grow with the batch, the methods keep their order (at a large batch: eager > vpt_fast >
    recompute="mlp" and "block" > linear probe; with two blocks "block" need not beat "mlp"), the largest
    batch grows as the peak shrinks. Every method on ViT; on Swin and DINOv3 (slower to simulate) two."""
    vit = model == "vit_small_patch16_224"
    chains = ([["eager", "vpt_fast", "vpt_fast_block", "linear"], ["full", "vpt_fast", "vpt_fast_mlp", "linear"]]
              if vit else [["eager", "vpt_fast"]])
    results = _plan(model, sorted({k for chain in chains for k in chain}), budgets=[2**30])
    for r in results.values():
        assert 0 < r["peak_bytes"][8] < r["peak_bytes"][64]
        assert r["largest_batch"][2**30] > 0
    for chain in chains:
        peaks = [results[k]["peak_bytes"][64] for k in chain]
        assert peaks == sorted(peaks, reverse=True), dict(zip(chain, peaks))
        batches = [results[k]["largest_batch"][2**30] for k in chain]
        assert batches == sorted(batches), dict(zip(chain, batches))
    if vit:  # what the model holds: full fine-tuning's gradients and AdamW's two moments are 3x its parameters
        full = results["full"]
        assert full["grad_bytes"] + full["optimizer_bytes"] >= 3 * 0.99 * full["param_bytes"]


def test_largest_batch_is_where_the_peak_meets_the_budget():
    model = step_model(BenchConfig(model="vit_small_patch16_224", model_kwargs=SMALL["vit_small_patch16_224"]),
                       methods()["vpt_fast"])
    budget = model.peak(37)
    assert model.largest_batch(budget) == 37 and model.peak(38) > budget
    assert model.largest_batch(model.peak(1) - 1) == 0


def test_fsdp_shards_state_and_bf16_frozen_weights_halve_them():
    cfg = BenchConfig(model="vit_small_patch16_224", model_kwargs=SMALL["vit_small_patch16_224"])
    full = step_model(cfg, methods()["full"])
    info, in_flight = full.info, full._in_flight(8, True)
    assert in_flight == 3 * info.block_param_bytes > 0  # two blocks' weights, one block's gradients
    always_sharded = info.param_bytes + info.optimizer_bytes  # alive at every recorded point
    for batch in (1, 8):
        one, eight = full.peak(batch), full.peak(batch, gpus=8, fsdp=True)
        assert one - 7 / 8 * (always_sharded + info.grad_bytes) + in_flight <= eight
        assert eight <= one - 7 / 8 * always_sharded + in_flight
    assert full.largest_batch(2**30, 8, True) > full.largest_batch(2**30)
    assert full.peak(8, gpus=8) == full.peak(8)  # DDP: every GPU holds everything
    bf16 = _plan("vit_small_patch16_224", ["vpt_fast", "vpt_fast_bf16w"], batches=(8,), dtype="bfloat16")
    params = bf16["vpt_fast"]["param_bytes"]
    saved = params - bf16["vpt_fast_bf16w"]["param_bytes"]
    assert 0.3 * params < saved < 0.5 * params  # the GEMM weights: most of the backbone, but not the embeddings
    assert bf16["vpt_fast_bf16w"]["peak_bytes"][8] <= bf16["vpt_fast"]["peak_bytes"][8] - saved


def test_a_7b_model_plans_without_allocating_it():
    """DINOv3-7B (6.7e9 parameters, 27 GB in fp32: more than this machine has) is built on the meta
    device and its step simulated on fake tensors: the process's resident peak barely moves."""
    start, rss_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trace = simulate_step(BenchConfig(model="vit_7b_patch16_dinov3", batch=2, dtype="bfloat16"),
                          methods()["vpt_fast_block"], frozen_bf16=True)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert grown < 2**30, f"resident peak grew by {grown / 2**30:.2f} GiB"
    assert 6.5e9 < trace.param_bytes / 2 < 7.0e9  # most of it bf16 now
    assert max(live for live, _ in trace.trace) > trace.param_bytes
    assert time.perf_counter() - start < 120  # about 15 s on this 2-core machine when idle


def test_cli_plan_prints_a_table(capsys):
    main(["memory", "--plan", "--model", "test_vit", "--dtype", "bf16", "--device-memory", "1GiB", "--gpus", "2",
          "--fsdp", "--batches", "4", "--methods", "eager,vpt_fast_bf16w"])
    out = capsys.readouterr().out
    assert "2 GPUs, FSDP (per GPU)" in out and "largest @ 1 GiB" in out
    assert "vpt_fast[auto] +bf16 frozen" in out and "eager VPT" in out


@pytest.mark.parametrize("argv, message", [
    (["--plan", "--device-memory", "80XB"], "argument --device-memory: a size must look like"),
    (["--device-memory", "80GiB"], "go with --plan"),
    (["--plan", "--fsdp"], "--fsdp shards over --gpus N with N >= 2"),
    (["--plan", "--methods", "vpt_fast_bf16w"], "need --dtype bf16"),
    (["--plan", "--total", "--gpus", "8"], "describe another one"),
    (["--plan", "--max-batch"], "--max-batch, --budget and --batch-limit measure it"),
])
def test_bad_plan_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "--model", "vit_t", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_prediction_matches_a_measured_step():
    """ViT-Ti/16, batch 16, 50 deep prompts, fp32: vpt_fast's simulated peak within 10% of the measured
    CPU peak (a fresh process, `probe_step_memory`); the README's table checks every method on ViT-S/B."""
    cfg = BenchConfig(model="vit_tiny_patch16_224", batch=16)
    method = methods()["vpt_fast"]
    predicted = max(live for live, _ in simulate_step(cfg, method).trace)
    measured = step_memory(cfg, method)["peak_bytes"]
    assert predicted == pytest.approx(measured, rel=0.10)
