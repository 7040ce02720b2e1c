"""The `vpt-fast` command: `bench` (the main job), `memory` (activation memory vs batch size) and
`export` (a timm train.py checkpoint to a prompt file)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from vpt_fast.bench import BenchConfig, activation_memory, environment, format_table, run_bench


def _config(args: argparse.Namespace, **extra) -> BenchConfig:
    return BenchConfig(model=args.model, batch=getattr(args, "batch", 8), num_prompts=args.prompts,
                       deep=not args.shallow, dtype=args.dtype, device=args.device, img_size=args.img_size,
                       recompute=getattr(args, "recompute", "none"), **extra)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    p.add_argument("--prompts", type=int, default=50, help="prompt tokens per prompted block")
    p.add_argument("--shallow", action="store_true", help="VPT-Shallow instead of VPT-Deep")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (float32: no autocast)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vpt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="eager release-style VPT vs vpt_fast backends (main job)")
    _common(bench)
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--steps", type=int, default=5, help="timed rounds per method (median reported)")
    bench.add_argument("--backends", default="", help="comma list (default: every available backend)")
    bench.add_argument("--recompute", default="none", choices=["none", "mlp", "block"])
    bench.add_argument("--compile", action="store_true", help="also time eager and the fastest backend under torch.compile")
    bench.add_argument("--json", default=None, help="write rows and environment to this file")
    memory = sub.add_parser("memory", help="activation memory against batch size, eager vs vpt_fast")
    _common(memory)
    memory.add_argument("--batches", default="1,2,4,8,16", help="comma list of batch sizes")
    memory.add_argument("--backend", default="torch", help="vpt_fast backend to compare with eager")
    memory.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    _add_export(sub)
    args = parser.parse_args(argv)
    if args.command == "export":
        _export(args)
    elif args.command == "bench":
        cfg = _config(args, steps=args.steps, compile=args.compile,
                      backends=[b for b in args.backends.split(",") if b])
        rows = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": asdict(cfg), "environment": environment(), "rows": rows}, f, indent=2)
    else:
        _memory(args)


def _memory(args: argparse.Namespace) -> None:
    batches = [int(b) for b in args.batches.split(",") if b]
    series = {"eager": ("reference", "none"), f"vpt_fast[{args.backend}]": (args.backend, "none"),
              f"vpt_fast[{args.backend}, recompute=mlp]": (args.backend, "mlp"),
              f"vpt_fast[{args.backend}, recompute=block]": (args.backend, "block")}
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
        print(f"{batch:>6}" + "".join(f"{mb:>33.1f} MB" for mb in row), flush=True)
    if args.plot:
        _plot(args, batches, results)
        print(f"wrote {args.plot}")


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
