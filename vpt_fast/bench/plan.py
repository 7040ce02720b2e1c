"""Memory planner: the predicted peak of one AdamW training step per method, without allocating the model.

Behind `vpt-fast memory --plan`. The step `vpt-fast memory --total` measures is *simulated*, not
estimated from a formula:

1. The model is built on the meta device (no memory, random init skipped), prompted like the measured
   one (`vpt_fast.prompt`, same backend and recompute mode), and its parameters and buffers are replaced
   by fake CPU tensors (`torch._subclasses.FakeTensorMode`): shapes, dtypes and strides, no data.
2. The same step as `probe_step_memory` runs on them: AdamW's state created by a warm step on zero
   gradients, then forward (under autocast for bf16/fp16), `cross_entropy`, backward, `optimizer.step()`,
   `zero_grad`. Every aten op runs (its fake kernel), so the step allocates and frees exactly the
   tensors the real one does, through the same vpt_fast autograd Functions, recompute modes and
   torch's own AdamW (a `.item()` of the step count answers 1).
3. A dispatch mode (`_LiveBytes`) sees every op's outputs and keeps the bytes of the distinct storages
   alive (a weak reference to each storage says when it is freed): after each op it records the live
   bytes, and the bytes among them that FSDP would shard (parameters, gradients, optimizer state, the
   optimizer step's temporaries).

Every tensor's size is affine in the batch, and the op sequence does not depend on it, so the step is
simulated at two batches (2 and 4) and each recorded point is a line `a + b * batch`: the peak at any
batch is the largest of the lines there, and the largest batch within a budget is where the first line
crosses it (exact under that model; checked: the two traces must have the same length, else `step_model`
raises). Python's cyclic garbage collector is paused while a step is simulated, so the two traces free
in the same order.

What the simulation cannot see: memory a kernel allocates inside one op (BLAS/oneDNN packing, the CPU
flash-attention kernel's per-thread buffers) and the allocator's slack; on CUDA also the CUDA context,
cuBLAS workspaces and the caching allocator's fragmentation. `RUNTIME_OVERHEAD` would add a constant for
them; it is 0: on this CPU the simulation alone is within 5% of the measured peaks (README), a few MiB
low. On CUDA the prediction is what `torch.cuda.max_memory_allocated()` would report, so leave room for
the rest when choosing a batch.

Options modelled on top of the simulation (not measured here):

- `frozen_bf16` (`vpt_fast.cast_frozen(model, torch.bfloat16)`): the frozen weights and biases of
  `nn.Linear`/`nn.Conv2d` (and Eva's q/k/v biases) are stored in bfloat16 before the simulation runs
  (`cast_frozen_meta`; needs bf16 autocast, as a real step would).
- `gpus=N, fsdp=True` (FSDP2 `fully_shard` on every block and the root): parameters, gradients, AdamW
  state and the optimizer step's temporaries are divided by N at every recorded point; in flight are
  the full parameters of two blocks (the one running and the next, prefetched) and, where the block has
  trainable parameters, its unsharded gradients before the reduce-scatter. Without `fsdp`, N GPUs (DDP)
  hold what one does.
"""
from __future__ import annotations

import gc
import math
import re
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vpt_fast.bench.core import BenchConfig, autocast, create_timm_model
from vpt_fast.bench.memory import Method, methods

TRACE_BATCHES = (2, 4)
"""The two batches the step is simulated at (batch 1 is avoided: some ops take other paths there)."""

RUNTIME_OVERHEAD = {"cpu": 0, "cuda": 0}
"""Bytes the simulation cannot see, added to every prediction, per target (none fitted: see above)."""


def plan_methods(backend: str = "auto") -> dict[str, Method]:
    """The methods `--plan` predicts: those of `--total`, and vpt_fast with bf16 frozen weights."""
    chosen = dict(methods(backend))
    for key in ("vpt_fast", "vpt_fast_mlp", "vpt_fast_block"):
        base = chosen[key]
        chosen[key + "_bf16w"] = replace(base, label=base.label + " +bf16 frozen")
    return chosen


def is_frozen_bf16(key: str) -> bool:
    return key.endswith("_bf16w")


class _SkipInit(TorchFunctionMode):
    """Random initialisation of meta tensors is skipped (they hold no values; see timm_models._NoRandomInit)."""

    _OPS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.erfinv_, torch.Tensor.clamp_,
                      torch.nn.init.trunc_normal_, torch.nn.init.normal_, torch.nn.init.uniform_,
                      torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_, torch.nn.init.kaiming_uniform_,
                      torch.nn.init.kaiming_normal_, torch.nn.init.zeros_, torch.nn.init.ones_,
                      torch.nn.init.constant_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._OPS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def build_meta_model(cfg: BenchConfig, method: Method, frozen_bf16: bool = False) -> torch.nn.Module:
    """`method`'s model of `cfg` on the meta device: what `build_method_model` builds, without memory."""
    from vpt_fast.prompting import prompt
    with torch.device("meta"), _SkipInit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real build warns once; the planner's copies stay quiet
        model = create_timm_model(cfg)
        if method.kind == "vpt":
            prompt(model, num_prompts=cfg.num_prompts, deep=cfg.deep, backend=method.backend,
                   recompute=method.recompute)
        elif method.kind == "linear":
            model.requires_grad_(False)
            model.get_classifier().requires_grad_(True)
        elif method.kind != "full":
            raise ValueError(f"method.kind must be 'full', 'linear' or 'vpt', got {method.kind!r}")
    if frozen_bf16:
        cast_frozen_meta(model)
    return model.train()


_GEMM_MODULES = (torch.nn.Linear, torch.nn.Conv2d)


def cast_frozen_meta(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """What `vpt_fast.cast_frozen(model, dtype)` (vpt_fast/precision.py) stores in `dtype`, applied to a
    meta model (cast_frozen itself asks autocast on the model's device, which meta has not): the frozen
    weight and bias of every exact `nn.Linear` / `nn.Conv2d` and timm EvaAttention's q/k/v biases.
    Returns the number of tensors cast."""
    from timm.models.eva import EvaAttention
    cast = 0
    for module in model.modules():
        names = ("weight", "bias") if type(module) in _GEMM_MODULES else ()
        if type(module) is EvaAttention and getattr(module, "q_bias", None) is not None:
            names += ("q_bias", "k_bias", "v_bias")
        for name in names:
            tensor = getattr(module, name, None)
            if tensor is None or tensor.requires_grad or tensor.dtype == dtype:
                continue
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
            else:
                module._buffers[name] = tensor.to(dtype)
            cast += 1
    return cast


def _fake_like(t: torch.Tensor, mode, device: str) -> torch.Tensor:
    with mode:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def fake_model(model: torch.nn.Module, mode, device: str = "cpu") -> None:
    """Parameters and buffers of a meta model replaced, in place, by fake tensors on `device` (shared
    tensors stay shared)."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(_fake_like(p, mode, device), requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = _fake_like(b, mode, device)
                module._buffers[name] = memo[id(b)]


class _LiveBytes(TorchDispatchMode):
    """Bytes of the distinct storages alive, recorded after every op: `trace` holds (live, sharded)
    pairs, sharded being what FSDP divides (storages marked with `mark_sharded`, and every storage
    allocated while `sharding_all` is set: the optimizer step's temporaries)."""

    _ITEM = (torch.ops.aten._local_scalar_dense.default,)

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage key -> [nbytes, sharded]
        self.total = 0
        self.sharded = 0
        self.sharding_all = False
        self.trace: list[tuple[int, int]] = []

    def _free(self, key: int) -> None:
        nbytes, sharded = self.live.pop(key)
        self.total -= nbytes
        if sharded:
            self.sharded -= nbytes

    def track(self, t: torch.Tensor, sharded: bool = False) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            sharded = sharded or self.sharding_all
            self.live[key] = [nbytes, sharded]
            self.total += nbytes
            if sharded:
                self.sharded += nbytes
            weakref.finalize(storage, self._free, key)
        elif sharded and not entry[1]:
            entry[1] = True
            self.sharded += entry[0]

    def record(self) -> None:
        self.trace.append((self.total, self.sharded))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self._ITEM:  # AdamW's step count: any value gives the same allocations
            return 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.record()
        return out


def _block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What FSDP2 wraps one by one (README, multi-GPU): the prompt-aware blocks, or in a plain timm model
    the transformer blocks, `blocks.<i>` at any depth."""
    return [m for name, m in model.named_modules()
            if getattr(m, "is_vpt_block", False) or re.search(r"(^|\.)blocks\.\d+$", name)]


@dataclass
class StepTrace:
    """One simulated step at one batch: the (live, sharded) bytes after every op, and what the model holds."""

    batch: int
    trace: list[tuple[int, int]]
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    block_param_bytes: int  # the largest block's parameters, as stored
    block_grad_bytes: int  # the largest block's trainable parameters (unsharded gradients in flight)
    trainable_params: int


@contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def simulate_step(cfg: BenchConfig, method: Method, frozen_bf16: bool = False,
                  foreach: Optional[bool] = None) -> StepTrace:
    """`probe_step_memory`'s step of `method` at `cfg.batch` on fake tensors (nothing allocated).

    Args:
        foreach: AdamW's `foreach` (None: torch's default for CPU tensors, the per-tensor loop; CUDA
            defaults to foreach, whose temporaries span every parameter at once).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    if frozen_bf16 and cfg.torch_dtype != torch.bfloat16:
        raise ValueError("bf16 frozen weights need --dtype bfloat16 (bf16 autocast), as a real step would")
    model = build_meta_model(cfg, method, frozen_bf16)
    mode = FakeTensorMode()
    fake_model(model, mode)
    tracker = _LiveBytes()
    params = list(model.parameters())
    buffers = list(model.buffers())
    trainable = [p for p in params if p.requires_grad]
    grads_seen: dict[int, int] = {}

    def on_grad(p: torch.Tensor) -> None:
        tracker.track(p.grad, sharded=True)
        grads_seen[id(p)] = p.grad.nbytes

    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in trainable]
    blocks = _block_modules(model)
    block_param = max((sum(p.nbytes for p in b.parameters()) for b in blocks), default=0)
    block_grad = max((sum(p.nbytes for p in b.parameters() if p.requires_grad) for b in blocks), default=0)
    height, width = (model.patch_embed.img_size if hasattr(model.patch_embed, "img_size") else (224, 224))
    with _gc_paused(), mode, tracker, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in params:
            tracker.track(p, sharded=True)
        for b in buffers:
            tracker.track(b)
        x = torch.empty(cfg.batch, 3, height, width)
        y = torch.zeros(cfg.batch, dtype=torch.long)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=foreach)
        tracker.sharding_all = True
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.sharding_all = False
        tracker.record()
        with autocast(cfg):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        del loss
        tracker.record()
        grad_bytes = sum(grads_seen.values())
        tracker.sharding_all = True
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.sharding_all = False
        tracker.record()
    for h in hooks:
        h.remove()
    state_bytes = sum(v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return StepTrace(batch=cfg.batch, trace=tracker.trace, param_bytes=sum(p.nbytes for p in params),
                     buffer_bytes=sum(b.nbytes for b in buffers), grad_bytes=grad_bytes,
                     optimizer_bytes=state_bytes, block_param_bytes=block_param, block_grad_bytes=block_grad,
                     trainable_params=sum(p.numel() for p in trainable))


@dataclass
class StepModel:
    """The step's memory as lines in the batch: after op t, `live[t] + live_per_sample[t] * batch`
    bytes are alive, `sharded[t]` of them sharded by FSDP (independent of the batch)."""

    live: list[float]
    live_per_sample: list[float]
    sharded: list[int]
    info: StepTrace
    overhead: int = 0

    def peak(self, batch: int, gpus: int = 1, fsdp: bool = False) -> int:
        """Predicted peak bytes per device at `batch` per device."""
        keep = 1.0 if not (fsdp and gpus > 1) else 1.0 / gpus
        best = max(a + b * batch - (1.0 - keep) * s for a, b, s in zip(self.live, self.live_per_sample, self.sharded))
        return int(round(best)) + self._in_flight(gpus, fsdp) + self.overhead

    def per_sample_at_peak(self, batch: int, gpus: int = 1, fsdp: bool = False) -> int:
        """Bytes per sample of the line that makes the peak at `batch` (what one more image costs)."""
        keep = 1.0 if not (fsdp and gpus > 1) else 1.0 / gpus
        _, slope = max((a + b * batch - (1.0 - keep) * s, b)
                       for a, b, s in zip(self.live, self.live_per_sample, self.sharded))
        return int(round(slope))

    def _in_flight(self, gpus: int, fsdp: bool) -> int:
        if not (fsdp and gpus > 1):
            return 0
        return 2 * self.info.block_param_bytes + self.info.block_grad_bytes

    def largest_batch(self, budget: int, gpus: int = 1, fsdp: bool = False, limit: int = 1 << 20) -> int:
        """The largest batch per device whose predicted peak is within `budget` (0: not even batch 1)."""
        keep = 1.0 if not (fsdp and gpus > 1) else 1.0 / gpus
        room = budget - self._in_flight(gpus, fsdp) - self.overhead
        best = limit
        for a, b, s in zip(self.live, self.live_per_sample, self.sharded):
            fixed = a - (1.0 - keep) * s
            if b <= 0:
                if fixed + b > room:  # this point does not fit even at batch 1
                    return 0
                continue
            best = min(best, math.floor((room - fixed) / b + 1e-9))
        return max(best, 0)


def step_model(cfg: BenchConfig, method: Method, frozen_bf16: bool = False, foreach: Optional[bool] = None,
               overhead: Optional[int] = None) -> StepModel:
    """Simulate at the two `TRACE_BATCHES` and fit each recorded point's line in the batch."""
    b1, b2 = TRACE_BATCHES
    t1 = simulate_step(replace(cfg, batch=b1), method, frozen_bf16, foreach)
    t2 = simulate_step(replace(cfg, batch=b2), method, frozen_bf16, foreach)
    if len(t1.trace) != len(t2.trace):
        raise RuntimeError(f"the step's op sequence depends on the batch ({len(t1.trace)} vs {len(t2.trace)} ops "
                           f"at batches {b1} and {b2}); cannot fit lines")
    slope = [(l2 - l1) / (b2 - b1) for (l1, _), (l2, _) in zip(t1.trace, t2.trace)]
    live = [l1 - s * b1 for (l1, _), s in zip(t1.trace, slope)]
    sharded = [s1 for _, s1 in t1.trace]
    device = torch.device(cfg.device).type
    return StepModel(live, slope, sharded, t1, RUNTIME_OVERHEAD.get(device, 0) if overhead is None else overhead)


def plan(cfg: BenchConfig, chosen: dict[str, Method], batches: Iterable[int], budgets: Iterable[int] = (),
         gpus: int = 1, fsdp: bool = False, target: str = "cpu",
         log: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
    """Per method key of `chosen`: the predicted peak bytes per device at each batch (per device), the
    largest batch per device within each of `budgets` ({budget: batch}) and what the model holds.

    Args:
        target: "cpu" (AdamW's per-tensor loop, `RUNTIME_OVERHEAD["cpu"]`) or "cuda" (AdamW's foreach
            step, `RUNTIME_OVERHEAD["cuda"]`). The simulation itself always runs the CPU dispatch of
            the `torch` backend on fake tensors.
    """
    if target not in RUNTIME_OVERHEAD:
        raise ValueError(f"target must be one of {', '.join(RUNTIME_OVERHEAD)}, got {target!r}")
    results = {}
    for key, method in chosen.items():
        frozen_bf16 = is_frozen_bf16(key)
        log(f"[plan] {method.label}")
        model = step_model(replace(cfg, device="cpu"), method, frozen_bf16, foreach=True if target == "cuda" else None,
                           overhead=RUNTIME_OVERHEAD[target])
        info = model.info
        results[key] = {
            "peak_bytes": {int(b): model.peak(b, gpus, fsdp) for b in batches},
            "largest_batch": {int(b): model.largest_batch(b, gpus, fsdp) for b in budgets},
            "param_bytes": info.param_bytes + info.buffer_bytes, "grad_bytes": info.grad_bytes,
            "optimizer_bytes": info.optimizer_bytes, "trainable_params": info.trainable_params,
            "per_sample_bytes": model.per_sample_at_peak(max(batches), gpus, fsdp),
        }
    return results


def format_plan_table(results: dict[str, dict], chosen: dict[str, Method], batches: Iterable[int],
                      budgets: Iterable[int] = ()) -> str:
    """One row per method: predicted peak (MiB) at each batch, and the largest batch within each budget."""
    batches, budgets = list(batches), list(budgets)
    head = (f"{'method':<44}" + "".join(f"{'batch ' + str(b):>12}" for b in batches)
            + "".join(f"{f'largest @ {m / 2**30:.0f} GiB':>20}" for m in budgets))
    lines = [head, "-" * len(head)]
    for key, r in results.items():
        cells = "".join(f"{r['peak_bytes'][b] / 2**20:12.1f}" for b in batches)
        cells += "".join(f"{r['largest_batch'][m]:>20}" for m in budgets)
        lines.append(f"{chosen[key].label:<44}{cells}")
    return "\n".join(lines)


def format_accuracy_table(predicted: dict[str, dict], measured: dict[int, dict[str, dict]],
                          chosen: dict[str, Method]) -> str:
    """One row per (batch, method): predicted and measured peak (MiB) and the prediction's error."""
    head = f"{'batch':>5}  {'method':<36}{'predicted MiB':>14}{'measured MiB':>14}{'error':>9}"
    lines = [head, "-" * len(head)]
    for batch, by_method in measured.items():
        for key, r in by_method.items():
            pred = predicted[key]["peak_bytes"][batch]
            lines.append(f"{batch:>5}  {chosen[key].label:<36}{pred / 2**20:14.1f}{r['peak_bytes'] / 2**20:14.1f}"
                         f"{(pred / r['peak_bytes'] - 1) * 100:+8.1f}%")
    return "\n".join(lines)
