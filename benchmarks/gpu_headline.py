"""The ViT-B/16 headline: one process and one JSON per method, each written as soon as it is measured.

    python benchmarks/gpu_headline.py --out $OUT/headline          # on a CUDA machine
    python benchmarks/gpu_headline.py --summarize DIR               # table of the JSONs in DIR
    python benchmarks/gpu_headline.py --device cpu --dtype float32 --model vit_tiny_patch16_224 \\
        --img-size 32 --batch 2 --methods eager,torch,fastest_mlp --out /tmp/headline   # dry run

Setting (docs/design.md §6): ViT-B/16, 224 px, 50 deep prompts, batch 128, bf16 autocast, training
step = forward, backward and an SGD step on the trainable parameters (prompts + head). Methods, in
this order: `eager` (release-style VPT, the `reference` backend), `triton`, `cuda`, the fastest of
those with recompute="mlp" and "block" (`fastest_mlp`, `fastest_block`), then eager under
torch.compile and the fastest backend under torch.compile (`eager_compile`, `fastest_compile`):
compilation takes longest, so it comes last. "fastest" is the backend with the most img/s measured
so far in this run (else what "auto" picks).

Each method runs in a fresh process: its peak memory is its own, and a kernel fault or a hang
(killed at its timeout) cannot take the other methods down. A method that would start after the
deadline is skipped. Per method the JSON holds img/s (median over rounds of back-to-back steps,
synchronised at round edges only, as training runs), peak CUDA memory (whole process, and above
what is resident before the timed steps: weights, batch, optimizer state), the losses of the first
and the warm-up steps (same seed, weights and batch for every method, so they agree to low-precision
noise; the later ones follow the prompt and head updates: a cheap check of the gradients), FLOPs per step
(FlopCounterMode, uncompiled methods), setup time (build + compile + warm-up), and the device,
driver, torch, triton, CUDA, timm versions and how the extension was built.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from typing import Optional

import torch

from vpt_fast.bench import BenchConfig, build_model, count_flops, environment, make_batch, training_step

DEFAULT_METHODS = "eager,triton,cuda,fastest_mlp,fastest_block,eager_compile,fastest_compile"
_OPTIONS = ("mlp", "block", "compile")
_TIMED_BACKENDS = ("triton", "cuda", "torch")  # candidates for "fastest"


def parse_method(name: str) -> tuple[str, str, bool]:
    """"triton_mlp_compile" -> ("triton", "mlp", True); "eager" is the `reference` backend.

    Raises:
        ValueError: an unknown option or two recompute options.
    """
    head, *options = name.split("_")
    bad = [o for o in options if o not in _OPTIONS]
    recompute = [o for o in options if o in ("mlp", "block")]
    if bad or len(recompute) > 1 or not head:
        raise ValueError(f"method must be <backend>[_mlp|_block][_compile] (backend 'eager' = reference), "
                         f"got {name!r}")
    return ("reference" if head == "eager" else head), (recompute[0] if recompute else "none"), "compile" in options


def driver_version() -> Optional[str]:
    """The NVIDIA driver version (nvidia-smi, else NVML), None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001  (no NVML: not an NVIDIA machine)
        return None


def full_environment() -> dict:
    """bench.environment() plus driver, compute capability and the extension's build facts."""
    env = environment()
    env["driver"] = driver_version()
    if torch.cuda.is_available():
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability()
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        from vpt_fast.backends import cuda_impl
        info = cuda_impl.ext_info()
        env["ext"] = {k: info.get(k) for k in ("built", "cuda", "archs", "compiled_cuda", "error")}
    except ImportError as exc:
        env["ext"] = {"built": False, "error": str(exc)}
    return env


def write_json(path: str, record: dict) -> None:
    """Atomic: a call cut short leaves the previous file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def measure(method: str, cfg: BenchConfig, rounds: int, steps_per_round: int, warmup: int) -> dict:
    """Build, warm up and time one method in this process; returns its record (status "ok")."""
    backend, recompute, compiled = parse_method(method)
    cuda = cfg.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    model = build_model(cfg, backend, recompute)
    x, y = make_batch(cfg, model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    runner = torch.compile(model) if compiled else model
    losses = [training_step(runner, x, y, cfg, optimizer).item()]  # compiles when compiled
    print(f"[{method}] first step done after {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(warmup):  # the losses follow the prompt and head updates: wrong gradients show
        losses.append(training_step(runner, x, y, cfg, optimizer).item())
    sync()
    setup_s = time.perf_counter() - start
    resident = torch.cuda.memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps_per_round):
            training_step(runner, x, y, cfg, optimizer)
        sync()
        step_s.append((time.perf_counter() - t0) / steps_per_round)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    median = statistics.median(step_s)
    record = {
        "method": method, "backend": backend, "recompute": recompute, "compile": compiled,
        "status": "ok", "img_per_s": cfg.batch / median, "step_ms_median": median * 1e3,
        "step_ms_rounds": [t * 1e3 for t in step_s], "steps_per_round": steps_per_round,
        "peak_memory_bytes": peak, "resident_bytes": resident,
        "peak_above_resident_bytes": None if peak is None else peak - resident,
        "losses": losses, "setup_s": setup_s,
    }
    print(f"[{method}] {record['img_per_s']:.1f} img/s, {median * 1e3:.2f} ms/step"
          + ("" if peak is None else f", peak {peak / 2**30:.2f} GiB"), flush=True)
    if not compiled:  # FLOPs of the same model uncompiled; last, so a failure here keeps the timing
        try:
            record["train_gflops"] = count_flops(lambda: training_step(model, x, y, cfg)) / 1e9
        except Exception as exc:  # noqa: BLE001  (recorded, not fatal: the timing stands)
            record["train_gflops_error"] = f"{type(exc).__name__}: {exc}"
    return record


def _base_record(method: str, cfg: BenchConfig) -> dict:
    return {"method": method, "config": asdict(cfg), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_one(args: argparse.Namespace, cfg: BenchConfig) -> int:
    """Child process: measure `args.one`, write <out>/<method>.json (an error record on failure)."""
    record = _base_record(args.one, cfg)
    status = 0
    try:
        record["env"] = full_environment()
        record.update(measure(args.one, cfg, args.rounds, args.steps_per_round, args.warmup))
    except Exception as exc:  # noqa: BLE001  (every failure becomes a record)
        record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc()[-4000:])
        print(record["traceback"], file=sys.stderr, flush=True)
        status = 1
    write_json(os.path.join(args.out, f"{args.one}.json"), record)
    return status


def _child_command(args: argparse.Namespace, method: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--one", method, "--out", args.out,
            "--model", args.model, "--batch", str(args.batch), "--prompts", str(args.prompts),
            "--dtype", args.dtype, "--device", args.device, "--rounds", str(args.rounds),
            "--steps-per-round", str(args.steps_per_round), "--warmup", str(args.warmup)] + (
        ["--img-size", str(args.img_size)] if args.img_size else [])


def _run_child(cmd: list[str], timeout: float) -> tuple[Optional[int], list[str]]:
    """Runs cmd in its own process group, echoing its output; (exit code or None on timeout, tail)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            process_group=0)
    tail: collections.deque = collections.deque(maxlen=40)

    def pump():
        for line in proc.stdout:
            print("  | " + line, end="", flush=True)
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: Optional[int] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and the compile workers it started
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, list(tail)


def fastest_backend(results: dict[str, dict], device: str) -> str:
    """The backend with the most img/s among this run's uncompiled, non-recomputing methods."""
    timed = [r for r in results.values() if r.get("status") == "ok" and r.get("backend") in _TIMED_BACKENDS
             and r.get("recompute") == "none" and not r.get("compile")]
    if timed:
        return max(timed, key=lambda r: r["img_per_s"])["backend"]
    from vpt_fast.backends import resolve_auto
    return resolve_auto("auto", torch.device(device))


def run_all(args: argparse.Namespace, cfg: BenchConfig) -> int:
    """Parent: each method in its own process, in order, until the deadline; prints the table."""
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, dict] = {}
    failures = 0
    requests = [m for m in args.methods.split(",") if m]
    for requested in requests:  # a typo fails here, before any time is spent
        parse_method(requested.replace("fastest", "triton", 1) if requested.startswith("fastest") else requested)
    for requested in requests:
        method = requested.replace("fastest", fastest_backend(results, cfg.device), 1) \
            if requested.startswith("fastest") else requested
        if method in results:
            continue
        path = os.path.join(args.out, f"{method}.json")
        left = args.deadline_s - (time.perf_counter() - start)
        timeout = min(args.compile_timeout_s if method.endswith("_compile") else args.method_timeout_s, left)
        if timeout < args.min_method_s:
            record = dict(_base_record(method, cfg), status="skipped",
                          error=f"{left:.0f} s left of the {args.deadline_s:.0f} s deadline")
            write_json(path, record)
            print(f"[{method}] skipped: {record['error']}", flush=True)
            results[method] = record
            continue
        print(f"\n=== {method} (timeout {timeout:.0f} s, {time.perf_counter() - start:.0f} s into the run)",
              flush=True)
        code, tail = _run_child(_child_command(args, method), timeout)
        if code is None or not os.path.exists(path):  # timed out or died before writing its record
            write_json(path, dict(_base_record(method, cfg), requested=requested,
                                  status="timeout" if code is None else "crashed",
                                  error=f"exit code {code}" if code is not None else f"killed after {timeout:.0f} s",
                                  output_tail="".join(tail)))
        with open(path) as f:
            results[method] = json.load(f)
        if results[method].get("status") != "ok":
            failures += 1
    print("\n" + format_table(list(results.values())), flush=True)
    return 1 if failures else 0


def format_table(records: list[dict]) -> str:
    """Markdown table, ratios against `eager` of the same run."""
    base = next((r for r in records if r.get("method") == "eager" and r.get("status") == "ok"), None)
    env = next((r["env"] for r in records if r.get("env")), {})
    cfg = next((r["config"] for r in records if r.get("config")), {})
    head = (f"{cfg.get('model')}, batch {cfg.get('batch')}, {cfg.get('num_prompts')} "
            f"{'deep' if cfg.get('deep') else 'shallow'} prompts, {cfg.get('dtype')}, training step; "
            + ", ".join(f"{k} {env[k]}" for k in ("device", "driver", "torch", "triton", "cuda", "timm") if env.get(k)))
    lines = [head, "", "| method | img/s | speedup | ms/step | peak GiB | peak ratio | above resident GiB "
             "| GFLOP/step | loss first / last warm-up | setup s | status |", "|---|" + "---:|" * 9 + "---|"]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in records:
        ok = r.get("status") == "ok"
        ips, peak = r.get("img_per_s"), r.get("peak_memory_bytes")
        speed = ips / base["img_per_s"] if ok and base and ips else None
        base_peak = base.get("peak_memory_bytes") if ok and base else None
        peak_ratio = peak / base_peak if peak and base_peak else None
        above = r.get("peak_above_resident_bytes")
        lines.append(
            f"| {r.get('method')} | {num(ips, '.1f')} | {num(speed, '.2f')} | {num(r.get('step_ms_median'), '.2f')} "
            f"| {num(None if peak is None else peak / 2**30, '.2f')} | {num(peak_ratio, '.2f')} "
            f"| {num(None if above is None else above / 2**30, '.2f')} | {num(r.get('train_gflops'), '.1f')} "
            f"| {' / '.join(format(v, '.4f') for v in (r['losses'][0], r['losses'][-1])) if r.get('losses') else '-'} "
            f"| {num(r.get('setup_s'), '.0f')} "
            f"| {r.get('status')}{'' if ok else ': ' + str(r.get('error', ''))[:80]} |")
    return "\n".join(lines)


def summarize(directory: str) -> str:
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    order = {m: i for i, m in enumerate(DEFAULT_METHODS.split(","))}

    def key(r):  # the run's order: known names first (fastest_* by their option), then by name
        name = r.get("method", "")
        head, *options = name.split("_")
        generic = "_".join(["fastest" if head in _TIMED_BACKENDS and options else head] + options)
        return order.get(name, order.get(generic, len(order))), name

    return format_table(sorted(records, key=key))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--out", help="folder for <method>.json (created)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list, in order: <backend>[_mlp|_block][_compile], 'eager' = reference, "
                             "'fastest' = the fastest backend so far")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (the median is reported)")
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first, untimed")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="no method runs past this many seconds")
    parser.add_argument("--method-timeout-s", type=float, default=180.0)
    parser.add_argument("--compile-timeout-s", type=float, default=300.0)
    parser.add_argument("--min-method-s", type=float, default=30.0, help="skip a method with less time left")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: measure this method only
    parser.add_argument("--summarize", metavar="DIR", help="print the table of the JSONs in DIR and exit")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if not args.out:
        parser.error("--out is required")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = BenchConfig(model=args.model, batch=args.batch, num_prompts=args.prompts, deep=True, dtype=args.dtype,
                      device=args.device, img_size=args.img_size)
    return run_one(args, cfg) if args.one else run_all(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
