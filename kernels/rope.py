# Rotary position embedding (timm `apply_rot_embed_cat`) applied IN PLACE to a strided 4D view
# X (B, H, n, d): rows are the rotated (patch) rows of q or k, read and written where they lie (a view
# of a packed q/k/v GEMM output). EMB holds timm's `cat(sin, cos)` on its last dim (2d), broadcast to
# (B, H, n, 2d) by zero strides. Each pair (first, second) of a row is rotated by its own program:
#   interleaved (HALF=False): first = 2j,  second = 2j + 1        (timm `rot`)
#   half        (HALF=True) : first = j,   second = j + d/2       (timm `rope_rotate_half`)
#   forward : y[f] = x[f] cos[f] - x[s] sin[f],   y[s] = x[s] cos[s] + x[f] sin[s]
#   backward: dx = dy cos - rot(dy sin):  dx[f] = dy[f] cos[f] + dy[s] sin[s],
#                                         dx[s] = dy[s] cos[s] - dy[f] sin[f]   (written into DY)
# Math in float32, stored in X's dtype.
#
# Tuned shape, ViT-B DINOv3-style q or k: B*H*n = 128*12*196 = 301,056 rows, d = 64, bf16.
#   forward : 3 FLOP/element = 58 MFLOP; bytes per element: read x 2 + read sin, cos 8 (fp32; the emb
#             rows are shared by every batch and head, so mostly cache hits: ~0.3 B/element from HBM)
#             + write 2 -> ~4.3 B/element, 38.5 MB read + 38.5 MB written
#   backward: the same counts on dy.
#   -> < 1 FLOP/byte: memory-bound; the target is HBM bandwidth (~25 us per call on H100).
import triton
import triton.language as tl


@triton.jit
def _rope_load(X, EMB, rows, cols, n_rows, H, n, half_d,
               stride_xb, stride_xh, stride_xn, stride_xd,
               stride_eb, stride_eh, stride_en, stride_ed, HALF: tl.constexpr):
    """Row offsets of the pairs and their (x_first, x_second, sin/cos at first and second) in fp32."""
    b = rows // (H * n)
    h = (rows // n) % H
    i = rows % n
    x_row = b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + i.to(tl.int64) * stride_xn
    e_row = b.to(tl.int64) * stride_eb + h.to(tl.int64) * stride_eh + i.to(tl.int64) * stride_en
    if HALF:
        first = cols
        second = cols + half_d
    else:
        first = 2 * cols
        second = 2 * cols + 1
    mask = (rows < n_rows)[:, None] & (cols < half_d)[None, :]
    xf_ptr = X + x_row[:, None] + first[None, :] * stride_xd
    xs_ptr = X + x_row[:, None] + second[None, :] * stride_xd
    d = 2 * half_d
    e = EMB + e_row[:, None]
    sin_f = tl.load(e + first[None, :] * stride_ed, mask=mask, other=0.0).to(tl.float32)
    sin_s = tl.load(e + second[None, :] * stride_ed, mask=mask, other=0.0).to(tl.float32)
    cos_f = tl.load(e + (d + first[None, :]) * stride_ed, mask=mask, other=0.0).to(tl.float32)
    cos_s = tl.load(e + (d + second[None, :]) * stride_ed, mask=mask, other=0.0).to(tl.float32)
    xf = tl.load(xf_ptr, mask=mask, other=0.0).to(tl.float32)
    xs = tl.load(xs_ptr, mask=mask, other=0.0).to(tl.float32)
    return xf_ptr, xs_ptr, mask, xf, xs, sin_f, sin_s, cos_f, cos_s


@triton.jit
def _rope_fwd(X, EMB, n_rows, H, n, half_d,
              stride_xb, stride_xh, stride_xn, stride_xd,
              stride_eb, stride_eh, stride_en, stride_ed,
              HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Grid (cdiv(B*H*n, BLOCK_ROWS),). Rotates BLOCK_ROWS rows of X in place."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_HALF)
    xf_ptr, xs_ptr, mask, xf, xs, sin_f, sin_s, cos_f, cos_s = _rope_load(
        X, EMB, rows, cols, n_rows, H, n, half_d, stride_xb, stride_xh, stride_xn, stride_xd,
        stride_eb, stride_eh, stride_en, stride_ed, HALF)
    yf = xf * cos_f - xs * sin_f
    ys = xs * cos_s + xf * sin_s
    tl.store(xf_ptr, yf.to(X.dtype.element_ty), mask=mask)
    tl.store(xs_ptr, ys.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_bwd(DY, EMB, n_rows, H, n, half_d,
              stride_db, stride_dh, stride_dn, stride_dd,
              stride_eb, stride_eh, stride_en, stride_ed,
              HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Grid (cdiv(B*H*n, BLOCK_ROWS),). Overwrites BLOCK_ROWS rows of DY with dX (the inverse rotation)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_HALF)
    gf_ptr, gs_ptr, mask, gf, gs, sin_f, sin_s, cos_f, cos_s = _rope_load(
        DY, EMB, rows, cols, n_rows, H, n, half_d, stride_db, stride_dh, stride_dn, stride_dd,
        stride_eb, stride_eh, stride_en, stride_ed, HALF)
    df = gf * cos_f + gs * sin_s
    ds = gs * cos_s - gf * sin_f
    tl.store(gf_ptr, df.to(DY.dtype.element_ty), mask=mask)
    tl.store(gs_ptr, ds.to(DY.dtype.element_ty), mask=mask)
