"""timm's rotary position embedding written IN PLACE into the rows of q or k after the prefix, with an
in-place inverse-rotation backward that saves only the embedding (docs/design.md §2.3): prompt-aware
attention then never holds a rotated copy of q/k next to the projection's output it is a view of.

`rope_(t, emb, start, half, backend)` equals
`torch.cat([t[:, :, :start], timm.layers.apply_rot_embed_cat(t[:, :, start:], emb[..., :N - start, :], half)], 2)`
to fp32 rounding (float32 math, stored in t's dtype as timm's `.to(x.dtype)`), and returns t itself.

When autograd cannot follow a write into t, the rotation runs out of place with autograd through
timm's formula and the rotated copy is returned instead of t (`_needs_out_of_place`): emb requires a
gradient; t is a leaf that requires one (or a view of such a leaf); t is a view autograd forbids
writing through (an output of `split` / `chunk` / `unbind`, or created under no_grad or inference
mode while its base requires grad); under torch.compile, which fuses the formula into its kernels.
Always use the returned tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from vpt_fast.backends import resolve


class RotaryInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, emb: Tensor, start: int, half: bool, backend: str):
        impl = resolve(backend, "rope", t.device)
        rows = t.shape[2] - start
        impl.rope_fwd(t.narrow(2, start, rows), emb, half)
        ctx.mark_dirty(t)
        ctx.save_for_backward(emb)  # not an activation: the embedding is shared by every block
        ctx.impl, ctx.start, ctx.rows, ctx.half = impl, start, rows, half
        # t is a view of a tensor that requires grad: autograd routes the gradient through CopySlices,
        # which hands backward a fresh contiguous clone of the view's gradient, ours to overwrite
        ctx.fresh_grad = t._base is not None
        return t

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (emb,) = ctx.saved_tensors
        if not (ctx.fresh_grad and dy.is_contiguous()):  # maybe held elsewhere (another node, a hook)
            dy = dy.clone(memory_format=torch.contiguous_format)
        ctx.impl.rope_bwd(dy.narrow(2, ctx.start, ctx.rows), emb, ctx.half)
        return dy, None, None, None, None


def _writable_view(t: Tensor) -> bool:
    """t is not a view, or a view that autograd lets an in-place op write through."""
    if t._base is None:
        return True
    meta = torch._C._autograd._get_creation_meta(t)
    return meta == torch._C._autograd.CreationMeta.DEFAULT


def _needs_out_of_place(t: Tensor, emb: Tensor) -> bool:
    if torch.compiler.is_compiling():  # inductor fuses the out-of-place formula; dynamo cannot trace view metadata
        return True
    if not torch.is_grad_enabled():
        return False
    if emb.requires_grad:
        return True
    if not t.requires_grad:
        return False
    return t.is_leaf or (t._base is not None and t._base.is_leaf) or not _writable_view(t)


def _rotate_out_of_place(t: Tensor, emb: Tensor, start: int, half: bool) -> Tensor:
    from timm.layers import apply_rot_embed_cat
    rows = t.shape[2] - start
    rotated = apply_rot_embed_cat(t[:, :, start:], emb.narrow(-2, 0, rows), half=half)
    return rotated if start == 0 else torch.cat([t[:, :, :start], rotated], dim=2)


def rope_(t: Tensor, emb: Tensor, start: int, half: bool, backend: str) -> Tensor:
    """Rotate the rows [start, N) of t (B, H, N, d) in place by the first N - start rows (dim -2) of
    `emb` (timm's `cat(sin, cos)`, last dim 2d; shape (R, 2d), (H, R, 2d), (B, 1, R, 2d) or
    (B, H, R, 2d), R >= N - start), pairing (2j, 2j + 1) or, with `half`, (j, j + d/2). Rows before
    `start` are untouched; N <= start returns t unchanged.

    t may be any strided view (the q or k of a packed GEMM output). Returns t itself, whose autograd
    history then includes the rotation (its backward overwrites the incoming gradient with the inverse
    rotation and saves only emb), or, where autograd cannot follow an in-place write (see the module
    docstring), a rotated copy by timm's own formula.
    """
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise ValueError(f"rope_: t must be a (B, H, N, d) tensor, got {getattr(t, 'shape', type(t))}")
    if not 0 <= start:
        raise ValueError(f"rope_: start must be >= 0, got {start}")
    rows = t.shape[2] - start
    if rows <= 0:
        return t
    if _needs_out_of_place(t, emb):
        return _rotate_out_of_place(t, emb, start, half)
    if torch.is_grad_enabled() and t.requires_grad:
        return RotaryInPlace.apply(t, emb, start, half, backend)
    resolve(backend, "rope", t.device).rope_fwd(t.narrow(2, start, rows), emb, half)
    return t
