"""Swin window partition / reverse as one row gather each way (Swin, arXiv 2103.14030).

timm's partition is a cyclic shift (`torch.roll`), zero padding to whole windows and
`window_partition` (a permute copy): three copies of the grid, and three more in backward; its
reverse is `window_reverse`, a crop and the roll back. All of it only moves rows, and every real
grid row lands in exactly one window row, so partition is a gather by a precomputed `index` and its
gradient is the gather by the inverse map: one `index_select` each way, forward and backward, no
scatter-add. Bytes moved per gather: 2 x B*H*W*C elements (read + write), no FLOPs: memory-bound.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def window_index(height: int, width: int, window_size: tuple[int, int], shift_size: tuple[int, int],
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """Index maps between the (H*W) grid rows and the (nW*N) window rows, in timm's order
    (window-major, row-major inside a window; windows row-major over the padded grid).

    Returns:
        index (nW*N,): grid row read by each window row; `H*W` (one past the end) where the row is
            zero padding.
        inverse (H*W,): window row holding each grid row.
    """
    wh, ww = window_size
    sh, sw = shift_size
    area, per_row = wh * ww, -(-width // ww)  # rows per window, windows across the padded width
    hp, wp = -(-height // wh) * wh, per_row * ww

    # Window row k is padded-grid position (i, j); timm rolls by -shift before padding, so (i, j)
    # holds grid row ((i + sh) % H, (j + sw) % W), or zero padding when i >= H or j >= W.
    k = torch.arange(hp * wp, device=device)
    i = k // area // per_row * wh + k % area // ww
    j = k // area % per_row * ww + k % ww
    index = torch.where((i < height) & (j < width), (i + sh) % height * width + (j + sw) % width,
                        height * width)
    # Grid row (r, c) sits at padded-grid position ((r - sh) % H, (c - sw) % W), never padding.
    # Every operand of `%` and `//` is kept non-negative: under torch.compile these maps are built
    # inside the graph and inductor fuses them into the gather as index arithmetic, which it can
    # only express (and bound) for non-negative operands; a negative one leaves a remainder whose
    # value range inductor cannot bound, and code generation fails in the gather.
    r = torch.arange(height, device=device)[:, None]
    c = torch.arange(width, device=device)[None, :]
    i, j = (r + (height - sh % height)) % height, (c + (width - sw % width)) % width
    inverse = ((i // wh * per_row + j // ww) * area + i % wh * ww + j % ww).reshape(-1)
    return index, inverse


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, C) -> (B, len(index), C) rows `index`; an index longer than L has padding entries
    (= L), which read an appended zero row."""
    if index.numel() > x.shape[1]:
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
    return torch.index_select(x, 1, index)


class RowGather(torch.autograd.Function):
    """out = x[:, index] with the exact gradient dx = dout[:, inverse]: `index` and `inverse` are
    inverse maps on the real rows (padding rows of either side get no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return _take(x, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        (inverse,) = ctx.saved_tensors
        return _take(dout, inverse), None, None


def window_partition(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """Grid rows (B, H*W, C) -> window rows (B, nW*N, C), the maps of `window_index`."""
    return RowGather.apply(x, index, inverse)


def window_reverse(windows: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """Window rows (B, nW*N, C) -> grid rows (B, H*W, C); the inverse of `window_partition`."""
    return RowGather.apply(windows, inverse, index)
