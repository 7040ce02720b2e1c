"""Serving many tasks from one backbone (docs/design.md §8): inference (eval, no gradients) of the
bare backbone (timm, no prompts), eager release-style VPT, vpt_fast with cached prompt K/V, and
PromptBanks with 1, 8 and 64 tasks mixed in one batch against one forward per task group.

extra_info: FLOPs per batch (FlopCounterMode), device and versions. Ratios: `python
benchmarks/summarize.py <json>` (same run only). `vpt-fast bench --inference` prints the same table.
"""
from __future__ import annotations

import pytest
import torch
from conftest import per_second, run_timed

from vpt_fast.bench import build_model, count_flops, create_timm_model, infer, make_batch
from vpt_fast.bench.serving import infer_bank, make_bank, task_ids

TASKS = (1, 8, 64)
METHODS = (["bare", "eager", "vpt_fast"] + [f"bank_{n}_mixed" for n in TASKS]
           + [f"bank_{n}_per_task" for n in TASKS if n > 1])


def _runner(method: str, cfg):
    if method == "bare":
        model = create_timm_model(cfg).to(cfg.device).eval()
        x, _ = make_batch(cfg, model)
        return lambda: infer(model, x, cfg)
    model = build_model(cfg, "reference" if method == "eager" else "auto").eval()
    x, _ = make_batch(cfg, model)
    if not method.startswith("bank_"):
        return lambda: infer(model, x, cfg)
    num_tasks = int(method.split("_")[1])
    if num_tasks > cfg.batch:
        pytest.skip(f"{num_tasks} tasks need a batch of at least {num_tasks}")
    bank, ids = make_bank(model, num_tasks, cfg.seed + num_tasks), task_ids(cfg.batch, num_tasks, cfg.device)
    if method.endswith("_mixed"):
        return lambda: infer_bank(bank, x, ids, cfg)
    groups = [(ids == t).nonzero().squeeze(1) for t in range(num_tasks)]
    return lambda: [infer_bank(bank, x[g], torch.full_like(g, t), cfg) for t, g in enumerate(groups)]


@pytest.mark.parametrize("method", METHODS)
def bench_inference(benchmark, cfg, env_info, method):
    run = _runner(method, cfg)
    run_timed(benchmark, run, cfg)
    benchmark.extra_info.update(env_info)
    with torch.inference_mode():
        flops = count_flops(run)
    benchmark.extra_info.update({"method": method, "model": cfg.model, "batch": cfg.batch, "dtype": cfg.dtype,
                                 "num_prompts": cfg.num_prompts, "img_per_s": per_second(benchmark, cfg.batch),
                                 "flops": flops})
