"""Where a training step's time goes: torch.profiler's top kernels for eager VPT and each backend.

    python benchmarks/profile_step.py --device cuda --dtype bfloat16 --batch 128 [--backends triton,cuda]

Prints, per method, the median step time and the operators (CPU) or kernels (CUDA) with the most
self time, so a GPU session can see in one call which passes dominate before changing code.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import vpt_fast
from vpt_fast.bench import BenchConfig, build_model, make_batch, training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--backends", default="", help="comma list (default: every available backend)")
    parser.add_argument("--recompute", default="none", choices=["none", "mlp", "block"])
    parser.add_argument("--rows", type=int, default=15, help="operators/kernels listed per method")
    args = parser.parse_args()
    cfg = BenchConfig(model=args.model, batch=args.batch, num_prompts=args.prompts, dtype=args.dtype,
                      device=args.device, img_size=args.img_size, recompute=args.recompute)
    cuda = args.device.startswith("cuda")
    backends = [b for b in args.backends.split(",") if b] or [
        b for b in vpt_fast.available_backends() if b != "reference" and (cuda or b != "triton")]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for method, backend in [("eager", "reference")] + [(f"vpt_fast[{b}]", b) for b in backends]:
        model = build_model(cfg, backend)
        x, y = make_batch(cfg, model)
        times = []
        for _ in range(6):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            training_step(model, x, y, cfg)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        with profile(activities=activities) as prof:
            training_step(model, x, y, cfg)
            if cuda:
                torch.cuda.synchronize()
        print(f"\n=== {method}: median step {statistics.median(times[1:]) * 1e3:.1f} ms "
              f"({cfg.batch / statistics.median(times[1:]):.1f} img/s)")
        print(prof.key_averages().table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=60))
        del model


if __name__ == "__main__":
    main()
