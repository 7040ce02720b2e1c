"""Triton prompt-aware flash attention: `attention_fwd` / `attention_bwd` with `torch_impl`'s
signatures and semantics, run by the kernels in `vpt_fast.kernels.attention` (docs/design.md §2.1).

Supported: head dims 16..128 (padded to a power of two), float32 / float16 / bfloat16, arbitrary
strides with a unit stride on the last dim (other layouts are copied). `out` and the gradients
dq/dk/dv are returned as (B, H, N, d) views of (B, N, H, d) buffers, so
`out.transpose(1, 2).reshape(B, N, H * d)` is free; given `dqkv` (B, N, 3, H, d), the backward
writes dq/dk/dv straight into its views (the qkv projection's gradient, no stacking).

`prompt_index` (int64 (B,)): query batch b reads prompt set prompt_index[b] of pk/pv (S, H, P, d),
through the index inside the kernels; dpk/dpv (S, H, P, d) are summed per set in a fixed order
(samples sorted by set with a stable argsort, strided over the splits, splits summed in order):
bitwise reproducible, no atomics, zeros for sets no sample reads.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends.flops import register_attention_flops
from vpt_fast.backends.triton_impl.common import (
    DTYPES,
    INTERPRET,
    call,
    check_available,
    check_same_device,
    check_tensor,
    custom_op,
    last_dim_unit,
    launch,
    triton,
)

if triton is not None:  # without triton the backend reports itself unavailable (common.AVAILABLE)
    from vpt_fast.kernels import attention as kernels

_HEAD_DIMS = "16 <= d <= 128"
_LOG2E = 1.4426950408889634


def _check_attention(q, k, v, pk, pv, bias, prompt_index=None):
    check_available()
    check_tensor("q", q, 4)
    check_tensor("k", k, 4, q.dtype)
    check_tensor("v", v, 4, q.dtype)
    check_same_device(q, k=k, v=v, pk=pk, pv=pv, bias=bias)
    B, H, Nq, d = q.shape
    if not 16 <= d <= 128:
        raise ValueError(f"triton backend: unsupported head dim: expected {_HEAD_DIMS}, got d={d}")
    if k.shape[:2] != (B, H) or k.shape[3] != d:
        raise ValueError(f"triton backend: k must be (B={B}, H={H}, Nk, d={d}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"triton backend: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if (pk is None) != (pv is None):
        raise ValueError("triton backend: pk and pv must be given together (both or neither)")
    if pk is not None:
        check_tensor("pk", pk, 4, q.dtype)
        check_tensor("pv", pv, 4, q.dtype)
        if pk.shape[1] != H or pk.shape[3] != d:
            raise ValueError(f"triton backend: pk must be (Bp, H={H}, P, d={d}), got {tuple(pk.shape)}")
        if pv.shape != pk.shape:
            raise ValueError(f"triton backend: pv must have pk's shape {tuple(pk.shape)}, "
                             f"got {tuple(pv.shape)}")
        if prompt_index is not None:
            _check_prompt_index(prompt_index, q, pk)
        elif pk.shape[0] < 1 or B % pk.shape[0]:
            raise ValueError(f"triton backend: prompt batch Bp={pk.shape[0]} must divide the query "
                             f"batch B={B}")
    elif prompt_index is not None:
        raise ValueError("triton backend: prompt_index needs a prompt segment (pk, pv), got pk=None")
    if k.shape[2] + (0 if pk is None else pk.shape[2]) < 1:
        raise ValueError("triton backend: attention needs at least one key (Nk + P >= 1)")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 4:
            raise ValueError(f"triton backend: bias must be a 4-dim tensor (nB, H, Nq, Nk), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype not in DTYPES:
            raise TypeError(f"triton backend: bias dtype must be float32/float16/bfloat16, got {bias.dtype}")
        nb = bias.shape[0]
        if bias.shape[1:] != (H, Nq, k.shape[2]) or nb < 1 or B % nb:
            raise ValueError(f"triton backend: bias must be (nB, H={H}, Nq={Nq}, Nk={k.shape[2]}) with "
                             f"nB dividing B={B}, got {tuple(bias.shape)}")


def _check_prompt_index(prompt_index, q: Tensor, pk: Tensor):
    """An int64 (B,) tensor on q's device and at least one prompt set; values are the caller's job."""
    B = q.shape[0]
    if not isinstance(prompt_index, Tensor) or prompt_index.dtype != torch.int64 or prompt_index.shape != (B,):
        raise ValueError(f"triton backend: prompt_index must be an int64 tensor of shape (B={B},), got "
                         f"{getattr(prompt_index, 'dtype', type(prompt_index).__name__)} "
                         f"{tuple(getattr(prompt_index, 'shape', ()))}")
    check_same_device(q, prompt_index=prompt_index)
    if pk.shape[0] < 1:
        raise ValueError(f"triton backend: prompt_index needs at least one prompt set, got pk of shape "
                         f"{tuple(pk.shape)}")


def _check_dqkv(dqkv, q: Tensor, k: Tensor):
    """(B, N, 3, H, d) in q's dtype and device, unit stride on d; only when Nq == Nk."""
    B, H, Nq, d = q.shape
    if not isinstance(dqkv, Tensor) or dqkv.shape != (B, Nq, 3, H, d) or k.shape[2] != Nq:
        raise ValueError(f"triton backend: dqkv must be (B={B}, N, 3, H={H}, d={d}) with N = Nq = Nk "
                         f"(Nq={Nq}, Nk={k.shape[2]}), got {tuple(getattr(dqkv, 'shape', ()))}")
    if dqkv.dtype != q.dtype or dqkv.stride(-1) != 1:
        raise ValueError(f"triton backend: dqkv must be {q.dtype} with unit stride on its last dim, got "
                         f"{dqkv.dtype} with strides {dqkv.stride()}")
    check_same_device(q, dqkv=dqkv)


def _qkv_views(dqkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, H, N, d) views of the q, k, v slots of a (B, N, 3, H, d) buffer."""
    return tuple(t.transpose(1, 2) for t in dqkv.unbind(2))


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _attn_config(kind: str, block_d: int, dtype: torch.dtype, n_queries: int) -> dict:
    """Block sizes per kernel ("fwd", "dkdv", "dq") for H100; one small fixed config when interpreted.
    BLOCK_M, the query tile in every kernel, shrinks to cover short query sets without padding them
    to twice their size (Swin windows: 49 queries take a 64-row tile, not 128)."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    cfg = _attn_config_h100(kind, block_d, dtype)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(64, triton.next_power_of_2(n_queries)))  # 64: tiles in use
    return cfg


def _attn_config_h100(kind: str, block_d: int, dtype: torch.dtype) -> dict:
    wide = block_d > 64
    if dtype == torch.float32:
        bm, bn = (32, 32) if wide else (64, 32)
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2)
    # d <= 64 measured on H100 (ViT-B/16 shape, bf16; benchmarks/bench_attention.py); d > 64 kept
    # smaller for registers / shared memory.
    if kind == "fwd":
        return dict(BLOCK_M=128, BLOCK_N=64 if wide else 32, num_warps=8 if wide else 4, num_stages=3)
    if kind == "dkdv":
        return dict(BLOCK_M=32 if wide else 128, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if wide else 4, num_stages=2 if wide else 3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision MMA ("ieee"), not tf32, so fp32 results match to ~1e-6.
    return "ieee" if dtype == torch.float32 else "tf32"


def _interp_upcast(*ts):
    """Triton's interpreter multiplies bf16 `tl.dot` operands as raw uint16 bits (triton 3.8): run
    bf16 attention in fp32 there (CPU tests only; outputs are still stored in bf16)."""
    if INTERPRET and ts[0].dtype == torch.bfloat16:
        return tuple(None if t is None else t.float() for t in ts)
    return ts


def _bh_view(t: Tensor) -> Tensor:
    """Fresh (B, H, N, d) view of a (B, N, H, d) buffer."""
    B, H, N, d = t.shape
    return torch.empty((B, N, H, d), dtype=t.dtype, device=t.device).transpose(1, 2)


def _attention_fwd_fake(q, k, v, pk, pv, scale, bias, prompt_index):
    return _bh_view(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor], pv: Optional[Tensor],
                        scale: float, bias: Optional[Tensor],
                        prompt_index: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    out = _bh_view(q)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    has_prompt = pk is not None
    pk_, pv_ = (pk, pv) if has_prompt else (k, v)
    P = pk.shape[2] if has_prompt else 0
    group = B // pk.shape[0] if has_prompt and prompt_index is None else 1
    has_index = prompt_index is not None
    index_ = prompt_index if has_index else lse  # any pointer: not read without HAS_INDEX
    has_bias = bias is not None
    bias_ = bias if has_bias else q
    bs = bias.stride() if has_bias else (0, 0, 0, 0)
    nb = bias.shape[0] if has_bias else 1
    cfg = _attn_config("fwd", _block_d(d), q.dtype, Nq)
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]) * B * H,)  # kernels/attention.py: _split_program_id
    precision = _dot_precision(q.dtype)
    q, k, v, pk_, pv_ = _interp_upcast(q, k, v, pk_, pv_)
    launch(kernels._attention_fwd, grid)(
        q, k, v, pk_, pv_, bias_, out, lse, index_,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *pk_.stride()[:3], *pv_.stride()[:3],
        *bs, *out.stride()[:3], *lse.stride()[:2],
        H, Nq, Nk, P, group, nb, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_BIAS=has_bias, HAS_INDEX=has_index, DOT_PRECISION=precision,
        **cfg)
    return out, lse


_attention_fwd_op = custom_op("triton_attention_fwd", _attention_fwd_fake)(_attention_fwd_impl)


def _attention_bwd_fake(dout, q, k, v, pk, pv, out, lse, scale, bias, prompt_index, dqkv):
    if pk is None:
        dpk, dpv = q.new_empty((0,)), q.new_empty((0,))
    else:
        dpk, dpv = torch.empty_like(pk, memory_format=torch.contiguous_format), \
            torch.empty_like(pv, memory_format=torch.contiguous_format)
    if dqkv is not None:  # written into dqkv (a mutated argument); the wrapper returns its views
        return q.new_empty((0,)), q.new_empty((0,)), q.new_empty((0,)), dpk, dpv
    return _bh_view(q), _bh_view(k), _bh_view(v), dpk, dpv


def _attention_bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                        pv: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
                        bias: Optional[Tensor], prompt_index: Optional[Tensor],
                        dqkv: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dpk, dpv); dpk/dpv are empty (0,) tensors when pk is None, and dq/dk/dv
    are when `dqkv` is given (they are written into its views: an op may not return an alias of an
    input)."""
    dq, dk, dv = _qkv_views(dqkv) if dqkv is not None else (_bh_view(q), _bh_view(k), _bh_view(v))
    has_prompt = pk is not None
    if has_prompt:
        dpk = torch.empty(pk.shape, dtype=pk.dtype, device=pk.device)
        dpv = torch.empty(pv.shape, dtype=pv.dtype, device=pv.device)
    else:
        dpk = dpv = None
    if q.numel() == 0:
        dk.zero_(), dv.zero_()
        if has_prompt:
            dpk.zero_(), dpv.zero_()
    else:
        _attention_bwd_launch(dout, q, k, v, pk, pv, out, lse, scale, bias, prompt_index,
                              dq, dk, dv, dpk, dpv)
    if not has_prompt:
        dpk = q.new_empty((0,))
        dpv = q.new_empty((0,))
    if dqkv is not None:
        dq = dk = dv = q.new_empty((0,))
    return dq, dk, dv, dpk, dpv


_attention_bwd_op = custom_op("triton_attention_bwd", _attention_bwd_fake, mutates_args=("dqkv",))(
    _attention_bwd_impl)


def _prompt_readers(prompt_index: Tensor, num_sets: int) -> tuple[Tensor, Tensor]:
    """(order, offsets): the query batches sorted by the prompt set they read (stable, so batch order
    within a set), and where each set's readers start in `order` (S + 1 entries). Fixed shapes, no
    host sync."""
    order = torch.argsort(prompt_index, stable=True)
    sets = torch.arange(num_sets + 1, dtype=prompt_index.dtype, device=prompt_index.device)
    return order, torch.searchsorted(prompt_index[order], sets)


def _prompt_split(num_blocks: int, readers: int, device: torch.device) -> int:
    """Programs per (key block, set, head) of the prompt dK/dV launch: enough programs for ~4 per SM,
    at most one per reader (`readers`: the most query batches that can read one set)."""
    want = max(1, triton.cdiv(4 * _num_sms(device), num_blocks))
    return max(1, min(readers, want))


def _attention_bwd_launch(dout, q, k, v, pk, pv, out, lse, scale, bias, prompt_index, dq, dk, dv, dpk, dpv):
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    block_d = _block_d(d)
    precision = _dot_precision(q.dtype)
    dout, q, k, v, pk, pv, out = _interp_upcast(dout, q, k, v, pk, pv, out)
    has_bias = bias is not None
    bias_ = bias if has_bias else q
    bs = bias.stride() if has_bias else (0, 0, 0, 0)
    nb = bias.shape[0] if has_bias else 1
    has_prompt = pk is not None
    has_index = prompt_index is not None
    pk_, pv_ = (pk, pv) if has_prompt else (k, v)
    P = pk.shape[2] if has_prompt else 0
    group = B // pk.shape[0] if has_prompt and not has_index else 1
    lse = lse.contiguous()  # lse and delta share strides in the kernels
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    index_ = prompt_index if has_index else delta  # any pointer: not read without HAS_INDEX

    # 1. dQ (and delta = rowsum(dO * O)): one program per (query block, batch, head), both segments.
    cfg = _attn_config("dq", block_d, q.dtype, Nq)
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]) * B * H,)
    launch(kernels._attention_bwd_dq, grid)(
        q, k, v, pk_, pv_, out, dout, lse, delta, bias_, dq, index_,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *pk_.stride()[:3], *pv_.stride()[:3],
        *out.stride()[:3], *dout.stride()[:3], *lse.stride()[:2], *bs, *dq.stride()[:3],
        H, Nq, Nk, P, group, nb, scale, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, HAS_BIAS=has_bias, HAS_INDEX=has_index, DOT_PRECISION=precision, **cfg)

    # 2. dK, dV of own keys: one program per (key block, batch, head).
    cfg = _attn_config("dkdv", block_d, q.dtype, Nq)
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg)
    if Nk > 0:
        grid = (triton.cdiv(Nk, cfg["BLOCK_N"]) * B * H, 1)
        launch(kernels._attention_bwd, grid)(
            q, k, v, dout, lse, delta, bias_, dk, dv, delta, delta,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *lse.stride()[:2], *bs,
            0, *dk.stride()[:3], 0, *dv.stride()[:3],
            H, Nq, Nk, nb, 1, scale, scale * _LOG2E, HAS_BIAS=has_bias, HAS_INDEX=False, **meta)
    if not has_prompt:
        return
    if P == 0:
        dpk.zero_(), dpv.zero_()
        return
    # 3. dK, dV of prompt keys: the query batches reading a prompt set (its group, or with an index
    # the samples sorted by set) are split strided over `split` programs, each writing an fp32
    # partial; `_attention_bwd_reduce` sums them in split order (exact, deterministic, no atomics).
    # split == 1 writes dpk/dpv directly.
    num_sets = pk.shape[0]
    order, offsets = _prompt_readers(prompt_index, num_sets) if has_index else (delta, delta)
    num_blocks = triton.cdiv(P, cfg["BLOCK_N"]) * num_sets * H
    split = _prompt_split(num_blocks, B if has_index else group, q.device)
    if split == 1:
        tk, tv = dpk, dpv
        sk, sv = (0, *dpk.stride()), (0, *dpv.stride())
    else:
        tk = torch.empty((split, *pk.shape), dtype=torch.float32, device=q.device)
        tv = torch.empty((split, *pv.shape), dtype=torch.float32, device=q.device)
        sk, sv = tk.stride(), tv.stride()
    grid = (num_blocks, split)
    launch(kernels._attention_bwd, grid)(
        q, pk, pv, dout, lse, delta, q, tk, tv, order, offsets,
        *q.stride()[:3], *pk.stride()[:3], *pv.stride()[:3], *dout.stride()[:3], *lse.stride()[:2],
        0, 0, 0, 0, *sk[:4], *sv[:4],
        H, Nq, P, 1, group, scale, scale * _LOG2E, HAS_BIAS=False, HAS_INDEX=has_index, **meta)
    if split > 1:
        n = dpk.numel()
        block = 1024
        launch(kernels._attention_bwd_reduce, (triton.cdiv(n, block),))(
            tk, tv, dpk, dpv, split, n, BLOCK_SIZE=block, num_warps=1 if INTERPRET else 4)


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor], pv: Optional[Tensor],
                  scale: float, bias: Optional[Tensor] = None,
                  prompt_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """softmax(q [pk; k]^T * scale + [0, bias]) [pv; v]; see `torch_impl.attention_fwd`.

    Args:
        prompt_index: optional int64 (B,): query batch b reads prompt set prompt_index[b] of pk, pv
            (S, H, P, d) (values in [0, S): the caller checks them).

    Returns (out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) float32 natural log).
    """
    _check_attention(q, k, v, pk, pv, bias, prompt_index)
    q, k, v, pk, pv, bias = map(last_dim_unit, (q, k, v, pk, pv, bias))
    prompt_index = None if prompt_index is None else prompt_index.contiguous()
    return call(_attention_fwd_impl, "triton_attention_fwd", q, k, v, pk, pv, float(scale), bias, prompt_index)


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                  pv: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
                  bias: Optional[Tensor] = None, prompt_index: Optional[Tensor] = None,
                  dqkv: Optional[Tensor] = None):
    """Returns (dq, dk, dv, dpk, dpv); dpk/dpv have pk's shape (summed over the batches reading each
    prompt batch or set; zeros for a set nobody reads), None when pk is None.

    Args:
        prompt_index: as in `attention_fwd`.
        dqkv: optional (B, N, 3, H, d) buffer (Nq = Nk = N), the qkv projection's output layout:
            dq, dk, dv are written into its q, k, v slots and returned as (B, H, N, d) views of it.
    """
    _check_attention(q, k, v, pk, pv, bias, prompt_index)
    check_tensor("dout", dout, 4)
    check_tensor("out", out, 4)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"triton backend: dout and out must have q's shape {tuple(q.shape)}, got "
                         f"{tuple(dout.shape)} and {tuple(out.shape)}")
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"triton backend: lse must be float32 of shape {tuple(q.shape[:3])}, got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    check_same_device(q, dout=dout, out=out, lse=lse)
    if dqkv is not None:
        _check_dqkv(dqkv, q, k)
    q, k, v, pk, pv, bias, dout, out = map(last_dim_unit, (q, k, v, pk, pv, bias, dout, out))
    prompt_index = None if prompt_index is None else prompt_index.contiguous()
    dq, dk, dv, dpk, dpv = call(_attention_bwd_impl, "triton_attention_bwd",
                                dout, q, k, v, pk, pv, out, lse, float(scale), bias, prompt_index, dqkv)
    if dqkv is not None:
        dq, dk, dv = _qkv_views(dqkv)
    if pk is None:
        return dq, dk, dv, None, None
    return dq, dk, dv, dpk, dpv


register_attention_flops("triton_attention_fwd", "triton_attention_bwd")
