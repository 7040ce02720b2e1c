"""Prompt-aware attention (docs/design.md §2.1): a sample's queries attend to its own keys/values plus a
prompt segment that is shared by the batch (deep VPT), by the windows of one image (Swin), per
sample, or picked per sample from a stacked table of prompt sets by `prompt_index` (several tasks in
one batch, docs/design.md §8). One autograd.Function saves q, k, v, the prompt segment once (never its
B expanded or gathered copies), the output and the log-sum-exp; backward recomputes probabilities as
flash attention does.

Two entries: `attention(q, k, v, ...)` for any q, k, v, and `attention_qkv(qkv, ...)`
for the standard case where q, k, v are the three slots of one qkv projection output (B, N, 3, H, d):
its backward has the backend write dq, dk, dv straight into one buffer of that layout and hands it to
autograd as qkv's gradient (no stacking or copying of three separate gradients).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve, torch_impl
from vpt_fast.backends.dtypes import attention_operands


def _split_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3, H, d) -> q, k, v as (B, H, N, d) views, as timm's Attention splits them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, bias, prompt_index, scale: float, backend: str):
        impl = resolve(backend, "attention", q.device)
        out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias, prompt_index=prompt_index)
        ctx.save_for_backward(q, k, v, pk, pv, bias, prompt_index, out, lse)
        ctx.impl, ctx.scale = impl, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, pk, pv, bias, prompt_index, out, lse = ctx.saved_tensors
        if pk is not None and not any(ctx.needs_input_grad[:3]):
            # only the prompt segment needs a gradient (deep VPT's first block): its P columns
            dpk, dpv = torch_impl.attention_bwd_prompts(dout, q, pk, pv, out, lse, ctx.scale, prompt_index)
            return None, None, None, dpk, dpv, None, None, None, None
        dq, dk, dv, dpk, dpv = ctx.impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, ctx.scale, bias,
                                                      prompt_index=prompt_index)
        return dq, dk, dv, dpk, dpv, None, None, None, None


class AttentionQKV(torch.autograd.Function):
    """`Attention` on the q, k, v slots of one (B, N, 3, H, d) tensor; the gradient of that
    tensor is one buffer of its layout that the backend fills."""

    @staticmethod
    def forward(ctx, qkv, pk, pv, bias, prompt_index, scale: float, backend: str):
        impl = resolve(backend, "attention", qkv.device)
        q, k, v = _split_qkv(qkv)
        out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias, prompt_index=prompt_index)
        ctx.save_for_backward(qkv, pk, pv, bias, prompt_index, out, lse)
        ctx.impl, ctx.scale = impl, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        qkv, pk, pv, bias, prompt_index, out, lse = ctx.saved_tensors
        q, k, v = _split_qkv(qkv)
        if pk is not None and not ctx.needs_input_grad[0]:
            dpk, dpv = torch_impl.attention_bwd_prompts(dout, q, pk, pv, out, lse, ctx.scale, prompt_index)
            return None, dpk, dpv, None, None, None, None
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _, _, _, dpk, dpv = ctx.impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, ctx.scale, bias,
                                                   prompt_index=prompt_index, dqkv=dqkv)
        return dqkv, dpk, dpv, None, None, None, None


class GatherPromptSets(torch.autograd.Function):
    """`table[index]` along dim 0: per-sample prompt rows where a copy is needed (the reference
    backend, prompt dropout per sample, shallow prompts entering the token sequence)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.num_sets = table.shape[0]
        return torch_impl.gather_prompt_sets(table, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return torch_impl.reduce_prompt_sets(grad, index, ctx.num_sets, grad.dtype), None


def gather_prompt_sets(table: Tensor, index: Tensor) -> Tensor:
    """Rows of `table` (S, ...) for each entry of `index` (B,): (B, ...), with a deterministic
    backward (each set's gradient a one-hot GEMM over the samples that read it, no atomics)."""
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"prompt_index must be a 1-dim integer tensor, got {index.dtype} of shape "
                         f"{tuple(index.shape)}")
    return GatherPromptSets.apply(table, index.long())


def check_prompt_index(prompt_index: Tensor, batch: int, num_sets: int, device: torch.device,
                       check_range: bool = True) -> Tensor:
    """`prompt_index` as the backends take it (int64, contiguous), after checking it.

    Args:
        prompt_index: (batch,) int64 or int32 tensor on `device`.
        batch: the query batch B.
        num_sets: S, the number of prompt sets; every value must lie in [0, S).
        device: the queries' device.
        check_range: check the values (one host sync on CUDA; under torch.compile an asynchronous
            device assert). False for callers that validated the index once already (PromptBank's
            task ids): the kernels trust it.
    """
    if not isinstance(prompt_index, Tensor) or prompt_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"prompt_index must be an int64 (or int32) tensor, got "
                         f"{getattr(prompt_index, 'dtype', type(prompt_index).__name__)}")
    if prompt_index.shape != (batch,):
        raise ValueError(f"prompt_index must have shape (B={batch},), one prompt set per query batch, got "
                         f"{tuple(prompt_index.shape)}")
    if prompt_index.device != device:
        raise ValueError(f"prompt_index must be on the queries' device {device}, got {prompt_index.device}")
    prompt_index = prompt_index.long().contiguous()
    if check_range and batch:
        message = f"prompt_index values must be in [0, S={num_sets}) (S: the prompt sets in pk, pv)"
        if torch.compiler.is_compiling():
            torch._assert_async(((prompt_index >= 0) & (prompt_index < num_sets)).all(), message)
        else:
            low, high = torch.aminmax(prompt_index)
            if int(low) < 0 or int(high) >= num_sets:
                raise ValueError(f"{message}, got values from {int(low)} to {int(high)}")
    return prompt_index


def _check_prompts(query_shape: tuple[int, ...], device: torch.device, pk: Optional[Tensor], pv: Optional[Tensor],
                   prompt_index: Optional[Tensor], check_index_range: bool) -> Optional[Tensor]:
    """Checks the prompt segment against the queries (B, H, Nq, d) on `device`; returns the index as
    the backends take it."""
    if (pk is None) != (pv is None):
        raise ValueError("pk and pv must be given together")
    if pk is None:
        if prompt_index is not None:
            raise ValueError("prompt_index needs prompt sets pk, pv (S, H, P, d), got pk=None")
        return None
    batch, heads, _, head_dim = query_shape
    first = "S" if prompt_index is not None else "Bp"
    if pk.shape != pv.shape or pk.dim() != 4 or pk.shape[1] != heads or pk.shape[3] != head_dim:
        raise ValueError(f"expected pk, pv of shape ({first}, H={heads}, P, d={head_dim}), "
                         f"got {tuple(pk.shape)} and {tuple(pv.shape)}")
    if prompt_index is not None:
        return check_prompt_index(prompt_index, batch, pk.shape[0], device, check_index_range)
    if pk.shape[0] < 1 or batch % pk.shape[0]:
        raise ValueError(f"prompt batch Bp={pk.shape[0]} must divide the query batch B={batch}")
    return None


def attention(q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor] = None,
              pv: Optional[Tensor] = None, *, scale: Optional[float] = None,
              bias: Optional[Tensor] = None, backend: str = "torch",
              prompt_index: Optional[Tensor] = None, check_index_range: bool = True) -> Tensor:
    """softmax(q [pk; k]^T * scale + [0, bias]) [pv; v] per query batch.

    Args:
        q: (B, H, Nq, d) queries of each sample's own rows.
        k, v: (B, H, Nk, d) keys/values of each sample's own rows.
        pk, pv: optional prompt segment (Bp, H, P, d); query batch b reads prompt batch
            b // (B // Bp), so Bp = 1 shares one segment across the batch.
        scale: softmax scale, default d ** -0.5.
        bias: optional (nB, H, Nq, Nk) additive bias on own keys (query batch b reads b % nB).
        backend: "auto" or a registered backend with primitives (`vpt_fast.backends.REGISTRY`).
        prompt_index: optional (B,) int64 (or int32) tensor on q's device: query batch b reads prompt
            set `prompt_index[b]` of pk, pv (S, H, P, d) instead (several tasks in one batch; S need
            not divide B). The triton and cuda backends read the set through the index inside their
            kernels (no per-sample copies; the torch backend gathers); the gradients of pk, pv are
            summed per set in a fixed order (bitwise reproducible), zeros for sets no sample reads.
        check_index_range: check that every index value lies in [0, S) (one host sync on CUDA).
            False for callers that checked the index once already; out-of-range values then read
            out of bounds.

    Returns:
        (B, H, Nq, d) attention output.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"expected q (B, H, Nq, d) and k, v (B, H, Nk, d), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    prompt_index = _check_prompts(q.shape, q.device, pk, pv, prompt_index, check_index_range)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, pk, pv = attention_operands([q, k, v, pk, pv], q.device)
    out, _ = Attention.apply(q, k, v, pk, pv, bias, prompt_index, scale, backend)
    return out


def attention_qkv(qkv: Tensor, pk: Optional[Tensor] = None, pv: Optional[Tensor] = None, *,
                  scale: Optional[float] = None, bias: Optional[Tensor] = None, backend: str = "torch",
                  prompt_index: Optional[Tensor] = None, check_index_range: bool = True) -> Tensor:
    """`attention` on q, k, v = the three slots of one qkv projection output, whose gradient
    the backend writes as one buffer of qkv's layout (the stacked gradient autograd would otherwise
    assemble from three separate ones).

    Args:
        qkv: (B, N, 3, H, d): timm's `qkv(x).view(B, N, 3, H, d)`; q, k, v are
            `qkv.permute(2, 0, 3, 1, 4)` slots 0, 1, 2 (Nq = Nk = N).
        pk, pv, scale, bias, backend, prompt_index, check_index_range: as in `attention`.

    Returns:
        (B, H, N, d) attention output.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"expected qkv of shape (B, N, 3, H, d), got {tuple(qkv.shape)}")
    batch, tokens, _, heads, head_dim = qkv.shape
    prompt_index = _check_prompts((batch, heads, tokens, head_dim), qkv.device, pk, pv, prompt_index,
                                  check_index_range)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    qkv, pk, pv = attention_operands([qkv, pk, pv], qkv.device)
    out, _ = AttentionQKV.apply(qkv, pk, pv, bias, prompt_index, scale, backend)
    return out
