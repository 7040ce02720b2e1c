"""Measurement: what `vpt-fast bench` / `vpt-fast memory` and the benchmark suite (benchmarks/) share.

- `vpt_fast.bench` (this package, from `core`): the benchmark setting (`BenchConfig`), building its
  model and batch, a training step, FLOP and saved-activation counts, interleaved timing, resident
  activation memory in a fresh process, the environment, and `vpt-fast bench`'s table.
- `vpt_fast.bench.memory`: peak memory of a whole training step (`vpt-fast memory --total/--max-batch`).
- `vpt_fast.bench.serving`: many tasks served from one backbone (`vpt-fast bench --inference`).

The two submodules are imported by name, not here: each answers its fresh-process probes as
`python -m vpt_fast.bench.<module>`, which must not find it imported already.
"""
from vpt_fast.bench.core import (
    BenchConfig,
    activation_memory,
    autocast,
    bench_backends,
    build_model,
    check_model,
    count_flops,
    create_timm_model,
    environment,
    flop_mapping,
    format_table,
    in_fresh_process,
    infer,
    interleaved_times,
    make_batch,
    probe_activation_memory,
    run_bench,
    saved_activation_bytes,
    source_revision,
    training_step,
)

__all__ = [
    "BenchConfig", "activation_memory", "autocast", "bench_backends", "build_model", "check_model", "count_flops",
    "create_timm_model", "environment", "flop_mapping", "format_table", "in_fresh_process", "infer",
    "interleaved_times", "make_batch", "probe_activation_memory", "run_bench", "saved_activation_bytes",
    "source_revision", "training_step",
]
