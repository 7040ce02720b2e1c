"""CUDA backend: the attention primitives of `torch_impl` run by the C++/CUDA extension `vpt_fast._C`
(csrc/): a prompt-aware FlashAttention (docs/design.md §2.1, §2.4) and its exact multi-threaded CPU twin.

The extension is optional (timm `fast_norm` pattern): `AVAILABLE` says whether `vpt_fast._C`
imported; `ext_info()` says how it was built. The primitives call the torch operators
`torch.ops.vpt_fast.attention_fwd/attention_bwd` (defined in C++ with `TORCH_LIBRARY(vpt_fast)`);
fake (meta) implementations and FLOP formulas are registered here, so `torch.compile` traces them
without graph breaks and `torch.utils.flop_counter` counts them.

Supported: CUDA tensors (sm_80+ for float16/bfloat16 on tensor cores, float32 on any GPU the
extension was compiled for; head dims 32, 64, 80, 128; any sequence lengths; bias supported) and CPU
tensors (float32/float16/bfloat16/float64, any head dim). Inputs may be any strided views with
stride(-1) == 1, e.g. q, k, v sliced out of `qkv.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)`.
Outputs out/dq/dk/dv/dpk/dpv are (B, H, N, d) views of (B, N, H, d) buffers. lse is float32
(float64 for float64 CPU inputs), like `torch_impl`.

Several prompt sets in one batch: with `prompt_index` (int64 (B,)), query batch b reads prompt set
`prompt_index[b]` of pk, pv (S, H, P, d) inside the kernels (no gathered per-sample copy); dpk, dpv
are (S, H, P, d), each set the sum over the batches reading it in a fixed order (bitwise
reproducible; zeros for a set no batch reads). Index values are checked on CPU tensors only; on
CUDA they are the caller's job (`vpt_fast.ops.attention` checks them once).
One qkv gradient buffer: `attention_bwd(..., dqkv=)` writes dq, dk, dv straight into the views of a
(B, N, 3, H, d) buffer laid out as the qkv projection's output (the op's mutated argument).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.flops import register_attention_flops

try:
    import vpt_fast._C as _C
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # extension not built (VPT_FAST_NO_EXT=1, no compiler, ...)
    _C = None
    _IMPORT_ERROR = e

AVAILABLE: bool = _C is not None
"""True when `vpt_fast._C` imported (its CPU twin then always works; CUDA needs `WITH_CUDA`)."""
WITH_CUDA: bool = bool(getattr(_C, "with_cuda", False))
"""True when the extension was compiled with its CUDA kernels."""


def ext_info() -> dict:
    """How the extension was built: {'built', 'cuda', 'archs', 'torch', 'torch_cuda', 'cuda',
    'compiled_torch', 'path', 'error'}."""
    info = {
        "built": AVAILABLE,
        "cuda": WITH_CUDA,
        "archs": [a for a in re.split(r"[\s;]+", getattr(_C, "archs", "") or "") if a],
        "compiled_cuda": getattr(_C, "cuda_version", None),
        "compiled_torch": getattr(_C, "torch_version", None),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "path": getattr(_C, "__file__", None),
        "error": None if _IMPORT_ERROR is None else f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}",
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["device"] = torch.cuda.get_device_name()
        info["device_arch"] = f"sm_{major}{minor}"
    return info


def _check_available(q: Tensor):
    if not AVAILABLE:
        raise RuntimeError(f"cuda backend unavailable: vpt_fast._C did not import ({_IMPORT_ERROR}); "
                           "reinstall with `pip install --no-build-isolation -e .`")
    if isinstance(q, Tensor) and q.device.type == "cuda" and not WITH_CUDA:
        raise RuntimeError("cuda backend: vpt_fast._C was built without CUDA kernels (no nvcc or a CPU "
                           "build of torch at install time); got a CUDA tensor")


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor], pv: Optional[Tensor],
                  scale: float, bias: Optional[Tensor] = None,
                  prompt_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Prompt-aware attention forward; same contract as `torch_impl.attention_fwd`.

    Args:
        q: (B, H, Nq, d) queries; k, v: (B, H, Nk, d) own keys and values.
        pk, pv: prompt sets (S, H, P, d), or None. Without `prompt_index`, S divides B and query
            batch b reads set b // (B // S).
        scale: softmax scale.
        bias: optional (nB, H, Nq, Nk) additive bias on own keys (query batch b reads b % nB).
        prompt_index: optional int64 (B,) on q's device, values in [0, S): the set of each query
            batch (S need not divide B).

    Returns:
        (out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) float32, natural log).
    """
    _check_available(q)
    return tuple(torch.ops.vpt_fast.attention_fwd(q, k, v, pk, pv, float(scale), bias, prompt_index))


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                  pv: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
                  bias: Optional[Tensor] = None, prompt_index: Optional[Tensor] = None,
                  dqkv: Optional[Tensor] = None):
    """Input gradients (dq, dk, dv, dpk, dpv) of `attention_fwd`.

    Args:
        dout: (B, H, Nq, d) gradient of the output; out, lse: what `attention_fwd` returned.
        q, k, v, pk, pv, scale, bias, prompt_index: as given to `attention_fwd`.
        dqkv: optional (B, N, 3, H, d) buffer in q's dtype (Nq == Nk == N), laid out as the qkv
            projection's output: dq, dk, dv are written into `dqkv[:, :, i].transpose(1, 2)`,
            i = 0, 1, 2, and returned as those views (no separate buffers, no stacking copy).

    Returns:
        dq, dk, dv (B, H, N, d); dpk, dpv with pk's shape (S, H, P, d), each set summed over the
        query batches reading it, or None without prompts.
    """
    _check_available(q)
    dq, dk, dv, dpk, dpv = torch.ops.vpt_fast.attention_bwd(dout, q, k, v, pk, pv, out, lse,
                                                             float(scale), bias, prompt_index, dqkv)
    if dqkv is not None:
        dq, dk, dv = (dqkv.select(2, i).transpose(1, 2) for i in range(3))
    if pk is None:
        return dq, dk, dv, None, None
    return dq, dk, dv, dpk, dpv


# ----------------------------------------------------------------------------------------------
# fake (meta) implementations and FLOP formulas: shapes, dtypes and layouts of the C++ operators
# ----------------------------------------------------------------------------------------------
def _empty_bnhd(B, H, N, d, like: Tensor) -> Tensor:
    return like.new_empty((B, N, H, d)).transpose(1, 2)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attention_fwd_fake(q, k, v, pk, pv, scale, bias=None, prompt_index=None):
    B, H, Nq, d = q.shape
    return _empty_bnhd(B, H, Nq, d, q), q.new_empty((B, H, Nq), dtype=_lse_dtype(q))


def _attention_bwd_fake(dout, q, k, v, pk, pv, out, lse, scale, bias=None, prompt_index=None, dqkv=None):
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if dqkv is not None:  # written into dqkv (the mutated argument); the op returns empty tensors
        dq, dk, dv = q.new_empty((0,)), q.new_empty((0,)), q.new_empty((0,))
    else:
        dq, dk, dv = _empty_bnhd(B, H, Nq, d, q), _empty_bnhd(B, H, Nk, d, k), _empty_bnhd(B, H, Nk, d, v)
    if pk is None:
        return dq, dk, dv, q.new_empty((0,)), q.new_empty((0,))
    S, _, P, _ = pk.shape
    return dq, dk, dv, _empty_bnhd(S, H, P, d, pk), _empty_bnhd(S, H, P, d, pv)


if AVAILABLE:
    torch.library.register_fake("vpt_fast::attention_fwd")(_attention_fwd_fake)
    torch.library.register_fake("vpt_fast::attention_bwd")(_attention_bwd_fake)
    register_attention_flops("attention_fwd", "attention_bwd")
