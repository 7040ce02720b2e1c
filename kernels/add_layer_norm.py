# Fused residual add + LayerNorm over the last dim, one program per row (rows = all leading dims).
# Forward: s = residual + branch * scale (scale: an optional per-channel LayerScale), written once in
# S's dtype (the residual stream: float32 under autocast), then y = LayerNorm(s) written once in Y's
# dtype (the GEMM's under autocast) with float32 mean / rstd. Backward (frozen affine, dX only,
# docs/design.md §2.3): ds_total = ds + rstd * (g - shat * mean(g * shat) - mean(g)), g = dy * weight,
# written once as the residual's gradient and, when the branch needs its own (LayerScale, or another
# dtype), as branch gradient ds_total * scale in the same pass.
# The LayerNorm arithmetic is `_layer_norm_fwd` / `_layer_norm_bwd`'s (their shared row helpers), and the wrappers
# launch both with the same block size and warps: recompute="mlp" reruns `_layer_norm_fwd` on the saved
# s and must get y's bits back.
#
# Tuned shape, ViT-B/16 deep VPT norm2: rows = B*N = 128*197 = 25,216, C = 768, bf16 autocast
# (residual and s float32, branch, y and dy bf16).
#   forward : ~10 FLOP/element = 0.19 GFLOP; bytes: read residual 77.5 MB + branch 38.7 MB, write s
#             77.5 MB + y 38.7 MB (+0.2 MB stats) = 232 MB, against 310 MB for an add kernel then
#             LayerNorm (s written, then read again).
#   backward: ~12 FLOP/element = 0.23 GFLOP; bytes: read ds 77.5 MB + dy 38.7 MB + s 77.5 MB, write
#             d residual 77.5 MB + d branch 38.7 MB = 310 MB, against 542 MB unfused (LayerNorm dX
#             written and read back, summed with ds, cast for the branch).
#   -> under 1 FLOP/byte: memory-bound; the target is HBM bandwidth (~78 us fwd, ~103 us bwd on H100).
import triton
import triton.language as tl

from .layer_norm import _normalize_row, _normalize_row_bwd


@triton.jit
def _add_layer_norm_fwd(RES, BRANCH, SCALE, W, B, S, Y, MEAN, RSTD, stride_res_row, stride_branch_row,
                        n_cols, stride_s_row, stride_y_row, eps, HAS_SCALE: tl.constexpr,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (rows,). S and Y are contiguous (rows, n_cols); MEAN/RSTD are (rows,) float32."""
    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    branch = tl.load(BRANCH + row * stride_branch_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        branch = branch * tl.load(SCALE + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(RES + row * stride_res_row + cols, mask=mask, other=0.0).to(tl.float32) + branch
    s = s.to(S.dtype.element_ty)
    tl.store(S + row * stride_s_row + cols, s, mask=mask)
    # the stored s, rounded to S's dtype, is what LayerNorm normalises
    y, mean, rstd = _normalize_row(s.to(tl.float32), W, B, cols, mask, n_cols, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_layer_norm_bwd(DS, DY, S, W, MEAN, RSTD, SCALE, DRES, DBRANCH, stride_ds_row, stride_dy_row,
                        stride_s_row, n_cols, stride_dres_row, stride_dbranch_row, HAS_DS: tl.constexpr,
                        HAS_DY: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr,
                        WRITE_DBRANCH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (rows,). DRES (and DBRANCH when WRITE_DBRANCH) are contiguous (rows, n_cols)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    if HAS_DY:
        x = tl.load(S + row * stride_s_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        total = _normalize_row_bwd(x, dy, W, tl.load(MEAN + row), tl.load(RSTD + row), cols, mask, n_cols,
                                   HAS_WEIGHT)
        # LayerNorm's dX as its own kernel stores it, before the residual gradient joins it
        total = total.to(DRES.dtype.element_ty).to(tl.float32)
        if HAS_DS:
            total = total + tl.load(DS + row * stride_ds_row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        total = tl.load(DS + row * stride_ds_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DRES + row * stride_dres_row + cols, total.to(DRES.dtype.element_ty), mask=mask)
    if WRITE_DBRANCH:
        total = total.to(DRES.dtype.element_ty).to(tl.float32)  # the residual's gradient, as stored
        if HAS_SCALE:
            total = total * tl.load(SCALE + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DBRANCH + row * stride_dbranch_row + cols, total.to(DBRANCH.dtype.element_ty), mask=mask)
