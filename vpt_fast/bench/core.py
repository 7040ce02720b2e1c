"""Measurements behind `vpt-fast bench` / `vpt-fast memory` and the benchmark suite.

Every number is measured, never estimated: FLOPs with `torch.utils.flop_counter.FlopCounterMode`
(exact, any device), bytes saved for backward with `saved_tensors_hooks` (exact), resident activation
memory as the RSS growth across a forward pass in a fresh process started with
MALLOC_MMAP_THRESHOLD_=65536 (CPU) or `torch.cuda.memory_allocated` (CUDA), speed as medians of
interleaved runs in one process (CUDA: synchronised, after warm-up).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vpt_fast.backends import available_backends, resolve_auto, validate_backend
from vpt_fast.blocks.common import ignore_measurement_hooks
from vpt_fast.prompting import prompt
from vpt_fast.version import __version__

aten = torch.ops.aten


@dataclass
class BenchConfig:
    """One benchmark setting (the embedded default is the `vpt-fast bench` main job)."""

    model: str = "vit_small_patch16_224"
    batch: int = 8
    num_prompts: int = 50
    deep: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    num_classes: int = 100
    img_size: Optional[int] = None
    steps: int = 5
    warmup: int = 1
    seed: int = 0
    backends: list[str] = field(default_factory=list)  # empty: every available backend
    recompute: str = "none"
    compile: bool = False
    model_kwargs: dict = field(default_factory=dict)  # more timm.create_model arguments (e.g. depth)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


def _sdpa_flops(q_shape, k_shape) -> int:
    batch, heads, nq, d = q_shape
    return 4 * batch * heads * nq * k_shape[-2] * d


def flop_mapping() -> dict:
    """FLOP formulas for the CPU flash attention kernels eager timm and the torch backend use, which
    FlopCounterMode does not count by itself (the formulas receive shapes)."""
    return {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: _sdpa_flops(q, k),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda dout, q, k, v, *args, out_shape=None, **kwargs: int(2.5 * _sdpa_flops(q, k)),
    }


def create_timm_model(cfg: BenchConfig, **model_kwargs) -> torch.nn.Module:
    """`cfg`'s unprompted timm model with random weights (not seeded here): `cfg.model_kwargs`,
    `cfg.img_size` and `model_kwargs` become `timm.create_model` arguments."""
    import timm
    kwargs = dict(cfg.model_kwargs, **model_kwargs, **({} if cfg.img_size is None else {"img_size": cfg.img_size}))
    return timm.create_model(cfg.model, pretrained=False, num_classes=cfg.num_classes, **kwargs)


def build_model(cfg: BenchConfig, backend: str = "reference", recompute: Optional[str] = None) -> torch.nn.Module:
    """The prompted model of `cfg` with random weights (identical for every backend: seeded)."""
    torch.manual_seed(cfg.seed)
    model = create_timm_model(cfg)
    prompt(model, num_prompts=cfg.num_prompts, deep=cfg.deep, backend=backend,
                    recompute=recompute or cfg.recompute)
    with torch.no_grad():  # random, not initial, prompts
        for name, tensor in model.vpt.state_tensors().items():
            if name.startswith("prompts"):
                tensor.normal_(0, 0.5)
    return model.to(cfg.device).train()


def check_model(cfg: BenchConfig) -> None:
    """Build `cfg`'s prompted model on the meta device (no memory, no compute) and run a forward of
    one image: raises what building or running it would raise (unknown or unsupported model, image
    size the patch embedding or windows refuse, bad prompt settings) in about a second, before any
    measurement starts."""
    # warnings about the model come once, from the real build; this throwaway copy keeps quiet
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_timm_model(cfg)
        prompt(model, num_prompts=cfg.num_prompts, deep=cfg.deep, backend="reference")
        with torch.no_grad():
            model(torch.empty(1, 3, *_image_size(model)))


def _image_size(model: torch.nn.Module) -> tuple[int, int]:
    return model.patch_embed.img_size if hasattr(model.patch_embed, "img_size") else (224, 224)


def make_batch(cfg: BenchConfig, model: torch.nn.Module):
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, 3, *_image_size(model), generator=g).to(cfg.device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g).to(cfg.device)
    return x, y


def autocast(cfg: BenchConfig):
    """Autocast to `cfg.dtype` on `cfg.device` (disabled for float32)."""
    enabled = cfg.torch_dtype != torch.float32
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=cfg.torch_dtype, enabled=enabled)


def training_step(model, x, y, cfg: BenchConfig, optimizer=None):
    with autocast(cfg):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss


def count_flops(fn: Callable[[], object]) -> int:
    # the counter's module tracker hooks every module globally; the fused blocks must not warn about it
    with ignore_measurement_hooks(), FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        fn()
    return counter.get_total_flops()


def saved_activation_bytes(model, x, cfg: BenchConfig) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters and
    buffers excluded): exact on any device."""
    from torch.autograd.graph import saved_tensors_hooks
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t), autocast(cfg):
        out = model(x)
    del out
    return sum(saved.values())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_activation_memory(cfg: BenchConfig, backend: str, recompute: str) -> dict:
    """In this process: memory held by the autograd graph after one training forward."""
    model = build_model(cfg, backend, recompute)
    x, y = make_batch(cfg, model)
    training_step(model, x, y, cfg)  # warm-up: allocator pools, lazy inits
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with autocast(cfg):
            loss = F.cross_entropy(model(x).float(), y)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        return {"activation_bytes": held, "peak_bytes": torch.cuda.max_memory_allocated() - before}
    before = _rss_bytes()
    with autocast(cfg):
        loss = F.cross_entropy(model(x).float(), y)
    held = _rss_bytes() - before
    return {"activation_bytes": held, "peak_bytes": None}


def in_fresh_process(module: str, request: dict) -> dict:
    """Run `python -m <module> <request as JSON>` in a fresh process and return the JSON object its
    last stdout line holds. CPU memory probes rely on it: MALLOC_MMAP_THRESHOLD_=65536 gives every
    tensor over 64 KiB its own mapping, returned to the system when freed, so the resident set
    follows the tensors alive.

    Args:
        module: the module whose `__main__` block (a package: its `__main__.py`) answers the request.
        request: JSON-serialisable arguments for it.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(request)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe `python -m {module}` failed for {request}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def activation_memory(cfg: BenchConfig, backend: str, recompute: str = "none") -> dict:
    """`probe_activation_memory` in a fresh process (`in_fresh_process`, `python -m vpt_fast.bench`):
    RSS growth across the forward is what the graph holds."""
    return in_fresh_process("vpt_fast.bench", {"cfg": asdict(cfg), "backend": backend, "recompute": recompute})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], object]], steps: int, warmup: int, device: str,
                      progress: Optional[Callable[[str], None]] = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin so drift hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for step in range(steps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if progress:
            progress(f"  timing round {step + 1}/{steps}")
    return times


def source_revision() -> Optional[dict]:
    """{"commit": `git rev-parse HEAD`, "dirty": tracked files differ from it} of the git checkout
    vpt_fast runs from; None when the package is not a git checkout of its own (an installed wheel,
    also one inside another project's repository)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # vpt_fast/bench/core.py

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=False)
    try:
        toplevel, head = git("rev-parse", "--show-toplevel"), git("rev-parse", "HEAD")
    except FileNotFoundError:  # git is not installed
        return None
    if toplevel.returncode or head.returncode or os.path.realpath(toplevel.stdout.strip()) != os.path.realpath(root):
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(changes.stdout.strip())}


def environment() -> dict:
    """Versions, device and the vpt_fast commit (`source_revision`) a measurement ran with."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "vpt_fast": __version__, "git": source_revision()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import timm
    info["timm"] = timm.__version__
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = platform.processor() or "cpu"
    return info


def bench_backends(cfg: BenchConfig) -> tuple[list[str], dict[str, str]]:
    """The vpt_fast backends `run_bench` times for `cfg.backends` (empty: every available one but
    reference, which is the eager baseline), and those it skips, with the reason.

    Raises:
        ValueError: a name that is not a backend.
    """
    timed, skipped = [], {}
    for backend in dict.fromkeys(cfg.backends or available_backends()):  # in order, once each
        if backend == "triton" and not cfg.device.startswith("cuda"):
            skipped[backend] = (f"it is timed on CUDA devices only, not {cfg.device!r} (Triton's CPU "
                                f"interpreter is for tests)")
            continue
        try:
            validate_backend(backend)
        except RuntimeError as exc:
            skipped[backend] = str(exc)
            continue
        if backend != "reference" or cfg.backends:
            timed.append(backend)
    return timed, skipped


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Eager release-style VPT vs each backend: img/s (train, inference), activation memory, FLOPs,
    max |logit difference| vs eager. Returns one row per method."""
    backends, skipped = bench_backends(cfg)
    if not backends:
        raise ValueError(f"no backend left to time of {cfg.backends}: {skipped}")
    methods = [("eager", "reference")] + ([("eager+compile", "reference")] if cfg.compile else [])
    methods += [(f"vpt_fast[{b}]", b) for b in backends]
    if cfg.compile:
        fastest = resolve_auto("auto", torch.device(cfg.device))
        methods.append((f"vpt_fast[{fastest}]+compile", fastest))
    log(f"vpt-fast bench: {cfg.model}, batch {cfg.batch}, {cfg.num_prompts} {'deep' if cfg.deep else 'shallow'}"
        f" prompts, {cfg.dtype}, {cfg.device}, recompute={cfg.recompute}")
    for backend, reason in skipped.items():
        log(f"skipping backend {backend!r}: {reason}")
    models, steps_train, steps_infer, rows = {}, {}, {}, []
    for name, backend in methods:
        log(f"[build] {name}")
        model = build_model(cfg, backend)
        x, y = make_batch(cfg, model)
        compiled = name.endswith("+compile")
        runner = torch.compile(model) if compiled else model
        models[name] = (model, runner, x, y)
        steps_train[name] = (lambda r=runner, m=model, x=x, y=y: training_step(r, x, y, cfg))
        steps_infer[name] = (lambda r=runner, x=x: infer(r, x, cfg))
    log("[time] training steps (forward + backward), interleaved")
    t_train = interleaved_times(steps_train, cfg.steps, cfg.warmup, cfg.device, log)
    log("[time] inference, interleaved")
    t_infer = interleaved_times(steps_infer, cfg.steps, cfg.warmup, cfg.device, log)
    ref_logits = infer(models["eager"][1], models["eager"][2], cfg).float()
    for name, backend in methods:
        model, runner, x, y = models[name]
        log(f"[measure] {name}: FLOPs, memory, logits")
        compiled = name.endswith("+compile")  # FLOPs and memory: those of the same model uncompiled
        flops = None if compiled else count_flops(lambda m=model, x=x, y=y: training_step(m, x, y, cfg))
        mem = {} if compiled else activation_memory(cfg, backend, cfg.recompute)
        logits = infer(runner, x, cfg).float()
        rows.append({
            "method": name, "backend": backend,
            "train_img_s": cfg.batch / statistics.median(t_train[name]),
            "infer_img_s": cfg.batch / statistics.median(t_infer[name]),
            "activation_bytes": mem.get("activation_bytes"), "peak_bytes": mem.get("peak_bytes"),
            "train_gflops": None if flops is None else flops / 1e9,
            "max_logit_diff": (logits - ref_logits).abs().max().item(),
        })
    return rows


def infer(model, x, cfg: BenchConfig):
    """`model(x)` without gradients, under `cfg`'s autocast."""
    with torch.inference_mode(), autocast(cfg):
        return model(x)


def format_table(rows: list[dict]) -> str:
    base = rows[0]
    head = (f"{'method':<26}{'train img/s':>12}{'speedup':>9}{'infer img/s':>12}{'act. MiB':>10}{'act. ratio':>11}"
            f"{'GFLOP/step':>11}{'FLOP ratio':>11}{'max|dlogit|':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = r["activation_bytes"]
        mem_s = f"{mem / 2**20:10.1f}" if mem is not None else f"{'-':>10}"
        has_ratio = mem is not None and base["activation_bytes"]
        mem_r = f"{mem / base['activation_bytes']:11.2f}" if has_ratio else f"{'-':>11}"
        fl = r["train_gflops"]
        fl_s = f"{fl:11.1f}{fl / base['train_gflops']:11.3f}" if fl is not None else f"{'-':>11}{'-':>11}"
        lines.append(f"{r['method']:<26}{r['train_img_s']:12.2f}{r['train_img_s'] / base['train_img_s']:9.2f}"
                     f"{r['infer_img_s']:12.2f}{mem_s}{mem_r}{fl_s}{r['max_logit_diff']:12.2e}")
    return "\n".join(lines)

