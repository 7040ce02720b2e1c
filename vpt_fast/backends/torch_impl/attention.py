"""Prompt-aware attention in plain PyTorch (docs/design.md §2.1): `attention_fwd` / `attention_bwd`,
`attention_bwd_prompts` (the prompt columns alone) and the prompt-set gather/reduce they use.

Queries are a sample's own rows; keys/values are the sample's own rows plus an optional prompt
segment `pk/pv` of shape (Bp, H, P, d), where Bp divides B and query batch `b` reads prompt batch
`b // (B // Bp)`: Bp == 1 is the batch-shared (stride 0) segment of deep VPT, Bp == B a per-sample
segment, and B = Bp * nW the per-image segment shared by nW Swin windows. `bias` (optional,
(nB, H, Nq, Nk), query batch `b` reads `b % nB`) is added to own-token scores only; every pair
involving a prompt gets zero bias. With `prompt_index` (int64 (B,)) query batch `b` reads prompt set
`prompt_index[b]` of pk/pv (S, H, P, d) instead: this backend gathers the sets per sample (a
(B, H, P, d) copy; the triton and cuda kernels read through the index) and sums the per-sample
prompt gradients per set with a one-hot GEMM (fixed order, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vpt_fast.backends.dtypes import accumulation_dtype


def _expand_prompts(p: Tensor, batch: int) -> Tensor:
    """(Bp, H, P, d) -> (B, H, P, d) in query-batch order (a view when Bp is 1 or B)."""
    bp = p.shape[0]
    return p[:, None].expand(bp, batch // bp, *p.shape[1:]).reshape(batch, *p.shape[1:])


def _joint_kv(k: Tensor, v: Tensor, pk: Optional[Tensor], pv: Optional[Tensor]):
    if pk is None:
        return k, v
    return _joint_rows(pk, k), _joint_rows(pv, v)


def _joint_rows(p: Tensor, own: Tensor) -> Tensor:
    """[prompts; own rows] along the sequence: a (B, H, P + N, d) view of a (B, P + N, H, d) buffer.
    `own` is usually a view into the qkv projection's (B, N, 3, H, d) output, so each copied row is
    H * d contiguous elements; torch.cat into (B, H, P + N, d) measured ~30x slower on the CPU
    (ViT-S/16, batch 8, P=50: 22 ms against 0.7 ms for both K and V)."""
    batch, heads, rows, dim = own.shape
    num_prompts = p.shape[2]
    joint = own.new_empty((batch, num_prompts + rows, heads, dim)).transpose(1, 2)
    joint[:, :, :num_prompts].copy_(_expand_prompts(p, batch))
    joint[:, :, num_prompts:].copy_(own)
    return joint


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


def gather_prompt_sets(p: Tensor, prompt_index: Tensor) -> Tensor:
    """(S, H, P, d) prompt sets -> (B, H, P, d): sample b's set `prompt_index[b]`."""
    return p.index_select(0, prompt_index)


def reduce_prompt_sets(g: Tensor, prompt_index: Tensor, num_sets: int, dtype: torch.dtype) -> Tensor:
    """Per-sample prompt gradients (B, ...) -> per-set sums (num_sets, ...) in `dtype`: a one-hot GEMM
    accumulated in float32 or wider (same result on every run; zeros for sets no sample reads)."""
    acc = accumulation_dtype(g)
    one_hot = F.one_hot(prompt_index, num_sets).to(acc).t()
    summed = one_hot @ g.reshape(g.shape[0], -1).to(acc)
    return summed.to(dtype).view(num_sets, *g.shape[1:])


def copy_into_qkv(dqkv: Optional[Tensor], dq: Tensor, dk: Tensor, dv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv copied into the (B, H, N, d) views of dqkv (B, N, 3, H, d), and those views."""
    if dqkv is None:
        return dq, dk, dv
    views = tuple(t.transpose(1, 2) for t in dqkv.unbind(2))
    for view, grad in zip(views, (dq, dk, dv)):
        view.copy_(grad)
    return views


_FORCE_MATH = False  # tests flip this to check the math path on CPU
# On the CPU one flash call over the concatenated keys [prompts; own keys] measured 8-24% faster than
# the two segment calls and their merge (ViT-S and Swin-T shapes, fwd+bwd); tests set this to False
# to run the segmented path of CUDA through the CPU flash kernel.
_CPU_ONE_CALL = True


# ----------------------------------------------------------------------------------------------
# Attention through PyTorch's fused SDPA kernels, one key segment per call (docs/design.md §2.4):
# own keys (with the bias) in one call, the prompt segment in another, where the G = B // Bp query
# batches that share a prompt batch become one long query sequence of G * Nq rows (a view when q
# comes from timm's qkv layout), so pk/pv are read once per prompt batch and never expanded. The
# two results are merged by log-sum-exp. Backward runs the fused backward of each segment with the
# *merged* out and lse: delta = rowsum(dO * O) and P = exp(S - lse) are then the joint softmax's.
# ----------------------------------------------------------------------------------------------
def _fused_kernel(q: Tensor, has_bias: bool) -> Optional[str]:
    """The fused kernel for one segment: "cpu_flash", "flash" or "efficient"; None: the math path.
    float64 stays on the math path (exact references in tests)."""
    if _FORCE_MATH or q.dtype == torch.float64:
        return None
    if q.device.type == "cpu":
        return "cpu_flash"
    if q.device.type != "cuda" or q.shape[-1] % 8 or q.shape[-1] > 128:
        return None
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return None
    if not has_bias and q.dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "efficient"  # float32, or a bias (attn_bias operand)


def _prompt_kernel(kernel: str, q: Tensor) -> str:
    """The fused kernel of the prompt segment, which has no bias: flash where own keys needed the
    efficient kernel only for their bias."""
    return "flash" if kernel == "efficient" and q.dtype in (torch.float16, torch.bfloat16) else kernel


def _efficient_bias(bias: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
    """`bias[b % nB]` as the (B, H, Nq, Nk) attn_bias of the efficient kernel: its rows 16-element
    aligned (as scaled_dot_product_attention pads them), one copy broadcast over the batch with stride
    0 when nB == 1, else materialised per query batch."""
    nb, heads, nq, nk = bias.shape
    rows = 1 if nb == 1 else batch
    aligned = bias.new_empty((rows, heads, nq, -(-nk // 16) * 16), dtype=dtype)[..., :nk]
    aligned.unflatten(0, (rows // nb, nb)).copy_(bias[None])
    return aligned.expand(batch, heads, nq, nk)


def _lse_rows(lse: Tensor, rows: int) -> Tensor:
    """The efficient kernel's log-sum-exp layout: rows padded to a multiple of 32 with +inf."""
    padded = lse.new_full((*lse.shape[:-1], -(-rows // 32) * 32), float("inf"))
    padded[..., :rows] = lse
    return padded


def _segment_fwd(kernel: str, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                 scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of softmax(q k^T * scale + bias[b % nB]) v over one key segment, fused."""
    if kernel == "cpu_flash":
        mask = None if bias is None else _joint_bias(bias, q.shape[0], 0).to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
        return out, lse.float()
    if kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse
    attn_bias = None if bias is None else _efficient_bias(bias, q.shape[0], q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_bias, True, 0.0, False,
                                                                      scale=scale)[:2]
    return out, lse[..., :q.shape[2]]


def _segment_bwd(kernel: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                 out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one key segment, given the joint softmax's `out` and `lse` (float32)."""
    if kernel == "cpu_flash":
        mask = None if bias is None else _joint_bias(bias, q.shape[0], 0).to(q.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(accumulation_dtype(q)), 0.0, False, attn_mask=mask, scale=scale)
    if kernel == "flash":
        # Without dropout the kernel ignores the RNG state; these are its forward's (unset) shapes.
        rng_state = torch.empty(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty((), dtype=torch.uint64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, False, rng_state,
            unused, scale=scale)
    attn_bias = None if bias is None else _efficient_bias(bias, q.shape[0], q.dtype)
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    offset = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, attn_bias, out, _lse_rows(lse, q.shape[2]), seed, offset, 0.0, [True, True, True, False],
        False, scale=scale)
    return dq, dk, dv


def _group_queries(t: Tensor, prompt_batch: int) -> Tensor:
    """(B, H, N, ...) -> (Bp, H, G * N, ...), G = B // Bp: the query rows of the G batches that read one
    prompt batch as one sequence (a view when batches are N rows apart, as in timm's qkv layout)."""
    batch, heads, rows, *rest = t.shape
    group = batch // prompt_batch
    grouped = t.reshape(prompt_batch, group, heads, rows, *rest).transpose(1, 2)
    return grouped.reshape(prompt_batch, heads, group * rows, *rest)


def _ungroup_queries(t: Tensor, batch: int) -> Tensor:
    """Inverse of `_group_queries`: (Bp, H, G * N, ...) -> (B, H, N, ...)."""
    prompt_batch, heads, group_rows, *rest = t.shape
    group = batch // prompt_batch
    grouped = t.reshape(prompt_batch, heads, group, group_rows // group, *rest).transpose(1, 2)
    return grouped.reshape(batch, heads, group_rows // group, *rest)


def _fused_attention_fwd(kernel: str, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                         pv: Optional[Tensor], scale: float, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if pk is None or pk.shape[2] == 0:
        return _segment_fwd(kernel, q, k, v, bias, scale)
    out_p, lse_p = _segment_fwd(_prompt_kernel(kernel, q), _group_queries(q, pk.shape[0]), pk, pv, None, scale)
    out_p, lse_p = _ungroup_queries(out_p, q.shape[0]), _ungroup_queries(lse_p, q.shape[0])
    if k.shape[2] == 0:
        return out_p, lse_p
    out_o, lse_o = _segment_fwd(kernel, q, k, v, bias, scale)
    lse = torch.logaddexp(lse_o, lse_p)
    weight = torch.sigmoid(lse_o - lse_p)[..., None]  # exp(lse_o - lse): the own segment's share
    out = torch.lerp(out_p.float(), out_o.float(), weight).to(q.dtype)
    return out, lse


def _fused_attention_bwd(kernel: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                         pv: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
                         bias: Optional[Tensor]):
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    lse = lse.float()
    dq = dk = dv = dpk = dpv = None
    if k.shape[2] > 0 or pk is None or pk.shape[2] == 0:
        dq, dk, dv = _segment_bwd(kernel, dout, q, k, v, bias, out, lse, scale)
    if pk is not None and pk.shape[2] > 0:
        bp = pk.shape[0]
        dq_p, dpk, dpv = _segment_bwd(_prompt_kernel(kernel, q), _group_queries(dout, bp),
                                      _group_queries(q, bp), pk, pv, None, _group_queries(out, bp),
                                      _group_queries(lse, bp), scale)
        dq_p = _ungroup_queries(dq_p, q.shape[0])
        dq = dq_p if dq is None else dq + dq_p
    if dk is None:  # no own keys
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    if pk is not None and dpk is None:  # an empty prompt segment
        dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
    return dq, dk, dv, dpk, dpv


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor], pv: Optional[Tensor],
                  scale: float, bias: Optional[Tensor] = None,
                  prompt_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, Nq, d) in q's dtype, lse (B, H, Nq): natural log, float32 (float64 for
    float64 inputs)). `prompt_index` (int64 (B,), values in [0, S)): query batch b reads prompt set
    prompt_index[b] of pk, pv (S, H, P, d); gathered per sample here."""
    if prompt_index is not None:
        pk, pv = gather_prompt_sets(pk, prompt_index), gather_prompt_sets(pv, prompt_index)
    kernel = _fused_kernel(q, has_bias=bias is not None)
    if kernel is not None and not (kernel == "cpu_flash" and _CPU_ONE_CALL):
        return _fused_attention_fwd(kernel, q, k, v, pk, pv, scale, bias)
    kk, vv = _joint_kv(k, v, pk, pv)
    mask = _joint_bias(bias, q.shape[0], 0 if pk is None else pk.shape[2])
    if kernel == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kk, vv, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
        return out, lse.float()
    acc = accumulation_dtype(q)
    s = torch.matmul(q.to(acc), kk.to(acc).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(acc)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), vv.to(acc)).to(q.dtype)
    return out, lse


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                  pv: Optional[Tensor], out: Tensor, lse: Tensor, scale: float,
                  bias: Optional[Tensor] = None, prompt_index: Optional[Tensor] = None,
                  dqkv: Optional[Tensor] = None):
    """Returns (dq, dk, dv, dpk, dpv); dpk/dpv have pk's shape (summed over the batches reading each
    prompt batch, or each set with `prompt_index`; zeros for a set nobody reads).

    Args:
        prompt_index: as in `attention_fwd`.
        dqkv: optional (B, N, 3, H, d) buffer (Nq = Nk = N), the qkv projection's output layout:
            dq, dk, dv are copied into its q, k, v slots and returned as (B, H, N, d) views of it.
    """
    if prompt_index is None:
        dq, dk, dv, dpk, dpv = _attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
    else:
        num_sets = pk.shape[0]
        dq, dk, dv, dpk, dpv = _attention_bwd(dout, q, k, v, gather_prompt_sets(pk, prompt_index),
                                              gather_prompt_sets(pv, prompt_index), out, lse, scale, bias)
        dpk = reduce_prompt_sets(dpk, prompt_index, num_sets, pk.dtype)
        dpv = reduce_prompt_sets(dpv, prompt_index, num_sets, pv.dtype)
    dq, dk, dv = copy_into_qkv(dqkv, dq, dk, dv)
    return dq, dk, dv, dpk, dpv


def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pk: Optional[Tensor],
                   pv: Optional[Tensor], out: Tensor, lse: Tensor, scale: float, bias: Optional[Tensor]):
    """`attention_bwd` for prompt batches read as b // (B // Bp)."""
    kernel = _fused_kernel(q, has_bias=bias is not None)
    if kernel is not None and not (kernel == "cpu_flash" and _CPU_ONE_CALL):
        return _fused_attention_bwd(kernel, dout, q, k, v, pk, pv, out, lse, scale, bias)
    acc = accumulation_dtype(q)
    kk, vv = _joint_kv(k, v, pk, pv)
    num_prompts = 0 if pk is None else pk.shape[2]
    mask = _joint_bias(bias, q.shape[0], num_prompts)
    if kernel == "cpu_flash":
        dq, dkk, dvv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, kk, vv, out, lse.float(), 0.0, False,
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
        dq = torch.matmul(ds, kk.to(acc)).to(q.dtype)
        dkk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
    if pk is None:
        return dq, dkk.to(k.dtype), dvv.to(v.dtype), None, None
    bp = pk.shape[0]
    dpk = _reduce_prompt_grad(dkk[:, :, :num_prompts].to(acc), bp).to(pk.dtype)
    dpv = _reduce_prompt_grad(dvv[:, :, :num_prompts].to(acc), bp).to(pv.dtype)
    return dq, dkk[:, :, num_prompts:].to(k.dtype), dvv[:, :, num_prompts:].to(v.dtype), dpk, dpv


def attention_bwd_prompts(dout: Tensor, q: Tensor, pk: Tensor, pv: Tensor, out: Tensor, lse: Tensor,
                          scale: float, prompt_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(dpk, dpv) alone, for when q, k and v need no gradient (deep VPT's first block: frozen
    embeddings, images without gradient): the prompt columns of the flash backward, from the merged
    output and log-sum-exp of any backend's forward. Costs the P prompt columns instead of every key;
    prompt columns carry no bias. dpk/dpv have pk's shape (summed over the batches sharing a prompt
    batch, or per set with `prompt_index` as in `attention_bwd`)."""
    acc = accumulation_dtype(q)
    batch = q.shape[0]
    qa, do = q.to(acc), dout.to(acc)
    if prompt_index is None:
        pke, pve = _expand_prompts(pk, batch).to(acc), _expand_prompts(pv, batch).to(acc)
    else:
        pke, pve = gather_prompt_sets(pk, prompt_index).to(acc), gather_prompt_sets(pv, prompt_index).to(acc)
    p = torch.exp(torch.matmul(qa, pke.transpose(-1, -2)) * scale - lse.to(acc)[..., None])
    dpv = torch.matmul(p.transpose(-1, -2), do)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do, pve.transpose(-1, -2)) - delta) * scale
    dpk = torch.matmul(ds.transpose(-1, -2), qa)
    if prompt_index is not None:
        num_sets = pk.shape[0]
        return (reduce_prompt_sets(dpk, prompt_index, num_sets, pk.dtype),
                reduce_prompt_sets(dpv, prompt_index, num_sets, pv.dtype))
    bp = pk.shape[0]
    return _reduce_prompt_grad(dpk, bp).to(pk.dtype), _reduce_prompt_grad(dpv, bp).to(pv.dtype)
