"""Peak memory of a training step with the frozen GEMM weights stored in bf16 (`vpt_fast.cast_frozen`,
issue 25 item 1) against the same step with them in float32, both under bf16 autocast.

    python benchmarks/bench_cast_frozen.py [--model vit_b] [--batch 8] [--recompute block] [--backend auto]

Each run is `vpt_fast.bench.memory.probe_step_memory` (one steady-state AdamW step, peak of the
process's anonymous resident memory on CPU, `torch.cuda.max_memory_allocated` on CUDA) in a fresh
process (`vpt_fast.bench.in_fresh_process`), with the model that `memory.build_method_model` builds
passed through `cast_frozen` for the bf16 rows. Two peaks per setting:

- `step`: the peak reset once the model is built (and cast), so it covers the parameters and
  buffers as trained, gradients, optimizer state, activations and workspace of the step: what the
  training loop holds. On CPU the resident-set high-water mark is reset (/proc/self/clear_refs); on
  CUDA the allocator's peak statistics.
- `with_build`: the probe's own peak, from before the model exists: it also covers building the
  float32 timm model, which holds every weight in float32 before the cast.

Not a pytest-benchmark file (nothing is timed): it prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

import vpt_fast
from vpt_fast.bench import BenchConfig, in_fresh_process, memory


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the resident set now


def probe(cfg: BenchConfig, method: memory.Method, cast: bool, count_build: bool) -> dict:
    """In this (fresh) process: `memory.probe_step_memory` with the built model cast (or not)."""
    build = memory.build_method_model

    def build_cast(cfg_: BenchConfig, method_: memory.Method) -> torch.nn.Module:
        model = build(cfg_, method_)
        if cast:
            vpt_fast.cast_frozen(model, cfg_.torch_dtype)
        if not count_build:
            _reset_peak(torch.device(cfg_.device))
        return model

    memory.build_method_model = build_cast  # probe_step_memory builds through this name
    try:
        return memory.probe_step_memory(cfg, method)
    finally:
        memory.build_method_model = build


def run(cfg: BenchConfig, method: memory.Method) -> dict:
    results = {}
    for cast in (False, True):
        for count_build in (False, True):
            key = f"{'bf16' if cast else 'fp32'}_frozen_{'with_build' if count_build else 'step'}"
            results[key] = in_fresh_process("benchmarks.bench_cast_frozen", {
                "cfg": asdict(cfg), "method": asdict(method), "cast": cast, "count_build": count_build})
            print(f"{key}: peak {results[key]['peak_bytes'] / 2**20:.1f} MiB "
                  f"(parameters + buffers {results[key]['param_bytes'] / 2**20:.1f} MiB)", file=sys.stderr)
    for what in ("step", "with_build"):
        bf16, fp32 = results[f"bf16_frozen_{what}"], results[f"fp32_frozen_{what}"]
        results[f"ratio_{what}"] = bf16["peak_bytes"] / fp32["peak_bytes"]
    return results


def main(argv=None) -> None:
    if argv is None and len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # a fresh-process request
        request = json.loads(sys.argv[1])
        print(json.dumps(probe(BenchConfig(**request["cfg"]), memory.Method(**request["method"]),
                               request["cast"], request["count_build"])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--shallow", action="store_true")
    parser.add_argument("--recompute", default="block", choices=["none", "mlp", "block"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cfg = BenchConfig(model=memory.resolve_model_name(args.model), batch=args.batch, num_prompts=args.num_prompts,
                      deep=not args.shallow, dtype=args.dtype, device=args.device)
    method = memory.Method(f"vpt_fast[{args.backend}] recompute={args.recompute}", "vpt", args.backend,
                           args.recompute)
    results = run(cfg, method)
    mib = 2 ** 20
    print(f"{cfg.model}, batch {cfg.batch}, P={cfg.num_prompts} {'deep' if cfg.deep else 'shallow'}, "
          f"{cfg.dtype} autocast, {method.label}, {cfg.device}")
    print("| frozen weights | step peak MiB | params+buffers MiB | peak incl. building MiB |")
    print("|---|---:|---:|---:|")
    for name in ("fp32", "bf16"):
        step, build = results[f"{name}_frozen_step"], results[f"{name}_frozen_with_build"]
        print(f"| {name} | {step['peak_bytes'] / mib:.1f} | {step['param_bytes'] / mib:.1f} | "
              f"{build['peak_bytes'] / mib:.1f} |")
    print(f"| ratio bf16/fp32 | {results['ratio_step']:.3f} | | {results['ratio_with_build']:.3f} |")
    print(json.dumps({"cfg": asdict(cfg), "method": asdict(method), **results}))


if __name__ == "__main__":
    main()
