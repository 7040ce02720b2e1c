# Prompt-aware flash attention (docs/design.md §2.1, §2.4): softmax(q [pk; k]^T * scale + [0, bias]) [pv; v].
#
# A query row of batch b attends to two key segments in one online-softmax pass: the prompt segment
# pk/pv of prompt set pb, then the sample's own keys k/v, where the optional bias (Swin rel-pos /
# shift mask, batch b % nB) is added. Prompt pairs get zero bias. fp32 accumulation, exp2 domain; LSE
# is stored as natural log, float32. The prompt set is pb = b // group (group = B // Bp; Bp = 1 is
# deep VPT's batch-shared segment) or, with HAS_INDEX, pb = prompt_index[b] loaded in the kernel
# (several tasks' sets stacked in one (S, H, P, d) table; no per-sample copies).
#
# Backward (FlashAttention-2), three launches: `_attention_bwd_dq` (one program per query block)
# computes delta = rowsum(dO * O) and dQ, recomputing P; `_attention_bwd` (one program per key block)
# accumulates dK, dV over all query rows that read the block -- for own keys the sample's own
# queries, for prompt keys the queries of every sample reading the set (the batches of its group, or
# with an index order[offsets[s]:offsets[s + 1]], the samples sorted by set), split strided over SPLIT
# programs writing fp32 partials that `_attention_bwd_reduce` sums in split order (exact,
# deterministic, no atomics). dQ/dK/dV are written through their strides, so they can be views of
# one (B, N, 3, H, d) buffer laid out as the qkv projection's output.
#
# Tuned shape, ViT-B/16 deep VPT: B=128, H=12, Nq=Nk=197, P=50 (Bp=1), d=64, bf16.
#   forward : 4*B*H*Nq*(P+Nk)*d = 19.1 GFLOP; bytes: q, k, v, out = 4 x 38.7 MB + lse 1.2 MB = 156 MB
#             -> 123 FLOP/byte: near the H100 ridge (~260 FLOP/byte dense bf16), i.e. bound by both
#             exp/softmax throughput and HBM; padding 197 -> 256 rows costs up to 30% of the MMA work.
#   backward: 2.5x forward by convention = 47.8 GFLOP (this kernel does 3.5x = 67 GFLOP: dQ recomputes
#             S and dP); bytes: reads q, k, v, dO twice and O once, writes dq, dk, dv = ~470 MB.
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _split_program_id(n_rows, BLOCK: tl.constexpr):
    """(row block, batch * head) of this program. Both live on grid axis 0 (row blocks fastest, so
    the programs sharing one (batch, head) run together): axes 1 and 2 stop at 65,535 blocks, which
    batch * heads passes (Swin-B at batch 512: 32,768 windows x 4 heads), axis 0 at 2**31 - 1."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_rows, BLOCK)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _prompt_set(b, PROMPT_INDEX, prompt_group, HAS_INDEX: tl.constexpr):
    """The prompt set query batch b reads: PROMPT_INDEX[b] (int64), or b // prompt_group."""
    if HAS_INDEX:
        pb = tl.load(PROMPT_INDEX + b)
    else:
        pb = b // prompt_group
    return pb


@triton.jit
def _scores(q, k_base, stride_kn, bias_base, stride_bias_m, stride_bias_n, offs_m, offs_n, offs_d,
            n_mask, d_mask, n_queries, qk_scale, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(S in log2 units, K^T) of one query block against one key block: q K^T * scale (+ bias)."""
    kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                 mask=n_mask[None, :] & d_mask[:, None], other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        b = tl.load(bias_base + offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n,
                    mask=(offs_m[:, None] < n_queries) & n_mask[None, :], other=0.0)
        s += b.to(tl.float32) * LOG2E
    return s, kt


@triton.jit
def _attn_fwd_segment(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                      bias_base, stride_bias_m, stride_bias_n, offs_m, offs_d, n_keys, n_queries,
                      qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over one key segment of `n_keys` rows (scores in log2 units)."""
    d_mask = offs_d < HEAD_DIM
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        s, kt = _scores(q, k_base, stride_kn, bias_base, stride_bias_m, stride_bias_n, offs_m, offs_n,
                        offs_d, n_mask, d_mask, n_queries, qk_scale, HAS_BIAS, DOT_PRECISION)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_fwd(Q, K, V, PK, PV, BIAS, OUT, LSE, PROMPT_INDEX,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_pkb, stride_pkh, stride_pkn,
                   stride_pvb, stride_pvh, stride_pvn,
                   stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
                   stride_ob, stride_oh, stride_om,
                   stride_lb, stride_lh,
                   num_heads, n_queries, n_keys, n_prompts, prompt_group, n_bias, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M) * B * H,), query blocks fastest (see `_split_program_id`).
    qk_scale = scale * log2(e)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    pid_m, pid_bh = _split_program_id(n_queries, BLOCK_M)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_queries
    d_mask = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Segment 1: prompt keys (zero bias).
    pb = _prompt_set(b, PROMPT_INDEX, prompt_group, HAS_INDEX)
    acc, m_i, l_i = _attn_fwd_segment(
        acc, m_i, l_i, q, PK + pb * stride_pkb + h * stride_pkh, PV + pb * stride_pvb + h * stride_pvh,
        stride_pkn, stride_pvn, BIAS, 0, 0, offs_m, offs_d, n_prompts, n_queries, qk_scale,
        HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    # Segment 2: the sample's own keys, with bias[b % nB].
    bias_base = BIAS + (b % n_bias) * stride_bias_b + h * stride_bias_h
    acc, m_i, l_i = _attn_fwd_segment(
        acc, m_i, l_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n, offs_m, offs_d, n_keys,
        n_queries, qk_scale, HEAD_DIM, BLOCK_N, HAS_BIAS, DOT_PRECISION)

    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(OUT.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_bwd_dkdv_queries(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base,
                           stride_qm, stride_dom, stride_bias_m, stride_bias_n,
                           offs_n, offs_d, n_queries, n_keys, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key block over all query rows of one (batch, head)."""
    d_mask = offs_d < HEAD_DIM
    for start_m in range(0, n_queries, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_queries
        qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
                     mask=m_mask[None, :] & d_mask[:, None], other=0.0)
        # Rows past Nq get lse = +inf, so their P^T column is exactly zero.
        lse = tl.load(lse_base + offs_m, mask=m_mask, other=float("inf")) * LOG2E
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bt = tl.load(bias_base + offs_m[None, :] * stride_bias_m + offs_n[:, None] * stride_bias_n,
                         mask=m_mask[None, :] & (offs_n[:, None] < n_keys), other=0.0)
            st += bt.to(tl.float32) * LOG2E
        pt = tl.exp2(st - lse[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :],
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd(Q, K, V, DOUT, LSE, DELTA, BIAS, DK, DV, ORDER, OFFSETS,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   stride_lb, stride_lh,
                   stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
                   stride_dks, stride_dkb, stride_dkh, stride_dkn,
                   stride_dvs, stride_dvb, stride_dvh, stride_dvn,
                   num_heads, n_queries, n_keys, n_bias, group, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """dK, dV of one key block. Grid (cdiv(n_keys, BLOCK_N) * KB * H, SPLIT), key blocks fastest.

    K/V are a key segment with KB batches (sets); the readers of key batch kb are the query batches
    kb * group + j, j < group, or with HAS_INDEX order[offsets[kb] + j], j < offsets[kb + 1] -
    offsets[kb] (order: the query batches sorted by the set they read). Split s takes readers
    j = s, s + SPLIT, ... in that order and writes its sum to DK[s], DV[s] (the launcher sums over s);
    a key batch nobody reads gets zeros. Own keys: KB = B, group = 1, SPLIT = 1.
    """
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_n, pid_bh = _split_program_id(n_keys, BLOCK_N)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    kb = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < n_keys) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + kb * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + kb * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if HAS_INDEX:
        first = tl.load(OFFSETS + kb)
        n_readers = tl.load(OFFSETS + kb + 1) - first
    else:
        first = kb * group
        n_readers = group
    for j in range(pid_s, n_readers, n_split):
        if HAS_INDEX:
            b = tl.load(ORDER + first + j)
        else:
            b = first + j
        bias_base = BIAS + (b % n_bias) * stride_bias_b + h * stride_bias_h
        dk, dv = _attn_bwd_dkdv_queries(
            dk, dv, k, v, Q + b * stride_qb + h * stride_qh, DOUT + b * stride_dob + h * stride_doh,
            LSE + b * stride_lb + h * stride_lh, DELTA + b * stride_lb + h * stride_lh, bias_base,
            stride_qm, stride_dom, stride_bias_m, stride_bias_n, offs_n, offs_d, n_queries, n_keys,
            qk_scale, HEAD_DIM, BLOCK_M, HAS_BIAS, DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + pid_s * stride_dks + kb * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + pid_s * stride_dvs + kb * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_segment(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                         bias_base, stride_bias_m, stride_bias_n, offs_m, offs_d, n_keys, n_queries,
                         qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dS @ K (unscaled) of one query block over one key segment."""
    d_mask = offs_d < HEAD_DIM
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_keys
        s, kt = _scores(q, k_base, stride_kn, bias_base, stride_bias_m, stride_bias_n, offs_m, offs_n,
                        offs_d, n_mask, d_mask, n_queries, qk_scale, HAS_BIAS, DOT_PRECISION)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None],
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq(Q, K, V, PK, PV, OUT, DOUT, LSE, DELTA, BIAS, DQ, PROMPT_INDEX,
                      stride_qb, stride_qh, stride_qm,
                      stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_pkb, stride_pkh, stride_pkn,
                      stride_pvb, stride_pvh, stride_pvn,
                      stride_ob, stride_oh, stride_om,
                      stride_dob, stride_doh, stride_dom,
                      stride_lb, stride_lh,
                      stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
                      stride_dqb, stride_dqh, stride_dqm,
                      num_heads, n_queries, n_keys, n_prompts, prompt_group, n_bias, scale, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """dQ of one query block over both key segments; also computes and stores delta = rowsum(dO * O)
    (fp32) for `_attention_bwd`, which runs after it. Grid (cdiv(Nq, BLOCK_M) * B * H,), query
    blocks fastest (see `_split_program_id`)."""
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_m, pid_bh = _split_program_id(n_queries, BLOCK_M)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_queries
    md_mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=md_mask, other=0.0)
    do = tl.load(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=md_mask, other=0.0)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m, mask=m_mask, other=0.0) * LOG2E
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=md_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + offs_m, delta, mask=m_mask)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    pb = _prompt_set(b, PROMPT_INDEX, prompt_group, HAS_INDEX)
    dq = _attn_bwd_dq_segment(
        dq, q, do, lse, delta, PK + pb * stride_pkb + h * stride_pkh, PV + pb * stride_pvb + h * stride_pvh,
        stride_pkn, stride_pvn, BIAS, 0, 0, offs_m, offs_d, n_prompts, n_queries, qk_scale,
        HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    bias_base = BIAS + (b % n_bias) * stride_bias_b + h * stride_bias_h
    dq = _attn_bwd_dq_segment(
        dq, q, do, lse, delta, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n, offs_m, offs_d, n_keys,
        n_queries, qk_scale, HEAD_DIM, BLOCK_N, HAS_BIAS, DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _attention_bwd_reduce(WK, WV, DK, DV, n_split, n_elements, BLOCK_SIZE: tl.constexpr):
    """DK = sum_s WK[s], DV = sum_s WV[s] (fp32 partials of the prompt grads, contiguous (n_split, n));
    stored in DK's dtype. Grid (cdiv(n_elements, BLOCK_SIZE),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    acc_k = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for i in range(0, n_split):
        acc_k += tl.load(WK + i * n_elements + offs, mask=mask, other=0.0)
        acc_v += tl.load(WV + i * n_elements + offs, mask=mask, other=0.0)
    tl.store(DK + offs, acc_k.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, acc_v.to(DV.dtype.element_ty), mask=mask)
