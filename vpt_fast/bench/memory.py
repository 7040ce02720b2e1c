"""Peak memory of a whole training step: full fine-tuning, linear probe, eager VPT and vpt_fast.

Behind `vpt-fast memory --total` and `vpt-fast memory --max-batch`. Each (method, batch) runs in a
fresh process (`vpt_fast.bench.in_fresh_process`), which builds the model, creates the AdamW state and
runs one training step (forward, backward, optimizer step). The number reported is measured:

- CUDA: `torch.cuda.max_memory_allocated()` over model creation and the step, less what was allocated
  after imports (nothing, in a fresh process).
- CPU: the peak of the process's anonymous resident memory (tensors, heap) less that after imports
  (torch, timm, vpt_fast). The peak is the resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs once imports are done) less the file-backed resident pages at the end of the
  step: shared-library code paged in on first use is shared with every other process and is not what
  a training method costs. The process runs with MALLOC_MMAP_THRESHOLD_=65536, so every tensor over
  64 KiB has its own mapping and leaves the resident set when freed: the peak is that of the tensors
  alive together.

So the peak holds parameters and buffers, gradients, optimizer state, activations, the input batch and
workspace. AdamW creates its state lazily at its first step; the probe creates it before the measured
step (one `step()` on zero gradients), so the measured step is a steady-state one, as every step after
the first of a real run. The split reported beside the peak counts tensors: parameters + buffers,
gradients + optimizer state (their sizes after backward and after the step), and the rest of the peak
(activations, workspace, allocator slack).
"""
from __future__ import annotations

import json
import math
import re
import resource
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vpt_fast.bench.core import BenchConfig, autocast, build_model, create_timm_model, in_fresh_process, make_batch

MODEL_ALIASES = {
    "vit_t": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
    "vit_h": "vit_huge_patch14_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}


def resolve_model_name(name: str) -> str:
    """A short alias (`vit_b`, `vit_l`, `vit_h`, `swin_b`, ...) or any timm model name."""
    return MODEL_ALIASES.get(name, name)


@dataclass(frozen=True)
class Method:
    """One way to train: what is trainable and which forward runs.

    Args:
        label: the name printed in tables and plots.
        kind: "full" (plain timm model, every parameter trainable), "linear" (plain timm model, head
            only) or "vpt" (`vpt_fast.prompt`: prompts and head trainable).
        backend: the vpt_fast backend for kind "vpt".
        recompute: the vpt_fast recompute mode for kind "vpt".
    """

    label: str
    kind: str
    backend: Optional[str] = None
    recompute: str = "none"


def methods(backend: str = "auto") -> dict[str, Method]:
    """Every method `vpt-fast memory --total` compares, by key; vpt_fast runs on `backend`."""
    return {
        "full": Method("full fine-tuning", "full"),
        "linear": Method("linear probe", "linear"),
        "eager": Method("eager VPT (release-style)", "vpt", "reference"),
        "vpt_fast": Method(f"vpt_fast[{backend}]", "vpt", backend),
        "vpt_fast_mlp": Method(f"vpt_fast[{backend}] recompute=mlp", "vpt", backend, "mlp"),
        "vpt_fast_block": Method(f"vpt_fast[{backend}] recompute=block", "vpt", backend, "block"),
    }


def build_method_model(cfg: BenchConfig, method: Method) -> torch.nn.Module:
    """The model `method` trains, with the seeded random weights every method shares."""
    if method.kind == "vpt":
        return build_model(cfg, method.backend, method.recompute)
    if method.kind not in ("full", "linear"):
        raise ValueError(f"method.kind must be 'full', 'linear' or 'vpt', got {method.kind!r}")
    torch.manual_seed(cfg.seed)
    model = create_timm_model(cfg)
    if method.kind == "linear":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model.to(cfg.device).train()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class _PeakMeter:
    """Peak memory from now on, less what is held now (anonymous resident memory on CPU, allocated
    memory on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
            self.device = device
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            warnings.warn("cannot reset the resident-set peak (/proc/self/clear_refs): the CPU peak "
                          "also covers import-time transients", stacklevel=2)
        self.baseline = _status_bytes("RssAnon")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        shared_pages = _status_bytes("RssFile") + _status_bytes("RssShmem")
        return _status_bytes("VmHWM") - shared_pages - self.baseline


def _cap_address_space(limit_bytes: int) -> None:
    """Guard for budget probes on a shared CPU machine: allocations past the budget (plus slack for
    thread stacks and malloc arenas, which reserve address space without using it) fail instead of
    taking the machine's memory."""
    cap = _status_bytes("VmSize") + int(1.25 * limit_bytes) + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def probe_step_memory(cfg: BenchConfig, method: Method, limit_bytes: Optional[int] = None) -> dict:
    """In this (fresh) process: peak memory of one steady-state AdamW training step of `method`.

    Args:
        cfg: model, batch, prompts, dtype and device.
        method: what is trained (see `Method`).
        limit_bytes: on the CPU, refuse allocations well past this budget (see `_cap_address_space`);
            a refused allocation returns {"out_of_memory": True}.
    Returns:
        peak_bytes, param_bytes (parameters and buffers), grad_optimizer_bytes (gradients after
        backward + optimizer state after the step), other_bytes (the rest of the peak),
        trainable_params; or {"out_of_memory": True, "error": ...}.
    """
    device = torch.device(cfg.device)
    meter = _PeakMeter(device)
    if limit_bytes is not None and device.type == "cpu":
        _cap_address_space(limit_bytes)
    try:
        model = build_method_model(cfg, method)
        x, y = make_batch(cfg, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        for p in trainable:  # AdamW's state exists from the first step on: create it now
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with autocast(cfg):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        grad_bytes = sum(p.grad.nbytes for p in trainable if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = meter.peak()
    except (RuntimeError, MemoryError) as exc:  # out of memory is an answer; anything else is a bug
        if not _is_out_of_memory(exc):
            raise
        return {"out_of_memory": True, "error": str(exc).splitlines()[0][:300]}
    param_bytes = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    state_bytes = sum(v.nbytes for state in optimizer.state.values() for v in state.values()
                      if torch.is_tensor(v))
    return {"out_of_memory": False, "peak_bytes": peak, "param_bytes": param_bytes,
            "grad_optimizer_bytes": grad_bytes + state_bytes,
            "other_bytes": peak - param_bytes - grad_bytes - state_bytes,
            "trainable_params": sum(p.numel() for p in trainable)}


def step_memory(cfg: BenchConfig, method: Method, limit_bytes: Optional[int] = None) -> dict:
    """`probe_step_memory` in a fresh process."""
    return in_fresh_process("vpt_fast.bench.memory", {"cfg": asdict(cfg), "method": asdict(method),
                                                      "limit_bytes": limit_bytes})


def total_memory(cfg: BenchConfig, chosen: dict[str, Method], batches: list[int],
                 log: Callable[[str], None] = print) -> dict[int, dict[str, dict]]:
    """Peak training-step memory of every method at every batch size: {batch: {key: result}}, each
    result with `ratio_to_full` when full fine-tuning is among the methods."""
    results: dict[int, dict[str, dict]] = {}
    done, total = 0, len(batches) * len(chosen)
    for batch in batches:
        results[batch] = {}
        for key, method in chosen.items():
            done += 1
            log(f"[{done}/{total}] {method.label}, batch {batch} ...")
            result = step_memory(replace(cfg, batch=batch), method)
            log(f"    peak {result['peak_bytes'] / 2**20:.1f} MiB")
            results[batch][key] = result
        if "full" in chosen:
            for result in results[batch].values():
                result["ratio_to_full"] = result["peak_bytes"] / results[batch]["full"]["peak_bytes"]
    return results


def largest_batch(peak_of: Callable[[int], Optional[int]], budget: int, batch_limit: Optional[int] = None,
                  first: int = 8) -> int:
    """The largest batch whose peak `peak_of(batch)` (None: the probe could not run) is within `budget`,
    assuming the peak grows with the batch. 0 if batch 1 does not fit; `batch_limit` if it still fits there.

    A step's peak is close to linear in the batch, so after probing 1 and `first`, each probe is the
    batch where a line reaches the budget: through the two largest probes until one fails, then
    through the ends of the bracket (largest batch that fits, smallest that does not; regula falsi
    with the Illinois rule), kept strictly inside it. Typically four probes in all, the last two a
    fitting batch and the one past it. A probe that could not run (allocations refused) bounds the
    bracket without a peak. The search always ends bracketed by measurements.
    """
    if batch_limit is not None and batch_limit < 1:
        raise ValueError(f"batch_limit must be >= 1 or None, got {batch_limit}")
    good, bad = 0, None
    peaks: dict[int, int] = {}

    def probe(batch: int) -> Optional[bool]:
        """Fits the budget (None: could not run); updates the bracket."""
        nonlocal good, bad
        peak = peak_of(batch)
        if peak is not None:
            peaks[batch] = peak
        if peak is not None and peak <= budget:
            good = batch
        else:
            bad = batch
        return None if peak is None else peak <= budget

    probe(1)
    excess = {"good": 1.0, "bad": 1.0}  # weights of the bracket ends' excess over the budget
    last_moved = None
    while good and good != batch_limit and (bad is None or bad - good > 1):
        if len(peaks) < 2:
            guess = first
        elif bad is None or bad not in peaks:  # no failing peak: extend the line of the two largest fits
            b1, b2 = sorted(b for b in peaks if b <= good)[-2:]
            slope = (peaks[b2] - peaks[b1]) / (b2 - b1)
            guess = b2 + math.floor((budget - peaks[b2]) / slope) if slope > 0 else 2 * good
            if bad is not None and guess >= bad:  # the line overshot a probe that could not run
                guess = (good + bad) // 2
        else:  # the line through the bracket's ends (regula falsi)
            low, high = (peaks[good] - budget) * excess["good"], (peaks[bad] - budget) * excess["bad"]
            guess = good + math.floor((bad - good) * -low / (high - low))
        guess = max(good + 1, min(guess, bad - 1 if bad is not None else guess, batch_limit or guess))
        kept_good = good
        probe(guess)
        moved = "good" if good != kept_good else "bad"
        # Illinois rule: an end kept twice in a row weighs half, so a curved peak cannot stall the line
        if moved == last_moved:
            excess["bad" if moved == "good" else "good"] /= 2
        else:
            excess = {"good": 1.0, "bad": 1.0}
        last_moved = moved
    return good


def max_batch(cfg: BenchConfig, method: Method, budget_bytes: int, batch_limit: Optional[int] = None,
              log: Callable[[str], None] = print) -> dict:
    """The largest batch whose training step of `method` peaks at no more than `budget_bytes`
    (searched by `largest_batch`).

    Returns:
        batch (0 if even batch 1 does not fit), peak_bytes at that batch, reached_limit (the search
        stopped at `batch_limit` with the step still fitting) and probes: {batch: peak or None}, None
        for a probe whose allocations were refused past the budget.
    """
    probes: dict[int, Optional[int]] = {}

    def peak_of(batch: int) -> Optional[int]:
        result = step_memory(replace(cfg, batch=batch), method, limit_bytes=budget_bytes)
        peak = None if result["out_of_memory"] else result["peak_bytes"]
        probes[batch] = peak
        verdict = "fits" if peak is not None and peak <= budget_bytes else "over budget"
        shown = "allocation refused" if peak is None else f"{peak / 2**30:.2f} GiB"
        log(f"  {method.label}: batch {batch} -> {shown} ({verdict})")
        return peak

    batch = largest_batch(peak_of, budget_bytes, batch_limit)
    return {"batch": batch, "peak_bytes": probes.get(batch), "probes": probes,
            "reached_limit": batch_limit is not None and batch == batch_limit}


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'16GiB', '512MiB', '2GB', '1e9' style sizes (no unit: bytes) to bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"a size must look like 16GiB, 512MiB or 2GB, got {text!r}")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()]
    if value < 1 or not math.isfinite(value):
        raise ValueError(f"a size must be at least one byte, got {text!r}")
    return int(value)


def format_total_table(results: dict[int, dict[str, dict]], chosen: dict[str, Method]) -> str:
    """One row per (batch, method): peak, ratio to full fine-tuning and the split, in MiB."""
    head = (f"{'batch':>5}  {'method':<34}{'peak MiB':>10}{'vs full FT':>11}{'params':>10}"
            f"{'grads+opt':>11}{'act.+rest':>11}")
    lines = [head, "-" * len(head)]
    for batch, by_method in results.items():
        for key, r in by_method.items():
            ratio = f"{r['ratio_to_full']:11.2f}" if "ratio_to_full" in r else f"{'-':>11}"
            lines.append(f"{batch:>5}  {chosen[key].label:<34}{r['peak_bytes'] / 2**20:10.1f}{ratio}"
                         f"{r['param_bytes'] / 2**20:10.1f}{r['grad_optimizer_bytes'] / 2**20:11.1f}"
                         f"{r['other_bytes'] / 2**20:11.1f}")
    return "\n".join(lines)


def format_max_batch_table(results: dict[str, dict], chosen: dict[str, Method]) -> str:
    """One row per method: the largest batch within the budget, its peak, and the batch as a multiple
    of full fine-tuning's."""
    head = f"{'method':<34}{'largest batch':>14}{'peak GiB':>10}{'vs full FT':>11}"
    lines = [head, "-" * len(head)]
    full = results.get("full", {}).get("batch")
    for key, r in results.items():
        batch = f"{'>=' if r['reached_limit'] else ''}{r['batch']}"
        peak = f"{r['peak_bytes'] / 2**30:10.2f}" if r["peak_bytes"] is not None else f"{'-':>10}"
        ratio = f"{r['batch'] / full:11.2f}" if full else f"{'-':>11}"
        lines.append(f"{chosen[key].label:<34}{batch:>14}{peak}{ratio}")
    return "\n".join(lines)


def plot_total(results: dict[int, dict[str, dict]], chosen: dict[str, Method], title: str, path: str) -> None:
    """Stacked bars per method (parameters / gradients + optimizer state / activations + rest), one
    panel per batch size, each bar labelled with its ratio to full fine-tuning."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'vpt_fast[plot]'") from exc
    batches = list(results)
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 1.0 + 4.2 * len(batches)), 5.2), squeeze=False,
                             sharey=True)
    parts = [("param_bytes", "parameters + buffers", "#4c72b0"),
             ("grad_optimizer_bytes", "gradients + optimizer state", "#dd8452"),
             ("other_bytes", "activations + workspace", "#55a868")]
    for ax, batch in zip(axes[0], batches):
        keys = list(results[batch])
        bottom = [0.0] * len(keys)
        for field, label, color in parts:
            heights = [max(results[batch][k][field], 0) / 2**30 for k in keys]
            ax.bar(range(len(keys)), heights, bottom=bottom, color=color, label=label)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for i, k in enumerate(keys):
            r = results[batch][k]
            text = f"{r['ratio_to_full']:.2f}x" if "ratio_to_full" in r else f"{r['peak_bytes'] / 2**30:.2f}"
            ax.text(i, r["peak_bytes"] / 2**30, text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([chosen[k].label.replace(" recompute=", "\nrecompute=").replace(" (", "\n(")
                            for k in keys], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("peak memory of a training step (GiB)")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title.replace(": ", ":\n", 1), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":  # probe subprocess (see step_memory)
    request = json.loads(sys.argv[1])
    print(json.dumps(probe_step_memory(BenchConfig(**request["cfg"]), Method(**request["method"]),
                                       request["limit_bytes"])))
