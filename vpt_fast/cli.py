"""The `vpt-fast` command: `bench` (the main job), `memory` (activation memory vs batch size) and
`export` (a timm train.py checkpoint to a prompt file)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

import vpt_fast.memory as peak_memory
from vpt_fast.bench import BenchConfig, activation_memory, environment, format_table, run_bench


def _config(args: argparse.Namespace, **extra) -> BenchConfig:
    return BenchConfig(model=args.model, batch=getattr(args, "batch", 8), num_prompts=args.prompts,
                       deep=not args.shallow, dtype=args.dtype, device=args.device, img_size=args.img_size,
                       recompute=getattr(args, "recompute", "none"), **extra)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_small_patch16_224",
                   help="timm model name (random weights; default %(default)s)")
    p.add_argument("--prompts", type=int, default=50, help="prompt tokens per prompted block (default %(default)s)")
    p.add_argument("--shallow", action="store_true", help="VPT-Shallow instead of VPT-Deep")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (float32: no autocast)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vpt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="eager release-style VPT vs vpt_fast backends (main job)",
                           description=f"--model also takes {', '.join(peak_memory.MODEL_ALIASES)} (random weights).")
    _common(bench)
    bench.add_argument("--batch", type=int, default=8, help="default %(default)s")
    bench.add_argument("--steps", type=int, default=5,
                       help="timed rounds per method, median reported (default %(default)s)")
    bench.add_argument("--backends", default="", help="comma list (default: every available backend)")
    bench.add_argument("--recompute", default="none", choices=["none", "mlp", "block"], help="default %(default)s")
    bench.add_argument("--compile", action="store_true",
                       help="also time eager and the fastest backend under torch.compile")
    bench.add_argument("--json", default=None, help="write rows and environment to this file")
    bench.add_argument("--inference", action="store_true",
                       help="serving instead: bare backbone, eager VPT, vpt_fast with cached prompt K/V, and "
                            "PromptBanks with --tasks tasks mixed in one batch vs one pass per task")
    bench.add_argument("--tasks", default="1,8,64", help="--inference: comma list of task counts (default %(default)s)")
    _add_memory(sub)
    _add_export(sub)
    args = parser.parse_args(argv)
    if args.command == "export":
        _export(args)
    elif args.command == "bench":
        args.model = peak_memory.resolve_model_name(args.model)
        cfg = _config(args, steps=args.steps, compile=args.compile,
                      backends=[b for b in args.backends.split(",") if b])
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        if args.inference:
            from vpt_fast.serving_bench import format_inference_table, run_inference_bench
            rows = run_inference_bench(cfg, [int(n) for n in args.tasks.split(",") if n], log=log)
            print(format_inference_table(rows))
        else:
            rows = run_bench(cfg, log=log)
            print(format_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": asdict(cfg), "environment": environment(), "rows": rows}, f, indent=2)
    else:
        _memory(args)


def _add_memory(sub: argparse._SubParsersAction) -> None:
    memory = sub.add_parser("memory", help="activation memory against batch size, eager vs vpt_fast; "
                                           "--total: peak of a whole training step vs full fine-tuning",
                            description=f"--model also takes {', '.join(peak_memory.MODEL_ALIASES)} (random weights).")
    _common(memory)
    memory.add_argument("--batches", default="1,2,4,8,16", help="comma list of batch sizes (default %(default)s)")
    memory.add_argument("--backend", default=None,
                        help="vpt_fast backend (default: torch for activations, auto for --total/--max-batch)")
    memory.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    mode = memory.add_mutually_exclusive_group()
    mode.add_argument("--total", action="store_true",
                      help="peak memory of a whole AdamW training step (parameters, gradients, optimizer "
                           "state, activations, workspace): full fine-tuning, linear probe, eager VPT, vpt_fast")
    mode.add_argument("--max-batch", action="store_true",
                      help="per method, the largest batch whose training step stays within --budget")
    memory.add_argument("--budget", default=None, help="memory budget for --max-batch, e.g. 16GiB, 512MiB "
                                                       "(default on CUDA: the device's memory)")
    memory.add_argument("--batch-limit", type=int, default=None,
                        help="--max-batch stops there if the step still fits (CPU: bounds the run time)")
    memory.add_argument("--methods", default=None,
                        help=f"comma list for --total/--max-batch (default: all) of {', '.join(peak_memory.methods())}")
    memory.add_argument("--json", default=None, help="--total/--max-batch: write the results to this file")


def _memory(args: argparse.Namespace) -> None:
    args.model = peak_memory.resolve_model_name(args.model)
    if args.total or args.max_batch:
        _total_memory(args)
        return
    if args.budget or args.batch_limit or args.json or args.methods:
        raise SystemExit("--budget, --batch-limit, --json and --methods go with --total or --max-batch")
    backend = args.backend or "torch"
    batches = [int(b) for b in args.batches.split(",") if b]
    series = {"eager": ("reference", "none"), f"vpt_fast[{backend}]": (backend, "none"),
              f"vpt_fast[{backend}, recompute=mlp]": (backend, "mlp"),
              f"vpt_fast[{backend}, recompute=block]": (backend, "block")}
    results = {name: [] for name in series}
    print(f"{'batch':>6}" + "".join(f"{name:>36}" for name in series))
    for batch in batches:
        args.batch = batch
        cfg = _config(args)
        row = []
        for name, (backend, recompute) in series.items():
            print(f"  measuring {name} at batch {batch} ...", file=sys.stderr, flush=True)
            mem = activation_memory(cfg, backend, recompute)
            results[name].append(mem)
            row.append(mem["activation_bytes"] / 2**20)
        print(f"{batch:>6}" + "".join(f"{mb:>32.1f} MiB" for mb in row), flush=True)
    if args.plot:
        _plot(args, batches, results)
        print(f"wrote {args.plot}")


def _total_memory(args: argparse.Namespace) -> None:
    catalogue = peak_memory.methods(args.backend or "auto")
    keys = list(catalogue) if args.methods is None else [k for k in args.methods.split(",") if k]
    unknown = [k for k in keys if k not in catalogue]
    if unknown or not keys:
        raise SystemExit(f"--methods: expected a comma list of {', '.join(catalogue)}, got {args.methods!r}")
    chosen = {k: catalogue[k] for k in keys}
    cfg = _config(args)
    title = (f"{args.model}, {args.prompts} {'shallow' if args.shallow else 'deep'} prompts, {args.dtype}, "
             f"{args.device}, AdamW")
    if args.max_batch:
        if args.plot:
            raise SystemExit("--plot draws --total results; --max-batch prints a table")
        budget = _budget(args)
        print(f"largest batch within {budget / 2**30:.2f} GiB: {title}", flush=True)
        results = {}
        for key, method in chosen.items():
            _progress(f"[max-batch] {method.label}")
            results[key] = peak_memory.max_batch(cfg, method, budget, args.batch_limit, _progress)
        print(peak_memory.format_max_batch_table(results, chosen))
        payload = {"budget_bytes": budget, "results": results}
    else:
        if args.budget or args.batch_limit:
            raise SystemExit("--budget and --batch-limit go with --max-batch")
        batches = [int(b) for b in args.batches.split(",") if b]
        _progress(f"vpt-fast memory --total: {title}; one fresh process per (method, batch)")
        results = peak_memory.total_memory(cfg, chosen, batches, _progress)
        print(f"peak memory of a training step, MiB: {title}")
        print(peak_memory.format_total_table(results, chosen))
        if args.plot:
            peak_memory.plot_total(results, chosen, f"peak memory of a training step: {title}", args.plot)
            print(f"wrote {args.plot}")
        payload = {"results": {str(b): r for b, r in results.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "environment": environment(),
                       "methods": {k: asdict(m) for k, m in chosen.items()}, **payload}, f, indent=2)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _budget(args: argparse.Namespace) -> int:
    if args.budget:
        try:
            return peak_memory.parse_bytes(args.budget)
        except ValueError as exc:
            raise SystemExit(f"--budget: {exc}") from exc
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    raise SystemExit("--max-batch on the CPU needs --budget (e.g. --budget 16GiB)")


def _plot(args, batches, results) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'vpt_fast[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, mems in results.items():
        ax.plot(batches, [m["activation_bytes"] / 2**20 for m in mems], marker="o", label=f"{name} (activations)")
        if mems and mems[0].get("peak_bytes") is not None:
            ax.plot(batches, [m["peak_bytes"] / 2**20 for m in mems], linestyle="--", label=f"{name} (peak)")
    mode = "shallow" if args.shallow else "deep"
    ax.set(xlabel="batch size", ylabel="MiB held after forward",
           title=f"{args.model}, {args.prompts} {mode} prompts, {args.dtype}, {args.device}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="a timm train.py checkpoint of a vpt_ model -> a prompt file "
                                           "(prompts, projection, head; vpt_fast.load_prompts reads it)")
    export.add_argument("checkpoint", help="train.py checkpoint (model_best.pth.tar, last.pth.tar, ...)")
    export.add_argument("out", help="the .safetensors prompt file to write")
    export.add_argument("--ema", action="store_true", help="export the EMA weights (state_dict_ema)")
    export.add_argument("--model", default=None, help="timm model name, vpt_<name> or <name> "
                                                      "(default: the checkpoint's args)")
    export.add_argument("--num-classes", type=int, default=None)
    export.add_argument("--num-prompts", type=int, default=None)
    depth = export.add_mutually_exclusive_group()
    depth.add_argument("--deep", dest="deep", action="store_true", default=None)
    depth.add_argument("--shallow", dest="deep", action="store_false")
    export.add_argument("--project", type=int, default=None, help="prompt projection dimension")


def _export(args: argparse.Namespace) -> None:
    import os

    from vpt_fast.io import export_train_checkpoint, prompt_state_dict
    model = export_train_checkpoint(args.checkpoint, args.out, ema=args.ema, model_name=args.model,
                                    num_classes=args.num_classes, num_prompts=args.num_prompts,
                                    deep=args.deep, project=args.project)
    for name, tensor in prompt_state_dict(model).items():
        print(f"  {name:<16} {str(tuple(tensor.shape)):<18} {tensor.dtype}")
    before, after = os.path.getsize(args.checkpoint), os.path.getsize(args.out)
    print(f"{args.checkpoint} ({_size(before)}) -> {args.out} ({_size(after)}), "
          f"{model.pretrained_cfg.get('architecture')} with {model.vpt_config.num_prompts} "
          f"{'deep' if model.vpt_config.deep else 'shallow'} prompts{' (EMA)' if args.ema else ''}")


def _size(num_bytes: int) -> str:
    if num_bytes >= 1e6:
        return f"{num_bytes / 1e6:.1f} MB"
    return f"{num_bytes / 1e3:.1f} KB" if num_bytes >= 1e3 else f"{num_bytes} B"


if __name__ == "__main__":  # python -m vpt_fast.cli, like python -m vpt_fast
    main()
