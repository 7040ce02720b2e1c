"""Prompt-aware primitives in plain PyTorch (aten ops only): the executable specification.

Each op comes as a forward primitive and a backward primitive that computes input gradients only
(the backbone is frozen, DESIGN.md §2.3). `vpt_fast/ops/<op>.py` wraps a pair in one
`torch.autograd.Function` and decides what is saved; the triton and cuda backends provide the same
primitives with the same signatures, so every backend is checked against this file.

Attention (DESIGN.md §2.1): queries are a sample's own rows; keys/values are the sample's own rows
plus an optional prompt segment `pk/pv` of shape (Bp, H, P, d), where Bp divides B and query batch
`b` reads prompt batch `b // (B // Bp)`: Bp == 1 is the batch-shared (stride 0) segment of deep VPT,
Bp == B a per-sample segment, and B = Bp * nW the per-image segment shared by nW Swin windows.
`bias` (optional, (nB, H, Nq, Nk), query batch `b` reads `b % nB`) is added to own-token scores
only; every pair involving a prompt gets zero bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _expand_prompts(p: Tensor, batch: int) -> Tensor:
    """(Bp, H, P, d) -> (B, H, P, d) in query-batch order (a view when Bp is 1 or B)."""
    bp = p.shape[0]
    return p[:, None].expand(bp, batch // bp, *p.shape[1:]).reshape(batch, *p.shape[1:])


def _joint_kv(k: Tensor, v: Tensor, pk: Optional[Tensor], pv: Optional[Tensor]):
    if pk is None:
        return k, v
    batch = k.shape[0]
    return (torch.cat([_expand_prompts(pk, batch), k], dim=2),
            torch.cat([_expand_prompts(pv, batch), v], dim=2))


def _joint_bias(bias: Optional[Tensor], batch: int, num_prompts: int) -> Optional[Tensor]:
    """Bias over [prompts, own keys]: zero on prompt columns, `bias[b % nB]` on own keys."""
    if bias is None:
        return None
    nb = bias.shape[0]
    full = bias[None].expand(batch // nb, *bias.shape).reshape(batch, *bias.shape[1:])
    return F.pad(full, (num_prompts, 0)) if num_prompts else full


def _reduce_prompt_grad(g: Tensor, bp: int) -> Tensor:
    batch = g.shape[0]
    return g.reshape(bp, batch // bp, *g.shape[1:]).sum(1)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """float32 accumulation for low precision; float64 stays float64 (exact references in tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _use_cpu_flash(q: Tensor) -> bool:
    # The CPU flash kernels are what eager timm runs on CPU; elsewhere the fp32 math path below.
    return q.device.type == "cpu" and not _FORCE_MATH


_FORCE_MATH = False  # tests flip this to check the math path on CPU


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor], pv: Optional[Tensor],
                  scale: float, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, Nq, d) in q's dtype, lse (B, H, Nq): natural log, float32 (float64 for
    float64 inputs))."""
    acc = _acc_dtype(q)
    kk, vv = _joint_kv(k, v, pk, pv)
    mask = _joint_bias(bias, q.shape[0], 0 if pk is None else pk.shape[2])
    if _use_cpu_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kk, vv, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
        return out, lse.to(_acc_dtype(q))
    s = torch.matmul(q.to(acc), kk.to(acc).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(acc)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), vv.to(acc)).to(q.dtype)
    return out, lse


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                  pv: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
                  bias: Optional[Tensor] = None):
    """Returns (dq, dk, dv, dpk, dpv); dpk/dpv have pk's shape (summed over the batches sharing it)."""
    acc = _acc_dtype(q)
    kk, vv = _joint_kv(k, v, pk, pv)
    num_prompts = 0 if pk is None else pk.shape[2]
    mask = _joint_bias(bias, q.shape[0], num_prompts)
    if _use_cpu_flash(q):
        dq, dkk, dvv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, kk, vv, out, lse.to(_acc_dtype(q)), 0.0, False,
            attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
    else:
        s = torch.matmul(q.to(acc), kk.to(acc).transpose(-1, -2)) * scale
        if mask is not None:
            s = s + mask.to(acc)
        p = torch.exp(s - lse[..., None])
        do = dout.to(acc)
        dvv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, vv.to(acc).transpose(-1, -2))
        delta = (do * out.to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, kk.to(acc))
        dkk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
        dq, dkk, dvv = dq.to(q.dtype), dkk.to(k.dtype), dvv.to(v.dtype)
    if pk is None:
        return dq, dkk, dvv, None, None
    bp = pk.shape[0]
    dpk = _reduce_prompt_grad(dkk[:, :, :num_prompts].to(acc), bp).to(pk.dtype)
    dpv = _reduce_prompt_grad(dvv[:, :, :num_prompts].to(acc), bp).to(pv.dtype)
    return dq, dkk[:, :, num_prompts:], dvv[:, :, num_prompts:], dpk, dpv


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim. Returns (y, mean, rstd): y in `out_dtype` (default x's dtype),
    rounded once from the accumulation dtype; mean/rstd of shape x.shape[:-1] in the accumulation
    dtype (float32, float64 for float64 inputs)."""
    y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y, mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                   rstd: Tensor) -> Tensor:
    """dX only (in x's dtype; dy may be in another dtype): the affine parameters are frozen."""
    if weight is not None and weight.dtype != x.dtype:  # e.g. bf16 rows, fp32 affine: the aten kernel wants one dtype
        acc = _acc_dtype(x)
        return layer_norm_bwd(dy.to(acc), x.to(acc), weight.to(acc), mean, rstd).to(x.dtype)
    dx, _, _ = torch.ops.aten.native_layer_norm_backward(
        dy.to(x.dtype), x, x.shape[-1:], mean.unsqueeze(-1), rstd.unsqueeze(-1), weight, None, [True, False, False])
    return dx


def bias_gelu_fwd(h: Tensor, bias: Optional[Tensor]) -> Tensor:
    """gelu(h + bias), exact erf GELU as timm's default `nn.GELU`."""
    return F.gelu(h if bias is None else h + bias)


def bias_gelu_bwd(dg: Tensor, h: Tensor, bias: Optional[Tensor]) -> Tensor:
    """d gelu(h + bias) / dh: dX only."""
    return torch.ops.aten.gelu_backward(dg, h if bias is None else h + bias)
