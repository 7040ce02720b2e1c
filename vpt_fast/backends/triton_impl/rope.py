"""Triton rotary position embedding (timm `apply_rot_embed_cat`) in place: `rope_fwd` / `rope_bwd`
with `torch_impl`'s signatures, run by the kernels in `vpt_fast.kernels.rope` over a strided 4D view
(every stride passed: the rows of q or k inside a packed q/k/v GEMM output are rotated where they lie).
Math in float32; stored in x's (dy's) dtype.
"""
from __future__ import annotations

from torch import Tensor

from vpt_fast.backends.torch_impl.rope import rope_emb_rows
from vpt_fast.backends.triton_impl.common import (
    INTERPRET,
    call,
    check_available,
    check_same_device,
    check_tensor,
    custom_op,
    launch,
    triton,
)

if triton is not None:  # without triton the backend reports itself unavailable (common.AVAILABLE)
    from vpt_fast.kernels import rope as kernels


def _config(half_d: int) -> dict:
    block_half = triton.next_power_of_2(max(half_d, 1))
    if INTERPRET:
        return dict(BLOCK_ROWS=4, BLOCK_HALF=block_half, num_warps=1)
    return dict(BLOCK_ROWS=max(1, 1024 // block_half), BLOCK_HALF=block_half, num_warps=4)


def _launch(kernel, x: Tensor, emb: Tensor, half: bool) -> None:
    B, H, n, d = x.shape
    rows = B * H * n
    if rows == 0 or d == 0:
        return
    e = emb.expand(B, H, n, 2 * d)  # zero strides over broadcast batch / heads
    cfg = _config(d // 2)
    launch(kernel, (triton.cdiv(rows, cfg["BLOCK_ROWS"]),))(
        x, e, rows, H, n, d // 2, *x.stride(), *e.stride(), HALF=half, **cfg)


def _rope_fake(x, emb, half):
    return None


def _rope_fwd_impl(x: Tensor, emb: Tensor, half: bool) -> None:
    _launch(kernels._rope_fwd, x, emb, half)


def _rope_bwd_impl(dy: Tensor, emb: Tensor, half: bool) -> None:
    _launch(kernels._rope_bwd, dy, emb, half)


_rope_fwd_op = custom_op("triton_rope_fwd", _rope_fake, mutates_args=("x",))(_rope_fwd_impl)
_rope_bwd_op = custom_op("triton_rope_bwd", _rope_fake, mutates_args=("dy",))(_rope_bwd_impl)


def _check(name: str, x: Tensor, emb: Tensor, half: bool) -> Tensor:
    check_available()
    check_tensor(name, x, dim=4)
    check_tensor("emb", emb)
    check_same_device(x, emb=emb)
    if not isinstance(half, bool):
        raise TypeError(f"triton backend: half must be a bool, got {type(half).__name__}")
    return rope_emb_rows(x, emb)


def rope_fwd(x: Tensor, emb: Tensor, half: bool) -> Tensor:
    """Rotate x (B, H, n, d), any strides, in place by the first n rows of emb ((R, 2d), (H, R, 2d) or
    (B, H, R, 2d), broadcast over size-1 batch / heads; R >= n): x <- x * cos + rot(x) * sin. Returns x."""
    e = _check("x", x, emb, half)
    call(_rope_fwd_impl, "triton_rope_fwd", x, e, half)
    return x


def rope_bwd(dy: Tensor, emb: Tensor, half: bool) -> Tensor:
    """In place on dy (B, H, n, d): dx = dy * cos - rot(dy * sin), the inverse rotation. Returns dy."""
    e = _check("dy", dy, emb, half)
    call(_rope_bwd_impl, "triton_rope_bwd", dy, e, half)
    return dy
