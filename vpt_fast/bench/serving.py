"""`vpt-fast bench --inference`: serving many tasks from one backbone (docs/design.md §8).

Inference (eval, no gradients) img/s and FLOPs, in one interleaved run, of: the bare backbone (the
timm model without prompts), eager release-style VPT, vpt_fast (prompt K/V cached), and PromptBanks
with N tasks mixed in one batch against one forward per task group on the same images.
"""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch

from vpt_fast.bank import PromptBank
from vpt_fast.bench.core import (
    BenchConfig,
    autocast,
    build_model,
    count_flops,
    create_timm_model,
    infer,
    interleaved_times,
    make_batch,
)
from vpt_fast.io import metadata, prompt_state_dict


def make_bank(model: torch.nn.Module, num_tasks: int, seed: int) -> PromptBank:
    """A bank of `num_tasks` tasks with random prompts and heads on `model`'s backbone."""
    g = torch.Generator().manual_seed(seed)
    bank = PromptBank(model).eval()
    made_for = metadata(model)  # the tasks are made for this backbone: say so, or the bank warns it cannot check
    for t in range(num_tasks):
        state = {k: (torch.randn(v.shape, generator=g) * 0.5).to(v) for k, v in prompt_state_dict(model).items()}
        bank.add(f"task{t}", state, metadata=made_for)
    return bank


def task_ids(batch: int, num_tasks: int, device) -> torch.Tensor:
    """Every task present, samples interleaved (the worst case for grouping)."""
    return (torch.arange(batch) % num_tasks).to(device)


def run_inference_bench(cfg: BenchConfig, task_counts: Sequence[int] = (1, 8, 64),
                        log: Callable[[str], None] = print) -> list[dict]:
    """One row per method: img/s (median of interleaved rounds), GFLOP per batch, ratio to the bare backbone."""
    log(f"vpt-fast bench --inference: {cfg.model}, batch {cfg.batch}, {cfg.num_prompts} "
        f"{'deep' if cfg.deep else 'shallow'} prompts, {cfg.dtype}, {cfg.device}")
    torch.manual_seed(cfg.seed)
    bare = create_timm_model(cfg).to(cfg.device).eval()
    bare.requires_grad_(False)  # served frozen, as the prompted models' backbone (a trainable SigLIP attention-pool
    # latent also broke FlopCounterMode's module tracker under inference_mode)
    eager = build_model(cfg, "reference").eval()
    fast = build_model(cfg, "auto").eval()
    x, _ = make_batch(cfg, fast)
    fns = {"bare backbone": lambda: infer(bare, x, cfg), "eager VPT": lambda: infer(eager, x, cfg),
           "vpt_fast (cached prompt K/V)": lambda: infer(fast, x, cfg)}
    for n in task_counts:
        if n > cfg.batch:
            log(f"skipping {n} tasks: a batch of {cfg.batch} cannot hold one sample of each")
            continue
        bank, ids = make_bank(fast, n, cfg.seed + n), task_ids(cfg.batch, n, cfg.device)
        groups = [(ids == t).nonzero().squeeze(1) for t in range(n)]
        fns[f"bank: {n} tasks mixed, 1 pass"] = lambda b=bank, i=ids: infer_bank(b, x, i, cfg)
        if n > 1:
            fns[f"bank: {n} tasks, 1 pass per task"] = (
                lambda b=bank, gs=groups: [infer_bank(b, x[g], torch.full_like(g, t), cfg) for t, g in enumerate(gs)])
    log(f"[time] {len(fns)} methods, {cfg.steps} interleaved rounds")
    times = interleaved_times(fns, cfg.steps, cfg.warmup, cfg.device, log)
    bare_s = statistics.median(times["bare backbone"])
    rows = []
    for name, fn in fns.items():
        with torch.inference_mode():
            flops = count_flops(fn)
        median = statistics.median(times[name])
        rows.append({"method": name, "infer_img_s": cfg.batch / median, "speed_vs_bare": bare_s / median,
                     "gflops": flops / 1e9})
    bare_flops = rows[0]["gflops"]
    for row in rows:
        row["flops_vs_bare"] = row["gflops"] / bare_flops
    return rows


def infer_bank(bank: PromptBank, x: torch.Tensor, ids: torch.Tensor, cfg: BenchConfig):
    """`bank`'s logits for images `x` of tasks `ids`, without gradients, under `cfg`'s autocast."""
    with torch.inference_mode(), autocast(cfg):
        return bank(x, ids)


def format_inference_table(rows: list[dict]) -> str:
    head = f"{'method':<36}{'img/s':>10}{'vs bare':>9}{'GFLOP':>10}{'FLOPs vs bare':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<36}{r['infer_img_s']:10.2f}{r['speed_vs_bare']:9.2f}{r['gflops']:10.1f}"
                     f"{r['flops_vs_bare']:15.3f}")
    return "\n".join(lines)
