"""timm's rotary position embedding (`timm.layers.apply_rot_embed_cat`) written in place in plain
PyTorch: `rope_fwd` rotates rows where they lie, `rope_bwd` overwrites a gradient with its inverse
rotation. `emb` is timm's `cat(sin, cos)` on the last dim (2d); the arithmetic is timm's
`x * cos + rot(x) * sin` in the accumulation dtype (float32 for half rows, or emb's if wider), one
rounding to x's dtype at the end, as timm's `.to(x.dtype)`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vpt_fast.backends.dtypes import accumulation_dtype


def rope_emb_rows(x: Tensor, emb: Tensor) -> Tensor:
    """The first x.shape[-2] rows (dim -2) of `emb`, checked against x (B, H, n, d): emb of shape
    (R, 2d), (H or 1, R, 2d) or (B or 1, H or 1, R, 2d) with R >= n. Raises ValueError naming the
    mismatch."""
    if x.dim() != 4:
        raise ValueError(f"rope: x must be (B, H, rows, d), got shape {tuple(x.shape)}")
    B, H, n, d = x.shape
    if d % 2:
        raise ValueError(f"rope: the head dim must be even, got {d}")
    if not 2 <= emb.dim() <= 4:
        raise ValueError(f"rope: emb must be (R, 2d), (H, R, 2d) or (B, H, R, 2d), got shape {tuple(emb.shape)}")
    if emb.shape[-1] != 2 * d:
        raise ValueError(f"rope: emb's last dim must be 2 * head dim = {2 * d} (sin, cos), got {emb.shape[-1]}")
    if emb.shape[-2] < n:
        raise ValueError(f"rope: emb has {emb.shape[-2]} rows (dim -2), fewer than the {n} rows to rotate")
    lead = emb.shape[:-2]
    want = (B, H)[2 - len(lead):]
    if any(e not in (1, w) for e, w in zip(lead, want)):
        raise ValueError(f"rope: emb's leading dims {tuple(lead)} do not broadcast to {want} (batch, heads)")
    return emb.narrow(-2, 0, n)


def _rot(x: Tensor, half: bool) -> Tensor:
    if half:  # timm rope_rotate_half: [x0 x1 x2 x3] -> [-x2 -x3 x0 x1]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)  # timm rot: pairs (x0, x1) -> (-x1, x0)


def rope_fwd(x: Tensor, emb: Tensor, half: bool) -> Tensor:
    """Rotate x (B, H, n, d), any strides, in place by the first n rows of emb (see `rope_emb_rows`):
    x <- x * cos + rot(x) * sin, `rot` pairing (2j, 2j + 1) or, with `half`, (j, j + d/2). Returns x."""
    e = rope_emb_rows(x, emb)
    acc = torch.promote_types(accumulation_dtype(x), e.dtype)
    sin, cos = e.to(acc).chunk(2, dim=-1)
    xa = x.to(acc)
    x.copy_(xa * cos + _rot(xa, half) * sin)
    return x


def rope_bwd(dy: Tensor, emb: Tensor, half: bool) -> Tensor:
    """The gradient of `rope_fwd`'s rotation, in place on dy (B, H, n, d): the rotation is orthogonal
    per pair (rot^T = -rot), so dx = dy * cos - rot(dy * sin). Returns dy."""
    e = rope_emb_rows(dy, emb)
    acc = torch.promote_types(accumulation_dtype(dy), e.dtype)
    sin, cos = e.to(acc).chunk(2, dim=-1)
    g = dy.to(acc)
    dy.copy_(g * cos - _rot(g * sin, half))
    return dy
