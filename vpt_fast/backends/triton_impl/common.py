"""Shared pieces of the triton backend: availability, argument checks and launch helpers.

Every op module registers its primitives through `custom_op` and launches its kernels through `call` / `launch`, so
they run the same way eagerly, under torch.compile and under dispatch modes (fake tensors,
FlopCounterMode). The row-wise (LayerNorm, RMSNorm) kernels share `row_config` and `as_rows`.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

try:
    import triton
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - triton missing
    triton = None
    _IMPORT_ERROR = e

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when the kernels run in Triton's CPU interpreter (decided when triton was imported)."""
AVAILABLE: bool = _IMPORT_ERROR is None and (INTERPRET or torch.cuda.is_available())
UNAVAILABLE_REASON: Optional[str] = (
    None if AVAILABLE else f"triton did not import ({_IMPORT_ERROR})" if _IMPORT_ERROR is not None
    else "no CUDA device, and TRITON_INTERPRET=1 was not set before importing triton")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# CUDA's grid limits: axis 0 up to 2**31 - 1 blocks, axes 1 and 2 up to 65,535.
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_YZ = 65535


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def check_available():
    if not AVAILABLE:
        raise RuntimeError(f"triton backend unavailable: {UNAVAILABLE_REASON}")


def check_tensor(name: str, t: Tensor, dim: Optional[int] = None, dtype: Optional[torch.dtype] = None):
    if not isinstance(t, Tensor):
        raise TypeError(f"triton backend: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"triton backend: {name} must have {dim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"triton backend: {name} dtype must be one of float32/float16/bfloat16, "
                        f"got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"triton backend: {name} dtype must match ({dtype}), got {t.dtype}")
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(f"triton backend: {name} must be a CUDA tensor (or set TRITON_INTERPRET=1 "
                         f"before importing triton), got device {t.device}")


def check_same_device(ref: Tensor, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"triton backend: {name} must be on {ref.device}, got {t.device}")


def check_affine(name: str, t: Optional[Tensor], x: Tensor):
    """An optional per-channel vector (LayerNorm weight/bias, fc1 bias) of x's last dim."""
    if t is None:
        return
    check_tensor(name, t)
    check_same_device(x, **{name: t})
    if t.shape != (x.shape[-1],):
        raise ValueError(f"triton backend: {name} must have shape ({x.shape[-1]},) (x's last dim), "
                         f"got {tuple(t.shape)}")


def last_dim_unit(t: Optional[Tensor]) -> Optional[Tensor]:
    """`t` itself when its last dim has unit stride (what the kernels index), else a contiguous copy."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------
# registration and launch
# ----------------------------------------------------------------------------------------------
def custom_op(name: str, fake: Callable, mutates_args: tuple[str, ...] = ()):
    """Register `fn` as `vpt_fast::<name>`: a `triton_op` (torch.compile sees the Triton kernels and
    traces the body itself with fake tensors) on GPU; under the interpreter, whose kernels
    `wrap_triton` cannot trace, an opaque `custom_op` with the explicit fake implementation `fake`.
    `mutates_args` names the arguments `fn` writes into (output buffers passed in)."""
    def register(fn):
        if INTERPRET:
            op = torch.library.custom_op(f"vpt_fast::{name}", mutates_args=mutates_args)(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(f"vpt_fast::{name}", mutates_args=mutates_args)(fn)
    return register


def eager() -> bool:
    """No torch.compile tracing and no dispatch mode (fake tensors, functionalization, FlopCounterMode)
    active: the primitives then call their implementations and launch kernels directly, skipping the
    dispatcher (saves ~100 us of host time per call on H100); otherwise they go through the ops."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def call(impl: Callable, op_name: str, *args):
    """`impl(*args)` directly in plain eager mode, else the registered op `vpt_fast::<op_name>`."""
    return impl(*args) if eager() else getattr(torch.ops.vpt_fast, op_name)(*args)


def check_grid(grid: tuple[int, ...], kernel_name: str) -> tuple[int, ...]:
    """`grid` if it is within CUDA's limits; a launch past them fails with an opaque driver error."""
    if len(grid) > 3 or grid[0] > MAX_GRID_X or any(g > MAX_GRID_YZ for g in grid[1:]):
        raise ValueError(f"triton backend: {kernel_name} grid {grid} exceeds CUDA's limits (at most 3 "
                         f"axes, axis 0 <= {MAX_GRID_X}, axes 1 and 2 <= {MAX_GRID_YZ})")
    return grid


def launch(kernel, grid: tuple[int, ...]):
    """`kernel[grid]`, checked against CUDA's grid limits; wrapped for torch.compile when traced."""
    runnable = kernel if INTERPRET or eager() else torch.library.wrap_triton(kernel)
    return runnable[check_grid(grid, kernel.__name__)]


def row_config(n_cols: int) -> dict:
    """Block size and warps of a kernel that runs one program per row of `n_cols` elements (the
    LayerNorm kernels)."""
    block = triton.next_power_of_2(max(n_cols, 16))
    if INTERPRET:
        return dict(BLOCK_SIZE=block, num_warps=1)
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return dict(BLOCK_SIZE=block, num_warps=warps)


def as_rows(x: Tensor) -> Tensor:
    """`x` as a 2-dim (rows, last dim) tensor whose last dim has unit stride (a view when it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()
