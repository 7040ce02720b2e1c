"""Prompt-aware attention (docs/design.md §2.1): a sample's queries attend to its own keys/values plus a
prompt segment that is shared by the batch (deep VPT), by the windows of one image (Swin) or per
sample. One autograd.Function saves q, k, v, the prompt segment once (never its B expanded copies),
the output and the log-sum-exp; backward recomputes probabilities as flash attention does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve
from vpt_fast.backends.torch_impl import attention_bwd_prompts
from vpt_fast.ops import autocast_dtype


class PromptAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, bias, scale: float, backend: str):
        impl = resolve(backend, "attention", q.device)
        out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias)
        ctx.save_for_backward(q, k, v, pk, pv, bias, out, lse)
        ctx.impl, ctx.scale = impl, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, pk, pv, bias, out, lse = ctx.saved_tensors
        if pk is not None and not any(ctx.needs_input_grad[:3]):
            # only the prompt segment needs a gradient (deep VPT's first block): its P columns
            dpk, dpv = attention_bwd_prompts(dout, q, pk, pv, out, lse, ctx.scale)
            return None, None, None, dpk, dpv, None, None, None
        dq, dk, dv, dpk, dpv = ctx.impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, ctx.scale, bias)
        return dq, dk, dv, dpk, dpv, None, None, None


class GatherSets(torch.autograd.Function):
    """`table[index]` along dim 0, with a deterministic backward: the gradient of each set is a
    one-hot GEMM over the samples that read it (no atomics, same result on every run)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.num_sets = table.shape[0]
        return table.index_select(0, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        acc = torch.promote_types(grad.dtype, torch.float32)
        one_hot = torch.nn.functional.one_hot(index, ctx.num_sets).to(acc).t()
        summed = (one_hot @ grad.reshape(grad.shape[0], -1).to(acc)).to(grad.dtype)
        return summed.view(ctx.num_sets, *grad.shape[1:]), None


def gather_sets(table: Tensor, index: Tensor) -> Tensor:
    """Rows of `table` (S, ...) for each entry of `index` (B,): (B, ...)."""
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"prompt_index must be a 1-dim integer tensor, got {index.dtype} of shape "
                         f"{tuple(index.shape)}")
    return GatherSets.apply(table, index.long())


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor] = None,
                     pv: Optional[Tensor] = None, *, scale: Optional[float] = None,
                     bias: Optional[Tensor] = None, backend: str = "torch",
                     prompt_index: Optional[Tensor] = None) -> Tensor:
    """softmax(q [pk; k]^T * scale + [0, bias]) [pv; v] per query batch.

    Args:
        q: (B, H, Nq, d) queries of each sample's own rows.
        k, v: (B, H, Nk, d) keys/values of each sample's own rows.
        pk, pv: optional prompt segment (Bp, H, P, d); query batch b reads prompt batch
            b // (B // Bp), so Bp = 1 shares one segment across the batch.
        scale: softmax scale, default d ** -0.5.
        bias: optional (nB, H, Nq, Nk) additive bias on own keys (query batch b reads b % nB).
        backend: "torch", "triton" or "cuda".
        prompt_index: optional (B,) integer tensor: query batch b reads prompt set
            `prompt_index[b]` of pk, pv (S, H, P, d) instead (several tasks in one batch). The sets
            are gathered per sample; their gradients are summed per set in a fixed order.

    Returns:
        (B, H, Nq, d) attention output.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"expected q (B, H, Nq, d) and k, v (B, H, Nk, d), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (pk is None) != (pv is None):
        raise ValueError("pk and pv must be given together")
    if prompt_index is not None:
        if pk is None or prompt_index.shape != (q.shape[0],):
            raise ValueError(f"prompt_index needs pk, pv and one entry per query batch ({q.shape[0]}), "
                             f"got shape {tuple(prompt_index.shape)}")
        pk, pv = gather_sets(pk, prompt_index), gather_sets(pv, prompt_index)
    if pk is not None:
        if pk.shape != pv.shape or pk.dim() != 4 or pk.shape[1] != q.shape[1] or pk.shape[3] != q.shape[3]:
            raise ValueError(f"expected pk, pv of shape (Bp, H={q.shape[1]}, P, d={q.shape[3]}), "
                             f"got {tuple(pk.shape)} and {tuple(pv.shape)}")
        if q.shape[0] % pk.shape[0]:
            raise ValueError(f"prompt batch Bp={pk.shape[0]} must divide the query batch B={q.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    low = autocast_dtype(q.device)
    if low is not None:  # as autocast does for scaled_dot_product_attention
        q, k, v = q.to(low), k.to(low), v.to(low)
        pk, pv = (None, None) if pk is None else (pk.to(low), pv.to(low))
    elif len({t.dtype for t in (q, k, v, pk, pv) if t is not None}) > 1:
        raise TypeError(f"q, k, v, pk, pv must share one dtype, got "
                        f"{[t.dtype for t in (q, k, v, pk, pv) if t is not None]}")
    out, _ = PromptAttention.apply(q, k, v, pk, pv, bias, scale, backend)
    return out
