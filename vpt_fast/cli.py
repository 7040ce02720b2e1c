"""The `vpt-fast` command: `bench` (the main job), `memory` (activation memory vs batch size) and
`export` (a timm train.py checkpoint to a prompt file)."""
from __future__ import annotations

import argparse
import difflib
import json
import os
import pickle
import re
import sys
import zipfile
from dataclasses import asdict

import torch

import vpt_fast.bench.memory as peak_memory
from vpt_fast.backends import BACKENDS, validate_backend
from vpt_fast.bench import (
    BenchConfig,
    activation_memory,
    bench_backends,
    check_model,
    environment,
    format_table,
    run_bench,
)

DEFAULT_TASKS = [1, 8, 64]
DEFAULT_BATCHES = [1, 2, 4, 8, 16]


def _config(args: argparse.Namespace, **extra) -> BenchConfig:
    return BenchConfig(model=args.model, batch=getattr(args, "batch", 8), num_prompts=args.prompts,
                       deep=not args.shallow, dtype=args.dtype, device=args.device, img_size=args.img_size,
                       recompute=getattr(args, "recompute", "none"), **extra)


# argparse types: each refuses a bad value with the message argparse prints after "argument --name: "

def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            return _checked_int(text, minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    return parse


def _checked_int(text: str, minimum: int) -> int:
    value = int(text)
    if value < minimum:
        raise ValueError(f"{value} < {minimum}")
    return value


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [_checked_int(item, 1) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1 such as 1,2,4, got {text!r}")
    return values


def _task_counts(text: str) -> list[int]:
    """`_positive_int_list`, or no task count at all for '' (the inference bench without banks)."""
    return [] if not text.strip() else _positive_int_list(text)


def _model_name(text: str) -> str:
    """A short alias (vit_b, swin_t, ...) resolved to its timm name, or a timm model name; an unknown
    name is refused with the close names timm and the aliases know."""
    import timm
    name = peak_memory.resolve_model_name(text)
    if timm.is_model(name):
        return name
    known = timm.list_models() + list(peak_memory.MODEL_ALIASES)
    completions = sorted((n for n in known if n.startswith(text)), key=len)  # 'vit_small' -> vit_small_patch...
    close = list(dict.fromkeys(completions + difflib.get_close_matches(text, known, n=5)))[:5]
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise argparse.ArgumentTypeError(f"unknown model {text!r}{hint} (expected a timm model name or one of "
                                     f"{', '.join(peak_memory.MODEL_ALIASES)})")


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {text!r}")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus == 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs a CUDA GPU and torch {torch.__version__} sees none "
                                         f"here; expected cpu")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda:0 to cuda:{gpus - 1} ({gpus} GPUs here), got {text!r}")
    return text


_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype_name(text: str) -> str:
    """float32, bfloat16, float16 or their short names fp32, bf16, fp16 (argparse's choices check the result)."""
    return _DTYPE_ALIASES.get(text, text)


def _memory_sizes(text: str) -> list[int]:
    """A comma list of memory sizes such as 80GiB,141GiB or 512MiB, in bytes."""
    try:
        sizes = [peak_memory.parse_bytes(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected a comma list of sizes such as 80GiB,141GiB, got {text!r}")
    return sizes


def _backend_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown[0]!r} in {text!r}; expected a comma list of "
                                         f"{', '.join(BACKENDS)}")
    return names


def _output_file(text: str) -> str:
    """A file path that can be written: not a directory, in a directory that exists."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file path to write")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {folder!r} is not writable")
    return text


_LEGACY_TORCH_FILE_START = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]  # without STOP
"""How files torch.save wrote before torch 1.6 (_use_new_zipfile_serialization=False) begin."""


def _checkpoint_file(text: str) -> str:
    """An existing file in a format torch.save writes (a zip archive, or torch's legacy pickle
    format): anything else makes torch.load fail with errors that name neither (KeyError: 101)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a train.py checkpoint file")
    with open(text, "rb") as f:
        is_legacy = f.read(len(_LEGACY_TORCH_FILE_START)) == _LEGACY_TORCH_FILE_START
    if not (zipfile.is_zipfile(text) or is_legacy):
        raise argparse.ArgumentTypeError(f"{text!r} is not a checkpoint torch.save wrote (neither a zip archive "
                                         f"nor torch's legacy format; a truncated download?)")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_small_patch16_224", type=_model_name,
                   help="timm model name (random weights; default %(default)s)")
    p.add_argument("--prompts", type=_int_at_least(1), default=50,
                   help="prompt tokens per prompted block (default %(default)s)")
    p.add_argument("--shallow", action="store_true", help="VPT-Shallow instead of VPT-Deep")
    p.add_argument("--dtype", default="float32", type=_dtype_name, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (float32: no autocast; also fp32, bf16, fp16)")
    p.add_argument("--device", default="cpu", type=_device, help="cpu, cuda or cuda:<index>")
    p.add_argument("--img-size", type=_int_at_least(1), default=None, help="image size (default: the model's)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vpt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"bench": (_add_bench(sub), _bench), "memory": (_add_memory(sub), _memory),
                "export": (_add_export(sub), _export)}
    args = parser.parse_args(argv)
    command_parser, run = commands[args.command]
    run(args, command_parser)


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = sub.add_parser("bench", help="eager release-style VPT vs vpt_fast backends (main job)",
                           description=f"--model also takes {', '.join(peak_memory.MODEL_ALIASES)} (random weights).")
    _common(bench)
    bench.add_argument("--batch", type=_int_at_least(1), default=8, help="default %(default)s")
    bench.add_argument("--steps", type=_int_at_least(1), default=5,
                       help="timed rounds per method, median reported (default %(default)s)")
    bench.add_argument("--backends", type=_backend_list, default=[],
                       help=f"comma list of {', '.join(BACKENDS)} (default: every available backend)")
    bench.add_argument("--recompute", default="none", choices=["none", "mlp", "block"], help="default %(default)s")
    bench.add_argument("--compile", action="store_true",
                       help="also time eager and the fastest backend under torch.compile")
    bench.add_argument("--json", default=None, type=_output_file, help="write rows and environment to this file")
    bench.add_argument("--inference", action="store_true",
                       help="serving instead: bare backbone, eager VPT, vpt_fast with cached prompt K/V, and "
                            "PromptBanks with --tasks tasks mixed in one batch vs one pass per task")
    bench.add_argument("--tasks", type=_task_counts, default=None,
                       help=f"--inference: comma list of task counts (default {','.join(map(str, DEFAULT_TASKS))}; "
                            f"'' times no bank)")
    return bench


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.inference and (args.backends or args.compile or args.recompute != "none"):
        parser.error("--backends, --compile and --recompute time training; --inference times vpt_fast's "
                     "automatic backend without them")
    if args.tasks is not None and not args.inference:
        parser.error(f"--tasks {','.join(map(str, args.tasks))} goes with --inference")
    cfg = _config(args, steps=args.steps, compile=args.compile, backends=args.backends)
    if not args.inference:
        timed, skipped = bench_backends(cfg)
        if not timed:
            parser.error(f"--backends {','.join(args.backends)}: nothing left to time here: "
                         + "; ".join(f"{name!r} is skipped: {why}" for name, why in skipped.items()))
    _check_model(cfg, parser)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.inference:
        from vpt_fast.bench.serving import format_inference_table, run_inference_bench
        rows = run_inference_bench(cfg, DEFAULT_TASKS if args.tasks is None else args.tasks, log=log)
        print(format_inference_table(rows))
    else:
        rows = run_bench(cfg, log=log)
        print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "environment": environment(), "rows": rows}, f, indent=2)


def _check_model(cfg: BenchConfig, parser: argparse.ArgumentParser) -> None:
    """Refuse a model that cannot be prompted or run at this size before anything is measured."""
    try:
        check_model(cfg)
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:  # what timm and prompt() raise
        size = "its default image size" if cfg.img_size is None else f"--img-size {cfg.img_size}"
        parser.error(f"--model {cfg.model} at {size} with --prompts {cfg.num_prompts}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _add_memory(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    memory = sub.add_parser("memory", help="activation memory against batch size, eager vs vpt_fast; "
                                           "--total: peak of a whole training step vs full fine-tuning",
                            description=f"--model also takes {', '.join(peak_memory.MODEL_ALIASES)} (random weights).")
    _common(memory)
    memory.add_argument("--batches", type=_positive_int_list, default=None,
                        help=f"comma list of batch sizes (default {','.join(map(str, DEFAULT_BATCHES))})")
    memory.add_argument("--backend", default=None, choices=BACKENDS,
                        help="vpt_fast backend (default: torch for activations, auto for --total/--max-batch)")
    memory.add_argument("--plot", default=None, type=_output_file, help="write a PNG plot here (needs matplotlib)")
    mode = memory.add_mutually_exclusive_group()
    mode.add_argument("--total", action="store_true",
                      help="peak memory of a whole AdamW training step (parameters, gradients, optimizer "
                           "state, activations, workspace): full fine-tuning, linear probe, eager VPT, vpt_fast")
    mode.add_argument("--max-batch", action="store_true",
                      help="per method, the largest batch whose training step stays within --budget")
    memory.add_argument("--budget", default=None, help="memory budget for --max-batch, e.g. 16GiB, 512MiB "
                                                       "(default on CUDA: the device's memory)")
    memory.add_argument("--batch-limit", type=_int_at_least(1), default=None,
                        help="--max-batch stops there if the step still fits (CPU: bounds the run time)")
    memory.add_argument("--methods", default=None,
                        help=f"comma list for --total/--max-batch/--plan (default: all) of "
                             f"{', '.join(peak_memory.methods())}; --plan --dtype bf16 also takes vpt_fast_bf16w, "
                             f"vpt_fast_mlp_bf16w, vpt_fast_block_bf16w (vpt_fast.cast_frozen)")
    memory.add_argument("--json", default=None, type=_output_file,
                        help="--total/--max-batch/--plan: write the results to this file")
    plan = memory.add_argument_group("planner (--plan): predicted, nothing allocated")
    plan.add_argument("--plan", action="store_true",
                      help="predict the peak of a training step per method and the largest batch within "
                           "--device-memory, simulating the step on fake tensors (no model allocated); with "
                           "--total, printed beside the measurement")
    plan.add_argument("--device-memory", type=_memory_sizes, default=None,
                      help="--plan: memory per device, a comma list such as 80GiB,141GiB: the largest batch "
                           "is solved against each (default on CUDA: the device's memory)")
    plan.add_argument("--gpus", type=_int_at_least(1), default=None,
                      help="--plan: GPUs (DDP: each holds everything; with --fsdp: sharded). Plans for CUDA "
                           "(AdamW's foreach step); batches are per GPU")
    plan.add_argument("--fsdp", action="store_true",
                      help="--plan: FSDP2 over --gpus: parameters, gradients and AdamW state sharded per block")
    return memory


def _memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.backend is not None:
        try:
            validate_backend(args.backend)
        except RuntimeError as exc:
            parser.error(f"--backend: {exc}")
    if args.max_batch and args.batches:
        parser.error("--batches goes with --total or the default activation table; --max-batch searches the batch")
    if args.plot:
        _require_matplotlib(parser)
    if args.plan or args.device_memory is not None or args.gpus is not None or args.fsdp:
        _plan_memory(args, parser)
        return
    _check_model(_config(args), parser)
    if args.total or args.max_batch:
        _total_memory(args, parser)
        return
    if args.budget or args.batch_limit or args.json or args.methods:
        parser.error("--budget, --batch-limit, --json and --methods go with --total or --max-batch")
    backend = args.backend or "torch"
    batches = args.batches or DEFAULT_BATCHES
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


def _require_matplotlib(parser: argparse.ArgumentParser) -> None:
    """--plot is refused before a measurement that would end without its plot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("--plot needs matplotlib: pip install 'vpt_fast[plot]'")


def _total_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    catalogue = peak_memory.methods(args.backend or "auto")
    keys = list(catalogue) if args.methods is None else [k for k in args.methods.split(",") if k]
    unknown = [k for k in keys if k not in catalogue]
    if unknown or not keys:
        parser.error(f"--methods: expected a comma list of {', '.join(catalogue)}, got {args.methods!r}")
    chosen = {k: catalogue[k] for k in keys}
    cfg = _config(args)
    title = (f"{args.model}, {args.prompts} {'shallow' if args.shallow else 'deep'} prompts, {args.dtype}, "
             f"{args.device}, AdamW")
    if args.max_batch:
        if args.plot:
            parser.error("--plot draws --total results; --max-batch prints a table")
        budget = _budget(args, parser)
        print(f"largest batch within {budget / 2**30:.2f} GiB: {title}", flush=True)
        results = {}
        for key, method in chosen.items():
            _progress(f"[max-batch] {method.label}")
            results[key] = peak_memory.max_batch(cfg, method, budget, args.batch_limit, _progress)
        print(peak_memory.format_max_batch_table(results, chosen))
        payload = {"budget_bytes": budget, "results": results}
    else:
        if args.budget or args.batch_limit:
            parser.error("--budget and --batch-limit go with --max-batch")
        batches = args.batches or DEFAULT_BATCHES
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


def _plan_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--plan: predicted peaks and largest batches (vpt_fast.bench.plan), with --total beside the measurement."""
    from vpt_fast.bench import plan as planner
    if not args.plan:
        parser.error("--device-memory, --gpus and --fsdp go with --plan")
    if args.max_batch or args.budget or args.batch_limit:
        parser.error("--plan predicts the largest batch within --device-memory; --max-batch, --budget and "
                     "--batch-limit measure it")
    if args.fsdp and (args.gpus or 1) < 2:
        parser.error("--fsdp shards over --gpus N with N >= 2")
    if args.plot and not args.total:
        parser.error("--plot draws --total results")
    if args.total and (args.gpus is not None or args.device_memory is not None):
        parser.error("--plan --total compares with a measurement on this device: --gpus and --device-memory "
                     "describe another one")
    catalogue = planner.plan_methods(args.backend or "auto")
    measurable = peak_memory.methods(args.backend or "auto")
    if args.methods is None:
        keys = [k for k in (measurable if args.total else catalogue)
                if not planner.is_frozen_bf16(k) or args.dtype == "bfloat16"]
    else:
        keys = [k for k in args.methods.split(",") if k]
        allowed = measurable if args.total else catalogue
        if not keys or any(k not in allowed for k in keys):
            parser.error(f"--methods: expected a comma list of {', '.join(allowed)}, got {args.methods!r}")
        if args.dtype != "bfloat16" and any(planner.is_frozen_bf16(k) for k in keys):
            parser.error("the *_bf16w methods (bf16 frozen weights) need --dtype bf16")
    chosen = {k: catalogue[k] for k in keys}
    cfg = _config(args)
    batches = args.batches or DEFAULT_BATCHES
    gpus = args.gpus or 1
    target = "cuda" if args.gpus is not None or args.device.startswith("cuda") else "cpu"
    budgets = args.device_memory or []
    if not budgets and args.device.startswith("cuda"):
        budgets = [torch.cuda.get_device_properties(torch.device(args.device)).total_memory]
    title = (f"{args.model}, {args.prompts} {'shallow' if args.shallow else 'deep'} prompts, {args.dtype}, AdamW, "
             + (f"{gpus} GPU{'s' if gpus > 1 else ''}{', FSDP' if args.fsdp else ''} (per GPU)" if target == "cuda"
                else args.device))
    _progress(f"vpt-fast memory --plan: {title}; simulating each method's step on fake tensors")
    try:
        predicted = planner.plan(cfg, chosen, batches, budgets, gpus, args.fsdp, target, log=_progress)
    except (ValueError, TypeError, RuntimeError, AssertionError, NotImplementedError) as exc:
        size = "its default image size" if cfg.img_size is None else f"--img-size {cfg.img_size}"
        parser.error(f"--model {cfg.model} at {size} with --prompts {cfg.num_prompts}: {_first_line(exc)}")
    print(f"predicted peak of a training step, MiB: {title}")
    print(planner.format_plan_table(predicted, chosen, batches, budgets))
    payload = {"plan": {"batches": batches, "device_memory_bytes": budgets, "gpus": gpus, "fsdp": args.fsdp,
                        "target": target, "results": predicted}}
    if args.total:
        _progress("vpt-fast memory --total: one fresh process per (method, batch)")
        measured = peak_memory.total_memory(cfg, chosen, batches, _progress)
        print(f"predicted vs measured peak of a training step, MiB: {title}")
        print(planner.format_accuracy_table(predicted, measured, chosen))
        payload["results"] = {str(b): r for b, r in measured.items()}
        if args.plot:
            peak_memory.plot_total(measured, chosen, f"peak memory of a training step: {title}", args.plot)
            print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "environment": environment(),
                       "methods": {k: asdict(m) for k, m in chosen.items()}, **payload}, f, indent=2)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _budget(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.budget:
        try:
            return peak_memory.parse_bytes(args.budget)
        except ValueError as exc:
            parser.error(f"--budget: {exc}")
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    parser.error("--max-batch on the CPU needs --budget (e.g. --budget 16GiB)")


def _plot(args, batches, results) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def _add_export(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    export = sub.add_parser("export", help="a timm train.py checkpoint of a vpt_ model -> a prompt file "
                                           "(prompts, projection, head; vpt_fast.load_prompts reads it)")
    export.add_argument("checkpoint", type=_checkpoint_file,
                        help="train.py checkpoint (model_best.pth.tar, last.pth.tar, ...)")
    export.add_argument("out", type=_output_file, help="the .safetensors prompt file to write")
    export.add_argument("--ema", action="store_true", help="export the EMA weights (state_dict_ema)")
    export.add_argument("--model", default=None, type=_export_model_name,
                        help="timm model name, vpt_<name> or <name> (default: the checkpoint's args)")
    export.add_argument("--num-classes", type=_int_at_least(0), default=None)
    export.add_argument("--num-prompts", type=_int_at_least(1), default=None)
    depth = export.add_mutually_exclusive_group()
    depth.add_argument("--deep", dest="deep", action="store_true", default=None)
    depth.add_argument("--shallow", dest="deep", action="store_false")
    export.add_argument("--project", type=_int_at_least(1), default=None, help="prompt projection dimension")
    return export


def _export_model_name(text: str) -> str:
    """`_model_name` of the name without its vpt_ prefix (the export adds it)."""
    from vpt_fast.timm_models import PREFIX
    return _model_name(text[len(PREFIX):] if text.startswith(PREFIX) else text)


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from vpt_fast.io import export_train_checkpoint, prompt_state_dict
    try:
        model = export_train_checkpoint(args.checkpoint, args.out, ema=args.ema, model_name=args.model,
                                        num_classes=args.num_classes, num_prompts=args.num_prompts,
                                        deep=args.deep, project=args.project)
    except pickle.UnpicklingError as exc:
        unsupported = re.search(r"Unsupported [^\n]*", str(exc))  # what torch's long message names
        parser.error(f"checkpoint {args.checkpoint!r} holds objects torch.load(weights_only=True) refuses, as "
                     f"timm does{f' ({unsupported.group(0).strip()})' if unsupported else ''}: not a train.py "
                     f"checkpoint, or one saved with custom classes")
    except ValueError as exc:  # the checkpoint does not fit the model it names (io says how)
        parser.error(f"argument checkpoint: {exc}")
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
