# LayerNorm over the last dim, one program per row (rows = all leading dims flattened).
# Forward writes y (Y's dtype: under autocast the fp32 residual stream is normalised straight into the
# bf16/fp16 the next GEMM reads) and fp32 mean / rstd; backward gives dX only (the affine is frozen,
# docs/design.md §2.3): dx = rstd * (g - xhat * mean(g * xhat) - mean(g)), g = dy * weight.
#
# Tuned shape, ViT-B/16 deep VPT block norm: rows = B*N = 128*197 = 25,216, C = 768, bf16.
#   forward : ~8 FLOP/element = 0.15 GFLOP; bytes: read x 38.7 MB, write y 38.7 MB (+0.2 MB stats)
#   backward: ~10 FLOP/element = 0.19 GFLOP; bytes: read dy, x 77.5 MB, write dx 38.7 MB
#   -> ~2 FLOP/byte: memory-bound; the target is HBM bandwidth (~26 us fwd, ~39 us bwd on H100).
import triton
import triton.language as tl


@triton.jit
def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, stride_x_row, n_cols, stride_y_row, eps,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (rows,). Y is contiguous (rows, n_cols); MEAN/RSTD are (rows,) float32."""
    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = _normalize_row(x, W, B, cols, mask, n_cols, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd(DY, X, W, MEAN, RSTD, DX, stride_dy_row, stride_x_row, n_cols, stride_dx_row,
                    HAS_WEIGHT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (rows,). dX only; DX is contiguous (rows, n_cols)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    dx = _normalize_row_bwd(x, dy, W, tl.load(MEAN + row), tl.load(RSTD + row), cols, mask, n_cols, HAS_WEIGHT)
    tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_row(x, W, B, cols, mask, n_cols, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm of one float32 row x (masked columns 0): (y float32, mean, rstd). Shared with
    kernels/add_layer_norm.py, whose y must equal this kernel's bit for bit (recompute="mlp")."""
    mean = tl.sum(x, 0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y, mean, rstd


@triton.jit
def _normalize_row_bwd(x, dy, W, mean, rstd, cols, mask, n_cols, HAS_WEIGHT: tl.constexpr):
    """dX of one row (float32 x and dy) of a LayerNorm with a frozen affine."""
    g = dy
    if HAS_WEIGHT:
        g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    c1 = tl.sum(g * xhat, 0) / n_cols
    c2 = tl.sum(g, 0) / n_cols
    return (g - xhat * c1 - c2) * rstd
