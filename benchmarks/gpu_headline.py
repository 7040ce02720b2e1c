"""GPU acceptance: the training-step measurements, one process per method, one JSON file for the run.

    python benchmarks/gpu_headline.py --out $OUT/headline.json                 # ViT-B/16, on a CUDA machine
    python benchmarks/gpu_headline.py --setting swin_b --methods eager,fastest \\
        --fastest-from $OUT/headline.json --out $OUT/swin.json                   # Swin-B, its fastest backend
    python benchmarks/gpu_headline.py --warm --methods eager_compile,triton_compile --out $OUT/warm.json
    python benchmarks/gpu_headline.py --summarize DIR       # DIR's smoke/warm/headline/swin JSONs as markdown
    VPT_GPU_DRY_RUN=1 python benchmarks/gpu_headline.py --out /tmp/headline.json   # tiny, on the CPU

Settings (docs/design.md §6): `vit_b` = ViT-B/16, 224 px, batch 128; `swin_b` = Swin-B (window 7,
224 px), batch 64; both 50 deep prompts, bf16 autocast, training step = forward, backward and an
SGD step on the trainable parameters (prompts + head). Methods, in this order by default: `eager`
(release-style VPT, the `reference` backend), `triton`, `cuda`, the fastest of those with
recompute="block" (`fastest_block`: its peak memory), then eager under torch.compile and the
fastest backend under torch.compile (`eager_compile`, `fastest_compile`): compilation takes
longest, so it comes last. "fastest" is the backend with the most img/s measured so far in this run
(or in `--fastest-from`'s run; else what "auto" picks).

Each method runs in a fresh process: its peak memory is its own, and a kernel fault or a hang
(killed at its timeout) cannot take the other methods down. A method that would start after the
deadline is recorded as skipped. Per method the record holds img/s (median over rounds of
back-to-back steps, synchronised at round edges only, as training runs), peak CUDA memory (whole
process, and above what is resident before the timed steps: weights, batch, optimizer state), the
losses of the first and the warm-up steps (same seed, weights and batch for every method, so they
agree to low-precision noise; the later ones follow the prompt and head updates: a cheap check of
the gradients), FLOPs per step (FlopCounterMode, uncompiled methods), setup time (build + compile +
warm-up), and the device, driver, torch, triton, CUDA, timm versions and how the extension was built.
The file is rewritten after every method. `--warm` only builds, compiles and runs two steps per
method, all methods at the same time (filling torch.compile's and Triton's on-disk caches while the
GPU is not being timed; the records say how long the cold compiles took side by side).

VPT_GPU_DRY_RUN=1: both settings shrink to 2-block models at 32/56 px on the CPU (the triton backend
under TRITON_INTERPRET=1, the cuda backend's C++ CPU twin, inductor's CPU code), 1-2 timed steps.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from typing import Callable, Optional

import torch

from vpt_fast.bench import BenchConfig, build_model, count_flops, environment, make_batch, training_step

DEFAULT_METHODS = "eager,triton,cuda,fastest_block,eager_compile,fastest_compile"
DRY_RUN = os.environ.get("VPT_GPU_DRY_RUN") == "1"
SETTINGS = {  # BenchConfig fields per setting; 50 deep prompts, bf16 autocast
    "vit_b": dict(model="vit_base_patch16_224", batch=128),
    "swin_b": dict(model="swin_base_patch4_window7_224", batch=64),
}
DRY_SETTINGS = {  # VPT_GPU_DRY_RUN=1: the same code paths on the CPU in seconds
    "vit_b": dict(model="vit_tiny_patch16_224", img_size=32, model_kwargs={"depth": 2}, batch=2, num_prompts=3),
    "swin_b": dict(model="swin_tiny_patch4_window7_224", img_size=56, batch=2, num_prompts=3,
                   model_kwargs={"depths": [1, 1], "num_heads": [1, 2], "embed_dim": 16}),
}
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
    if os.environ.get("VPT_REVISION"):  # a copy of the checkout without .git: the caller names the commit
        env["revision"] = os.environ["VPT_REVISION"]
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


def measure(method: str, cfg: BenchConfig, rounds: int, steps_per_round: int, warmup: int,
            flops: bool = True) -> dict:
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
    if rounds == 0:  # --warm: the caches are filled, nothing is timed
        print(f"[{method}] warmed in {setup_s:.1f} s", flush=True)
        return {"method": method, "backend": backend, "recompute": recompute, "compile": compiled,
                "status": "ok", "losses": losses, "setup_s": setup_s}
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
    if flops and not compiled:  # FLOPs of the same model uncompiled; last, so a failure here keeps the timing
        try:
            record["train_gflops"] = count_flops(lambda: training_step(model, x, y, cfg)) / 1e9
        except Exception as exc:  # noqa: BLE001  (recorded, not fatal: the timing stands)
            record["train_gflops_error"] = f"{type(exc).__name__}: {exc}"
    return record


def _base_record(method: str, cfg: BenchConfig) -> dict:
    return {"method": method, "config": asdict(cfg), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_one(args: argparse.Namespace, cfg: BenchConfig) -> int:
    """Child process: measure `args.one`, write <scratch>/<method>.json (an error record on failure)."""
    record = _base_record(args.one, cfg)
    status = 0
    try:
        record["env"] = full_environment()
        record.update(measure(args.one, cfg, 0 if args.warm else args.rounds, args.steps_per_round,
                              min(args.warmup, 1) if args.warm else args.warmup, flops=args.flops))
    except Exception as exc:  # noqa: BLE001  (every failure becomes a record)
        record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc()[-4000:])
        print(record["traceback"], file=sys.stderr, flush=True)
        status = 1
    write_json(os.path.join(args.one_dir, f"{args.one}.json"), record)
    return status


def _child_command(args: argparse.Namespace, cfg: BenchConfig, method: str, scratch: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--one", method, "--one-dir", scratch,
            "--model", cfg.model, "--batch", str(cfg.batch), "--prompts", str(cfg.num_prompts),
            "--dtype", cfg.dtype, "--device", cfg.device, "--model-kwargs", json.dumps(cfg.model_kwargs),
            "--rounds", str(args.rounds), "--steps-per-round", str(args.steps_per_round),
            "--warmup", str(args.warmup)] + (["--img-size", str(cfg.img_size)] if cfg.img_size else []) + (
        ["--warm"] if args.warm else []) + ([] if args.flops else ["--no-flops"])


_RUNNING: set = set()  # the children's process groups, killed with the parent (see _kill_children_on_term)


def _kill_children_on_term() -> None:
    """SIGTERM (run_gpu.sh's deadline) kills every child's process group too: each runs in its own
    group, which the caller's `timeout` does not reach, and must not keep the GPU busy after the cut."""
    def handler(signum, frame):
        for pid in list(_RUNNING):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _run_child(cmd: list[str], timeout: float, tag: str = "") -> tuple[Optional[int], list[str]]:
    """Runs cmd in its own process group, echoing its output (lines prefixed by `tag`); (exit code or
    None on timeout, the output's tail)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            process_group=0)
    _RUNNING.add(proc.pid)
    tail: collections.deque = collections.deque(maxlen=40)

    def pump():
        for line in proc.stdout:
            print(f"  {tag}| " + line, end="", flush=True)
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: Optional[int] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and the compile workers it started
        proc.wait()
        code = None
    _RUNNING.discard(proc.pid)
    reader.join(timeout=5)
    return code, list(tail)


def fastest_backend(records: list[dict], device: str) -> str:
    """The backend with the most img/s among the uncompiled, non-recomputing methods of `records`."""
    timed = [r for r in records if r.get("status") == "ok" and r.get("backend") in _TIMED_BACKENDS
             and r.get("recompute") == "none" and not r.get("compile") and r.get("img_per_s")]
    if timed:
        return max(timed, key=lambda r: r["img_per_s"])["backend"]
    from vpt_fast.backends import resolve_auto
    return resolve_auto("auto", torch.device(device))


def run_all(args: argparse.Namespace, cfg: BenchConfig) -> int:
    """Parent: each method in its own process, in order, until the deadline; the records go to
    `args.out` (rewritten after each), the table to stdout."""
    start = time.perf_counter()
    if args.deadline_at is not None:  # an absolute deadline (epoch seconds) does not lose our start-up time
        args.deadline_s = args.deadline_at - time.time()
    _kill_children_on_term()
    scratch = tempfile.mkdtemp(prefix="vpt_headline_")  # the children's records: never more files in $OUT
    prior = []
    if args.fastest_from and os.path.exists(args.fastest_from):
        with open(args.fastest_from) as f:
            prior = json.load(f).get("records", [])
    elif args.fastest_from:
        print(f"--fastest-from {args.fastest_from}: no such file; 'fastest' is chosen from this run", flush=True)
    command = " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    report = {"kind": "warm" if args.warm else "headline", "setting": args.setting, "dry_run": DRY_RUN,
              "config": asdict(cfg), "command": command, "records": []}
    results: dict[str, dict] = {}
    if args.append and os.path.exists(args.out):  # a later run of the same setting adds its methods
        with open(args.out) as f:
            report = json.load(f)
        if report.get("config") != asdict(cfg):
            raise SystemExit(f"--append: {args.out} holds another setting ({report.get('config')})")
        report["command"] += f"; then {command}"
        results = {r["method"]: r for r in report["records"]}  # 'fastest' also weighs these
    requests = [m for m in args.methods.split(",") if m]
    for requested in requests:  # a typo fails here, before any time is spent
        parse_method(requested.replace("fastest", "triton", 1) if requested.startswith("fastest") else requested)

    def resolve(requested: str) -> str:
        return requested.replace("fastest", fastest_backend(prior + list(results.values()), cfg.device), 1) \
            if requested.startswith("fastest") else requested

    def finish(method: str, requested: str, code: Optional[int], tail: list[str], timeout: float) -> None:
        path = os.path.join(scratch, f"{method}.json")
        if code is None or not os.path.exists(path):  # timed out or died before writing its record
            record = dict(_base_record(method, cfg), status="timeout" if code is None else "crashed",
                          error=f"exit code {code}" if code is not None else f"killed after {timeout:.0f} s",
                          output_tail="".join(tail))
        else:
            with open(path) as f:
                record = json.load(f)
        results[method] = dict(record, requested=requested)
        report["records"] = list(results.values())
        write_json(args.out, report)

    if args.warm:  # nothing is timed: every method compiles at the same time (CPU-bound work)
        timeout = min(args.compile_timeout_s, args.deadline_s)
        plan = {resolve(r): r for r in requests}
        print(f"\n=== {', '.join(plan)} at once (timeout {timeout:.0f} s)", flush=True)
        with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
            running = {m: pool.submit(_run_child, _child_command(args, cfg, m, scratch), timeout, m)
                       for m in plan}
        for method, future in running.items():
            finish(method, plan[method], *future.result(), timeout)
    for requested in requests if not args.warm else []:
        method = resolve(requested)
        if method in results:
            continue
        left = args.deadline_s - (time.perf_counter() - start)
        timeout = min(args.compile_timeout_s if method.endswith("_compile") else args.method_timeout_s, left)
        if timeout < args.min_method_s:
            results[method] = dict(_base_record(method, cfg), requested=requested, status="skipped",
                                   error=f"{left:.0f} s left of the {args.deadline_s:.0f} s deadline")
            report["records"] = list(results.values())
            write_json(args.out, report)
            print(f"[{method}] skipped: {results[method]['error']}", flush=True)
            continue
        print(f"\n=== {method} (timeout {timeout:.0f} s, {time.perf_counter() - start:.0f} s into the run)",
              flush=True)
        finish(method, requested, *_run_child(_child_command(args, cfg, method, scratch), timeout), timeout)
    failures = sum(r.get("status") != "ok" for r in results.values())
    print("\n" + format_table(report), flush=True)
    return 1 if failures else 0


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _env_line(env: dict) -> str:
    ext = env.get("ext") or {}
    keys = ("device", "driver", "capability", "sm_count", "torch", "triton", "cuda", "timm")
    return ", ".join([f"{k} {env[k]}" for k in keys if env.get(k)] + [
        f"extension built {ext.get('built')} (archs {','.join(ext.get('archs') or []) or '-'})"])


def format_table(report: dict) -> str:
    """Markdown table of one run's records, ratios against `eager` of the same run."""
    records = report.get("records", [])
    base = next((r for r in records if r.get("method") == "eager" and r.get("status") == "ok"), None)
    cfg = report.get("config", {})
    head = (f"{cfg.get('model')}, batch {cfg.get('batch')}, {cfg.get('num_prompts')} "
            f"{'deep' if cfg.get('deep') else 'shallow'} prompts, {cfg.get('dtype')}, training step"
            + (" (--warm: build, compile and two steps; nothing timed)" if report.get("kind") == "warm" else ""))
    lines = [head, "", "| method | img/s | speedup | ms/step | peak GiB | peak ratio | above resident GiB "
             "| GFLOP/step | loss first / last warm-up | setup s | status |", "|---|" + "---:|" * 9 + "---|"]
    for r in records:
        ok = r.get("status") == "ok"
        ips, peak = r.get("img_per_s"), r.get("peak_memory_bytes")
        speed = ips / base["img_per_s"] if ok and base and ips else None
        base_peak = base.get("peak_memory_bytes") if ok and base else None
        peak_ratio = peak / base_peak if peak and base_peak else None
        above = r.get("peak_above_resident_bytes")
        losses = r.get("losses")
        lines.append(
            f"| {r.get('method')} | {_num(ips, '.1f')} | {_num(speed, '.2f')} | {_num(r.get('step_ms_median'), '.2f')} "
            f"| {_num(None if peak is None else peak / 2**30, '.2f')} | {_num(peak_ratio, '.2f')} "
            f"| {_num(None if above is None else above / 2**30, '.2f')} | {_num(r.get('train_gflops'), '.1f')} "
            f"| {' / '.join(format(v, '.4f') for v in (losses[0], losses[-1])) if losses else '-'} "
            f"| {_num(r.get('setup_s'), '.0f')} "
            f"| {r.get('status')}{'' if ok else ': ' + str(r.get('error', ''))[:80]} |")
    return "\n".join(lines)


def format_smoke(report: dict) -> str:
    """Markdown tables of a gpu_smoke.py file: the checks and/or the attention times."""
    checks = [r for r in report.get("records", []) if r.get("check") != "time"]
    times = [r for r in report.get("records", []) if r.get("check") == "time"]
    lines = ["| check | backend | shape | dtype | status | worst (err / eager err / bound) | s |",
             "|---|---|---|---|---|---|---:|"] if checks else []
    for r in checks:
        worst = ""
        if r.get("tensors"):
            name, t = max(r["tensors"].items(), key=lambda kv: kv[1]["err"] / kv[1]["bound"])
            worst = f"{name}: {t['err']:.2e} / {t['eager_err']:.2e} / {t['bound']:.2e}"
        elif r.get("differing_elements") is not None:
            worst = f"differing elements over 2 reruns: {sum(r['differing_elements'].values())}"
        elif r.get("bf16"):
            name, t = max(r["bf16"].items(), key=lambda kv: kv[1]["err"] / kv[1]["bound"])
            worst = (f"fp32 max rel err {max(r['fp32_rel_err'].values()):.1e} (tol {r['fp32_tol']:g}); "
                     f"bf16 {name}: {t['err']:.2e} / {t['eager_err']:.2e} / {t['bound']:.2e}")
        error = f": {str(r.get('error'))[:100]}" if r.get("error") else ""
        lines.append(f"| {r.get('check')} | {r.get('backend', '-')} | {r.get('shape', '-')} | {r.get('dtype', '-')} "
                     f"| {r.get('status')}{error} | {worst} | {_num(r.get('seconds'), '.1f')} |")
    if times:
        names = sorted({k for r in times for k in r.get("ms", {})}, key=lambda k: (k.startswith("sdpa"), k))
        lines += ["" if lines else None,
                  "Attention forward + backward, bf16, median ms (SDPA on the already concatenated keys):", "",
                  "| shape | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for r in times:
            ms = r.get("ms", {})
            cells = [format(ms[n], ".3f") if isinstance(ms.get(n), float) else str(ms.get(n, "-"))[:40]
                     for n in names]
            lines.append(f"| {r.get('shape')} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line is not None).strip("\n")


def _ratio(report: Optional[dict], select: Callable[[dict], bool], base_method: str, key: str = "img_per_s"):
    """(value, method): `key` of the fastest record `select` accepts over `base_method`'s, same run."""
    if not report:
        return None, None
    records = [r for r in report.get("records", []) if r.get("status") == "ok" and r.get("img_per_s")]
    base = next((r for r in records if r.get("method") == base_method), None)
    found = [r for r in records if select(r)]
    if not base or not found:
        return None, None
    best = max(found, key=lambda r: r["img_per_s"])
    if not best.get(key) or not base.get(key):
        return None, best["method"]
    return best[key] / base[key], best["method"]


EXPECTED_CHECKS = {"attention": 4, "determinism": 2, "model": 1}  # per backend, gpu_smoke.py's checks
CHECK_GOALS = {"attention": "FlashAttention's 2x rule, bf16/fp16, ViT-B and Swin-B stage 0",
               "determinism": "bitwise-equal gradients over reruns",
               "model": "ViT-S/16 logits and gradients vs reference"}


def check_verdict(smokes: list[dict], backend: str, check: str) -> tuple[int, str]:
    """(records found, verdict) of one backend's kernel check: met only when every expected check ran ok."""
    runs = [r for s in smokes for r in s.get("records", []) if r.get("backend") == backend and r.get("check") == check]
    ok = sum(r.get("status") == "ok" for r in runs)
    statuses = sorted({r.get("status") for r in runs} - {"ok"})
    if ok == EXPECTED_CHECKS[check] and not statuses:
        return len(runs), "met"
    if "fail" in statuses or "error" in statuses:
        return len(runs), "missed (" + ", ".join(statuses) + ")"
    if not ok:
        return len(runs), "not measured"
    return len(runs), f"incomplete: {ok} of {EXPECTED_CHECKS[check]} ran ok"


def format_targets(headline: Optional[dict], swin: Optional[dict], smokes: list[dict]) -> str:
    """The acceptance targets with the ratio each run measured, met or missed (or not measured); a
    speed or memory row whose backend did not pass all its kernel checks says so."""
    def fast(r):
        return r.get("backend") in ("triton", "cuda") and r.get("recompute") == "none" and not r.get("compile")

    rows = [
        ("ViT-B/16 step, fastest backend / eager", ">= 1.5", _ratio(headline, fast, "eager"), lambda v: v >= 1.5),
        ("ViT-B/16 step under torch.compile, fastest / eager", ">= 1.25",
         _ratio(headline, lambda r: r.get("compile") and r.get("backend") != "reference", "eager_compile"),
         lambda v: v >= 1.25),
        ("ViT-B/16 peak memory, fastest backend / eager", "<= 0.6",
         _ratio(headline, fast, "eager", "peak_memory_bytes"), lambda v: v <= 0.6),
        ("ViT-B/16 peak memory, recompute=\"block\" / eager", "<= 0.15",
         _ratio(headline, lambda r: r.get("recompute") == "block", "eager", "peak_memory_bytes"), lambda v: v <= 0.15),
        ("Swin-B step, the ViT-B run's fastest backend / eager", ">= 1.5", _ratio(swin, fast, "eager"),
         lambda v: v >= 1.5),
    ]
    lines = ["| target | goal | measured | method | verdict |", "|---|---|---:|---|---|"]
    for name, goal, (value, method), met in rows:
        verdict = "not measured" if value is None else ("met" if met(value) else "missed")
        backend = (method or "").split("_")[0]
        if value is not None and smokes and backend in ("triton", "cuda") and any(
                check_verdict(smokes, backend, check)[1] != "met" for check in EXPECTED_CHECKS):
            verdict += f" ({backend} did not pass all its kernel checks)"
        lines.append(f"| {name} | {goal} | {_num(value, '.3f')} | {method or '-'} | {verdict} |")
    for backend in ("cuda", "triton"):
        for check, goal in CHECK_GOALS.items():
            found, verdict = check_verdict(smokes, backend, check)
            lines.append(f"| {'CUDA' if backend == 'cuda' else 'Triton'} kernels: {check} | {goal} "
                         f"| {found} checks | {backend} | {verdict} |")
    return "\n".join(lines)


def _load(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def summarize(directory: str) -> str:
    """The README of one acceptance call's files in `directory` (smoke_*.json, warm*.json,
    headline.json, swin.json): environment, commands, targets, tables."""
    smoke_triton, smoke_cuda, smoke_time = (_load(os.path.join(directory, f"smoke_{n}.json"))
                                            for n in ("triton", "cuda", "time"))
    smokes = [s for s in (smoke_triton, smoke_cuda, smoke_time) if s]
    headline, swin, warm, warm_cuda = (_load(os.path.join(directory, f"{n}.json"))
                                       for n in ("headline", "swin", "warm", "warm_cuda"))
    runs = [r for r in (headline, swin, warm, warm_cuda) if r]
    # the environment as measured after the extension's build (warm and the triton checks run beside it)
    envs = [r.get("env") for run in (headline, swin) if run for r in run.get("records", [])] + [
        s.get("env") for s in (smoke_cuda, smoke_time)
        if s] + [r.get("env") for run in (warm_cuda, warm) if run for r in run.get("records", [])] + [
        (smoke_triton or {}).get("env")]
    env = next((e for e in envs if e), {})
    out = [f"# GPU acceptance call: {env.get('device', 'unknown device')}", "",
           f"Environment: {_env_line(env)}.", ""]
    git = env.get("git") or {}
    revision = env.get("revision") or (
        git.get("commit", "") + (" (with uncommitted changes)" if git.get("dirty") else ""))
    if revision:
        out += [f"vpt_fast revision: {revision}.", ""]
    if any(s.get("dry_run") for s in smokes) or any(r.get("dry_run") for r in runs):
        out += ["**Dry run** (VPT_GPU_DRY_RUN=1, tiny shapes on the CPU): no number here is a GPU measurement.", ""]
    out += ["Commands (`bash benchmarks/run_gpu.sh acceptance` ran them in this order; all ratios below are "
            "from this one call):", ""]
    out += [f"- `{s['command']}`" for s in smokes if s.get("command")]
    out += [f"- `{r['command']}`" for r in (warm, warm_cuda, headline, swin) if r and r.get("command")]
    out += ["", "## Targets", "", format_targets(headline, swin, smokes)]
    if smokes:
        out += ["", "## Kernel checks (benchmarks/gpu_smoke.py)"]
    for smoke in smokes:
        out += ["", f"Backends {smoke.get('backends')}, {smoke.get('seconds', '-')} s:", "", format_smoke(smoke)]
    warm_title = ("## Compile caches filled before the timed methods (setup s: compiled beside the build, the "
                  "kernel checks and each other, so longer than one compile alone)")
    for title, run in (("## ViT-B/16 training step", headline), ("## Swin-B training step", swin),
                       (warm_title, warm), ("", warm_cuda)):
        if run:
            out += ["", title or warm_title, "", format_table(run)]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--out", help="the run's JSON file (rewritten after every method)")
    parser.add_argument("--setting", default="vit_b", choices=sorted(SETTINGS),
                        help="model and batch (VPT_GPU_DRY_RUN=1: their tiny CPU versions)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list, in order: <backend>[_mlp|_block][_compile], 'eager' = reference, "
                             "'fastest' = the fastest backend so far")
    parser.add_argument("--fastest-from", metavar="FILE", help="another run's JSON whose fastest backend counts too")
    parser.add_argument("--warm", action="store_true", help="build, compile and run two steps per method; no timing")
    parser.add_argument("--model", help="overrides the setting's model")
    parser.add_argument("--model-kwargs", type=json.loads, help="JSON: more timm.create_model arguments")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch", type=int, help="overrides the setting's batch")
    parser.add_argument("--prompts", type=int, help="deep prompts per block (default 50)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if cuda and not DRY_RUN else "cpu")
    parser.add_argument("--rounds", type=int, default=2 if DRY_RUN else 7, help="timed rounds (median reported)")
    parser.add_argument("--steps-per-round", type=int, default=1 if DRY_RUN else 5)
    parser.add_argument("--warmup", type=int, default=1 if DRY_RUN else 3, help="steps after the first, untimed")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="no method starts past this many seconds")
    parser.add_argument("--deadline-at", type=float, help="instead: no method starts past this time (epoch seconds)")
    parser.add_argument("--append", action="store_true",
                        help="add this run's methods to --out's records (same setting; ratios within one call)")
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip the FLOP count per uncompiled method (exact and device-independent; ~5 s each)")
    parser.add_argument("--method-timeout-s", type=float, default=180.0)
    parser.add_argument("--compile-timeout-s", type=float, default=300.0)
    parser.add_argument("--min-method-s", type=float, default=30.0, help="skip a method with less time left")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: measure this method only
    parser.add_argument("--one-dir", help=argparse.SUPPRESS)  # child: where its record goes
    parser.add_argument("--summarize", metavar="DIR", help="print the README of DIR's JSON files and exit")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize), end="")
        return 0
    if not args.out and not args.one:
        parser.error("--out is required")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fields = {"num_prompts": 50, **(DRY_SETTINGS if DRY_RUN else SETTINGS)[args.setting]}
    overrides = dict(model=args.model, batch=args.batch, num_prompts=args.prompts, img_size=args.img_size,
                     model_kwargs=args.model_kwargs)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    cfg = BenchConfig(deep=True, dtype=args.dtype, device=args.device, **fields)
    return run_one(args, cfg) if args.one else run_all(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
