# RMSNorm over the last dim (timm `RmsNorm`, `torch.nn.RMSNorm`), one program per row (rows = all
# leading dims flattened). Forward writes y (Y's dtype: under autocast the float32 rows are normalised
# straight into the bf16/fp16 the next GEMM reads) and the float32 rstd = 1 / sqrt(mean(x^2) + eps);
# backward gives dX only (the weight is frozen, docs/design.md §2.3):
#   dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * weight,  xhat = x * rstd.
#
# Tuned shape, AIMv2-L / Eva-style block norm: rows = B*N = 128*257 = 32,896, C = 1024, bf16.
#   forward : ~4 FLOP/element = 0.13 GFLOP; bytes: read x 67.4 MB, write y 67.4 MB (+0.1 MB rstd)
#   backward: ~7 FLOP/element = 0.24 GFLOP; bytes: read dy, x 134.7 MB, write dx 67.4 MB
#   -> ~1 FLOP/byte: memory-bound; the target is HBM bandwidth (~45 us fwd, ~67 us bwd on H100).
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x_row, n_cols, stride_y_row, eps,
                  HAS_WEIGHT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (rows,). Y is contiguous (rows, n_cols); RSTD is (rows,) float32."""
    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    y = x * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, stride_dy_row, stride_x_row, n_cols, stride_dx_row,
                  HAS_WEIGHT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (rows,). dX only; DX is contiguous (rows, n_cols)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = x * rstd  # masked columns: x = 0
    c = tl.sum(g * xhat, 0) / n_cols
    dx = (g - xhat * c) * rstd
    tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
