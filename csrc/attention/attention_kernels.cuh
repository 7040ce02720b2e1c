// Prompt-aware FlashAttention kernels on tensor cores (WMMA 16x16x16, bf16/fp16 in, fp32 accumulate;
// sm_80+). See attention.h for the semantics; the joint key sequence is [prompt keys; own keys]; in
// the forward and dQ kernels a key tile may straddle the two segments (each row picks its source
// when the tile is loaded).
//
// Work per forward CTA: a 64-row query tile of one (batch, head); 4 warps x 16 query rows. Each
// K/V tile is loaded once into shared memory and shared by the 4 warps. S = QK^T goes through
// shared memory (fp32) for the online softmax; P is written back (bf16/fp16) over S, the O
// accumulator lives in shared memory (fp32) and is rescaled per row.
// Backward: dQ kernel (per query tile, loops over key tiles, dQ in WMMA accumulators) and dK/dV
// kernels (per 64-key tile, loops over query tiles, dK/dV in WMMA accumulators): one over own keys,
// one over prompt keys, whose CTAs each sum one split of the query batches reading a prompt set
// (batches dealt round-robin, in the set's fixed order) into an fp32 partial; a reduce kernel adds
// the splits in a fixed order (deterministic, no atomics; ViT-B on an H100, B=128, P=50, one set:
// 44 splits of about 3 batches, 2 x 6.8 MB of partials). The prompt set of a query batch is read
// through the prompt-set index inside the kernels (no gathered per-batch copy of the prompt K/V).
//
// Cost (ViT-B/16 deep VPT, B=8, H=12, Nq=197, P=50, d=64): forward 4*B*H*Nq*(P+Nk)*d = 3.0 GFLOP,
// about 10 MB moved (q, k, v, out in bf16, prompt K/V once): compute-bound on tensor cores at this
// shape only for large batches; backward 2.5x the FLOPs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "attention_params.h"

namespace vpt_fast {
namespace kern {

using namespace nvcuda;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBwdRows = 64;  // query rows of a dQ CTA, key rows of a dK/dV CTA

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Prompt set read by query batch b: prompt_index[b], or b / G without an index.
__device__ __forceinline__ int64_t prompt_set(const AttnParams& p, int b) {
  return p.prompt_index != nullptr ? p.prompt_index[b] : (int64_t)(b / p.G);
}

// The query batches that read prompt set s, in the fixed order of AttnParams::set_order.
struct SetSamples {
  const int64_t* order;  // nullptr: batches begin, begin + 1, ... (no index)
  int64_t begin;
  int count;
  __device__ __forceinline__ int operator[](int pos) const {
    return order != nullptr ? (int)order[begin + pos] : (int)(begin + pos);
  }
};

__device__ __forceinline__ SetSamples set_samples(const AttnParams& p, int s) {
  if (p.set_order != nullptr)
    return {p.set_order, p.set_offsets[s], (int)(p.set_offsets[s + 1] - p.set_offsets[s])};
  return {nullptr, (int64_t)s * p.G, p.G};
}

// Base pointers of one (batch, head): own rows and the prompt rows of its prompt set.
template <typename T>
struct JointRows {
  const T* own;
  const T* prompt;
  int64_t own_rs, prompt_rs;
  int P, n;  // prompt rows, joint rows (P + Nk)
  __device__ __forceinline__ const T* row(int j) const {
    if (j >= n) return nullptr;
    return j < P ? prompt + (int64_t)j * prompt_rs : own + (int64_t)(j - P) * own_rs;
  }
};

template <typename T>
__device__ __forceinline__ JointRows<T> joint_rows(const void* own, int64_t bs, int64_t hs, int64_t rs,
                                                   const void* prompt, int64_t pbs, int64_t phs,
                                                   int64_t prs, const AttnParams& p, int b, int h) {
  JointRows<T> r;
  r.own = static_cast<const T*>(own) + (int64_t)b * bs + (int64_t)h * hs;
  r.prompt = p.P > 0 ? static_cast<const T*>(prompt) + prompt_set(p, b) * pbs + (int64_t)h * phs
                     : nullptr;
  r.own_rs = rs;
  r.prompt_rs = prs;
  r.P = p.P;
  r.n = p.P + p.Nk;
  return r;
}

// Copies `rows` rows of D elements into shared memory (pitch LD elements); row r comes from src(r),
// zeros where src(r) is nullptr. 16-byte vector loads when `vec` (alignment checked on the host).
template <typename T, int D, int LD, typename Src>
__device__ __forceinline__ void load_tile(T* s, int rows, bool vec, Src src) {
  static_assert(D % 8 == 0 && (LD * sizeof(T)) % 16 == 0, "tile rows must be 16-byte multiples");
  constexpr int CH = D * sizeof(T) / 16;  // 16-byte chunks per row
  constexpr int E = 16 / sizeof(T);
  for (int c = threadIdx.x; c < rows * CH; c += kThreads) {
    const int r = c / CH, col = (c % CH) * E;
    const T* g = src(r);
    T* dst = s + r * LD + col;
    if (g == nullptr) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    } else if (vec) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(g + col));
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) dst[e] = g[col + e];
    }
  }
}

// Writes n (multiple of 8) floats as T to global memory (16-byte aligned destination).
template <typename T>
__device__ __forceinline__ void store_row(T* g, const float* s, int n, float mul) {
  for (int c = 0; c < n; c += 8) {
    union {
      uint4 u;
      T t[8];
    } pack;
#pragma unroll
    for (int e = 0; e < 8; ++e) pack.t[e] = from_f<T>(s[c + e] * mul);
    *reinterpret_cast<uint4*>(g + c) = pack.u;
  }
}

// Copies n (multiple of 4) floats to global memory (both 16-byte aligned) with 16-byte stores.
__device__ __forceinline__ void store_row_f32(float* g, const float* s, int n) {
  for (int c = 0; c < n; c += 4) *reinterpret_cast<float4*>(g + c) = *reinterpret_cast<const float4*>(s + c);
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // B = X^T
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// out (16 x 16*NT, fp32, pitch LDO) = A (16 x D, pitch LDA) * X^T, X (16*NT x D, pitch LDX).
template <typename T, int D, int NT, int LDA, int LDX, int LDO>
__device__ __forceinline__ void gemm_abt(const T* a, const T* x, float* out) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    FragC acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      FragA<T> fa;
      FragBt<T> fb;
      wmma::load_matrix_sync(fa, a + kk * 16, LDA);
      wmma::load_matrix_sync(fb, x + nt * 16 * LDX + kk * 16, LDX);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + nt * 16, acc, LDO, wmma::mem_row_major);
  }
}

// acc[dt] += A (16 x K, pitch LDA) * Y (K x D, pitch LDY), dt over D/16 column tiles.
template <typename T, int D, int K, int LDA, int LDY>
__device__ __forceinline__ void gemm_ab_acc(const T* a, const T* y, FragC (&acc)[D / 16]) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    FragA<T> fa;
    wmma::load_matrix_sync(fa, a + kk * 16, LDA);
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      FragB<T> fb;
      wmma::load_matrix_sync(fb, y + kk * 16 * LDY + dt * 16, LDY);
      wmma::mma_sync(acc[dt], fa, fb, acc[dt]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <typename T, int D>
struct FwdCfg {
  static constexpr int BM = 64;                // query rows per CTA (16 per warp)
  static constexpr int BN = D <= 64 ? 64 : 32;  // keys per tile
  static constexpr int LDT = D + 8;            // pitch of bf16/fp16 tiles (elements)
  static constexpr int LDS = BN + 4;           // pitch of the fp32 S tile; P (T) aliases it, pitch 2*LDS
  static constexpr int LDO = D + 4;            // pitch of the fp32 O accumulator
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + sizeof(T) * BM * LDT;
  static constexpr size_t v_off = k_off + sizeof(T) * BN * LDT;
  static constexpr size_t s_off = v_off + sizeof(T) * BN * LDT;
  static constexpr size_t o_off = s_off + sizeof(float) * BM * LDS;
  static constexpr size_t bytes = o_off + sizeof(float) * BM * LDO;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fwd_tc_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = FwdCfg<T, D>;
  constexpr int BM = C::BM, BN = C::BN, LDT = C::LDT, LDS = C::LDS, LDO = C::LDO, HC = BN / 2;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + C::q_off);
  T* Ks = reinterpret_cast<T*>(smem + C::k_off);
  T* Vs = reinterpret_cast<T*>(smem + C::v_off);
  float* Ss = reinterpret_cast<float*>(smem + C::s_off);
  float* Os = reinterpret_cast<float*>(smem + C::o_off);

  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + (lane >> 1), half = lane & 1;  // softmax: 2 lanes per row
  const int i = m0 + row;
  const int n_all = p.P + p.Nk;

  const T* qb = static_cast<const T*>(p.q) + (int64_t)b * p.q_bs + (int64_t)h * p.q_hs;
  const auto kr = joint_rows<T>(p.k, p.k_bs, p.k_hs, p.k_rs, p.pk, p.pk_bs, p.pk_hs, p.pk_rs, p, b, h);
  const auto vr = joint_rows<T>(p.v, p.v_bs, p.v_hs, p.v_rs, p.pv, p.pv_bs, p.pv_hs, p.pv_rs, p, b, h);
  const float* brow = (p.bias != nullptr && i < p.Nq)
                          ? p.bias + (((int64_t)(b % p.nB) * p.H + h) * p.Nq + i) * p.Nk
                          : nullptr;

  load_tile<T, D, LDT>(Qs, BM, p.vec, [&](int r) {
    return m0 + r < p.Nq ? qb + (int64_t)(m0 + r) * p.q_rs : nullptr;
  });
  for (int x = threadIdx.x; x < BM * LDO; x += kThreads) Os[x] = 0.f;

  const float sl2 = p.scale * kLog2e;
  float m_i = -INFINITY, l_i = 0.f;
  float* s_w = Ss + warp * 16 * LDS;
  const T* p_w = reinterpret_cast<const T*>(s_w);  // P over S, pitch 2 * LDS
  float* o_w = Os + warp * 16 * LDO;

  for (int n0 = 0; n0 < n_all; n0 += BN) {
    load_tile<T, D, LDT>(Ks, BN, p.vec, [&](int r) { return kr.row(n0 + r); });
    load_tile<T, D, LDT>(Vs, BN, p.vec, [&](int r) { return vr.row(n0 + r); });
    __syncthreads();

    gemm_abt<T, D, BN / 16, LDT, LDT, LDS>(Qs + warp * 16 * LDT, Ks, s_w);
    __syncwarp();

    // online softmax in the log2 domain; lanes 2r, 2r+1 own row r, columns half*HC .. +HC
    float s[HC];
    float mloc = -INFINITY;
    const float* srow = Ss + row * LDS + half * HC;
#pragma unroll
    for (int t = 0; t < HC; ++t) {
      const int j = n0 + half * HC + t;
      float x = srow[t] * sl2;
      if (j >= n_all) x = -INFINITY;
      else if (brow != nullptr && j >= p.P) x += brow[j - p.P] * kLog2e;
      s[t] = x;
      mloc = fmaxf(mloc, x);
    }
    mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
    const float m_new = fmaxf(m_i, mloc);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    float lsum = 0.f;
#pragma unroll
    for (int t = 0; t < HC; ++t) {
      s[t] = exp2f(s[t] - m_use);
      lsum += s[t];
    }
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    const float alpha = exp2f(m_i - m_use);
    l_i = l_i * alpha + lsum;
    m_i = m_new;
    __syncwarp();  // every lane has read its S values before P overwrites them
    T* prow = reinterpret_cast<T*>(Ss + row * LDS) + half * HC;
#pragma unroll
    for (int t = 0; t < HC; ++t) prow[t] = from_f<T>(s[t]);
    float* orow = Os + row * LDO + half * (D / 2);
#pragma unroll
    for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
    __syncwarp();

    // O_w += P_w V
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      FragC acc;
      wmma::load_matrix_sync(acc, o_w + dt * 16, LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        FragA<T> fa;
        FragB<T> fb;
        wmma::load_matrix_sync(fa, p_w + kk * 16, 2 * LDS);
        wmma::load_matrix_sync(fb, Vs + kk * 16 * LDT + dt * 16, LDT);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(o_w + dt * 16, acc, LDO, wmma::mem_row_major);
    }
    __syncthreads();  // K/V tiles are overwritten next; O rows are read below
  }

  if (i < p.Nq) {
    const float inv = l_i > 0.f ? 1.f / l_i : 0.f;
    T* og = static_cast<T*>(p.out) + (int64_t)b * p.o_bs + (int64_t)h * p.o_hs + (int64_t)i * p.o_rs +
            half * (D / 2);
    store_row<T>(og, Os + row * LDO + half * (D / 2), D / 2, inv);
    if (half == 0) p.lse[((int64_t)b * p.H + h) * p.Nq + i] = (m_i + log2f(l_i)) * kLn2;
  }
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------
// delta[b, h, i] = sum_c dout[b, h, i, c] * out[b, h, i, c] (one warp per row).
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_delta_kernel(const AttnParams p) {
  const int64_t r = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = (int64_t)p.B * p.H * p.Nq;
  if (r >= rows) return;
  const int i = (int)(r % p.Nq);
  const int64_t bh = r / p.Nq;
  const int b = (int)(bh / p.H), h = (int)(bh % p.H);
  const T* o = static_cast<const T*>(p.out) + (int64_t)b * p.o_bs + (int64_t)h * p.o_hs + (int64_t)i * p.o_rs;
  const T* g = static_cast<const T*>(p.dout) + (int64_t)b * p.do_bs + (int64_t)h * p.do_hs +
               (int64_t)i * p.do_rs;
  float acc = 0.f;
  for (int c = lane; c < p.d; c += 32) acc += to_f<T>(o[c]) * to_f<T>(g[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[r] = acc;
}

template <typename T, int D>
struct BwdCfg {
  static constexpr int BR = kBwdRows;          // rows owned by a CTA (16 per warp)
  static constexpr int BC = D <= 64 ? 64 : 32;  // rows of the tile iterated over
  static constexpr int LDT = D + 8;
  static constexpr int LDS = BC + 4;  // fp32 score tiles (BR x BC); T tiles alias them, pitch 2*LDS
  static constexpr int LDO = D + 4;   // fp32 staging of the results
  // dQ kernel: Qs, dOs (BR rows), Ks, Vs (BC rows), S, dP (fp32 BR x BC)
  // dK/dV kernel: Ks, Vs (BR rows), Qs, dOs (BC rows), S^T, dP^T (fp32 BR x BC), lse, delta (BC)
  static constexpr size_t a_off = 0;                                // BR-row tiles (2)
  static constexpr size_t c_off = a_off + 2 * sizeof(T) * BR * LDT;  // BC-row tiles (2)
  static constexpr size_t s_off = c_off + 2 * sizeof(T) * BC * LDT;
  static constexpr size_t dp_off = s_off + sizeof(float) * BR * LDS;
  static constexpr size_t vec_off = dp_off + sizeof(float) * BR * LDS;
  static constexpr size_t bytes = vec_off + 2 * sizeof(float) * BC;
  static_assert(sizeof(float) * BR * LDO <= 2 * sizeof(T) * BR * LDT, "staging must fit");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_tc_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = BwdCfg<T, D>;
  constexpr int BM = C::BR, BN = C::BC, LDT = C::LDT, LDS = C::LDS, LDO = C::LDO, HC = BN / 2;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + C::a_off);
  T* dOs = Qs + BM * LDT;
  T* Ks = reinterpret_cast<T*>(smem + C::c_off);
  T* Vs = Ks + BN * LDT;
  float* Ss = reinterpret_cast<float*>(smem + C::s_off);
  float* dPs = reinterpret_cast<float*>(smem + C::dp_off);

  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + (lane >> 1), half = lane & 1;
  const int i = m0 + row;
  const int n_all = p.P + p.Nk;

  const T* qb = static_cast<const T*>(p.q) + (int64_t)b * p.q_bs + (int64_t)h * p.q_hs;
  const T* dob = static_cast<const T*>(p.dout) + (int64_t)b * p.do_bs + (int64_t)h * p.do_hs;
  const auto kr = joint_rows<T>(p.k, p.k_bs, p.k_hs, p.k_rs, p.pk, p.pk_bs, p.pk_hs, p.pk_rs, p, b, h);
  const auto vr = joint_rows<T>(p.v, p.v_bs, p.v_hs, p.v_rs, p.pv, p.pv_bs, p.pv_hs, p.pv_rs, p, b, h);
  const float* brow = (p.bias != nullptr && i < p.Nq)
                          ? p.bias + (((int64_t)(b % p.nB) * p.H + h) * p.Nq + i) * p.Nk
                          : nullptr;
  const int64_t stat = ((int64_t)b * p.H + h) * p.Nq + i;
  const float lse2 = i < p.Nq ? p.lse[stat] * kLog2e : 0.f;
  const float dl = i < p.Nq ? p.delta[stat] : 0.f;

  load_tile<T, D, LDT>(Qs, BM, p.vec, [&](int r) {
    return m0 + r < p.Nq ? qb + (int64_t)(m0 + r) * p.q_rs : nullptr;
  });
  load_tile<T, D, LDT>(dOs, BM, p.vec, [&](int r) {
    return m0 + r < p.Nq ? dob + (int64_t)(m0 + r) * p.do_rs : nullptr;
  });

  FragC dq[D / 16];
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) wmma::fill_fragment(dq[dt], 0.f);
  const float sl2 = p.scale * kLog2e;
  float* s_w = Ss + warp * 16 * LDS;
  float* dp_w = dPs + warp * 16 * LDS;

  for (int n0 = 0; n0 < n_all; n0 += BN) {
    load_tile<T, D, LDT>(Ks, BN, p.vec, [&](int r) { return kr.row(n0 + r); });
    load_tile<T, D, LDT>(Vs, BN, p.vec, [&](int r) { return vr.row(n0 + r); });
    __syncthreads();

    gemm_abt<T, D, BN / 16, LDT, LDT, LDS>(Qs + warp * 16 * LDT, Ks, s_w);
    gemm_abt<T, D, BN / 16, LDT, LDT, LDS>(dOs + warp * 16 * LDT, Vs, dp_w);
    __syncwarp();

    float ds[HC];
    const float* srow = Ss + row * LDS + half * HC;
    const float* dprow = dPs + row * LDS + half * HC;
#pragma unroll
    for (int t = 0; t < HC; ++t) {
      const int j = n0 + half * HC + t;
      float x = srow[t] * sl2;
      if (brow != nullptr && j >= p.P && j < n_all) x += brow[j - p.P] * kLog2e;
      const float pr = (j < n_all && i < p.Nq) ? exp2f(x - lse2) : 0.f;
      ds[t] = pr * (dprow[t] - dl) * p.scale;
    }
    __syncwarp();
    T* dsrow = reinterpret_cast<T*>(Ss + row * LDS) + half * HC;
#pragma unroll
    for (int t = 0; t < HC; ++t) dsrow[t] = from_f<T>(ds[t]);
    __syncwarp();

    gemm_ab_acc<T, D, BN, 2 * LDS, LDT>(reinterpret_cast<const T*>(s_w), Ks, dq);
    __syncthreads();
  }

  float* stage = reinterpret_cast<float*>(smem);  // over Qs/dOs, no longer read
  float* st_w = stage + warp * 16 * LDO;
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) wmma::store_matrix_sync(st_w + dt * 16, dq[dt], LDO, wmma::mem_row_major);
  __syncwarp();
  if (i < p.Nq) {
    T* g = static_cast<T*>(p.dq) + (int64_t)b * p.dq_bs + (int64_t)h * p.dq_hs + (int64_t)i * p.dq_rs +
           half * (D / 2);
    store_row<T>(g, stage + row * LDO + half * (D / 2), D / 2, 1.f);
  }
#else
  __trap();
#endif
}

// dK/dV of one 64-row key tile of one head; loops over all query tiles of its query batches.
// kPrompt == false: own keys of batch b (blockIdx.x = b * H + h), written in T to dk/dv.
// kPrompt == true: prompt keys of prompt set s, summed over the query batches of split j
// (blockIdx.x = (s * prompt_split + j) * H + h: the set's batches at positions j, j + prompt_split,
// ... of its fixed order), written as an fp32 partial to dpk_part/dpv_part[s * prompt_split + j];
// bwd_prompt_reduce_kernel adds the splits. The prompt K/V tile is loaded once per split; no
// atomics, so the result is bitwise reproducible. A split with no batches writes zeros.
template <typename T, int D, bool kPrompt>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_tc_kernel(const AttnParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = BwdCfg<T, D>;
  constexpr int BN = C::BR, BM = C::BC, LDT = C::LDT, LDS = C::LDS, LDO = C::LDO, HC = BM / 2;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + C::a_off);
  T* Vs = Ks + BN * LDT;
  T* Qs = reinterpret_cast<T*>(smem + C::c_off);
  T* dOs = Qs + BM * LDT;
  float* St = reinterpret_cast<float*>(smem + C::s_off);
  float* dPt = reinterpret_cast<float*>(smem + C::dp_off);
  float* lse_s = reinterpret_cast<float*>(smem + C::vec_off);
  float* dl_s = lse_s + BM;

  const int h = blockIdx.x % p.H;
  const int unit = blockIdx.x / p.H;  // own keys: the batch b; prompt keys: s * prompt_split + j
  const int n0 = blockIdx.y * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + (lane >> 1), half = lane & 1;
  const int j = n0 + row;  // this lane pair's key row within its segment
  const int n_keys = kPrompt ? p.P : p.Nk;

  // batches: own keys, the one batch `unit`; prompt keys, positions first, first + step, ... < count
  // of the set's batches
  SetSamples samples{nullptr, unit, 1};
  int first = 0, step = 1;
  const T* kb;
  const T* vb;
  int64_t k_rs, v_rs;
  if constexpr (kPrompt) {
    const int s = unit / p.prompt_split;
    samples = set_samples(p, s);
    first = unit % p.prompt_split;
    step = p.prompt_split;
    kb = static_cast<const T*>(p.pk) + (int64_t)s * p.pk_bs + (int64_t)h * p.pk_hs;
    vb = static_cast<const T*>(p.pv) + (int64_t)s * p.pv_bs + (int64_t)h * p.pv_hs;
    k_rs = p.pk_rs;
    v_rs = p.pv_rs;
  } else {
    kb = static_cast<const T*>(p.k) + (int64_t)unit * p.k_bs + (int64_t)h * p.k_hs;
    vb = static_cast<const T*>(p.v) + (int64_t)unit * p.v_bs + (int64_t)h * p.v_hs;
    k_rs = p.k_rs;
    v_rs = p.v_rs;
  }

  load_tile<T, D, LDT>(Ks, BN, p.vec, [&](int r) {
    return n0 + r < n_keys ? kb + (int64_t)(n0 + r) * k_rs : nullptr;
  });
  load_tile<T, D, LDT>(Vs, BN, p.vec, [&](int r) {
    return n0 + r < n_keys ? vb + (int64_t)(n0 + r) * v_rs : nullptr;
  });

  FragC dk[D / 16], dv[D / 16];
#pragma unroll
  for (int dt = 0; dt < D / 16; ++dt) {
    wmma::fill_fragment(dk[dt], 0.f);
    wmma::fill_fragment(dv[dt], 0.f);
  }
  const float sl2 = p.scale * kLog2e;
  float* st_w = St + warp * 16 * LDS;
  float* dpt_w = dPt + warp * 16 * LDS;

  for (int pos = first; pos < samples.count; pos += step) {
    const int b = samples[pos];
    const T* qb = static_cast<const T*>(p.q) + (int64_t)b * p.q_bs + (int64_t)h * p.q_hs;
    const T* dob = static_cast<const T*>(p.dout) + (int64_t)b * p.do_bs + (int64_t)h * p.do_hs;
    // bias column of own key j (stride Nk over queries); prompt keys have none
    const float* bcol = (!kPrompt && p.bias != nullptr && j < n_keys)
                            ? p.bias + ((int64_t)(b % p.nB) * p.H + h) * p.Nq * p.Nk + j
                            : nullptr;
    const int64_t stat0 = ((int64_t)b * p.H + h) * p.Nq;

    for (int m0 = 0; m0 < p.Nq; m0 += BM) {
      load_tile<T, D, LDT>(Qs, BM, p.vec, [&](int r) {
        return m0 + r < p.Nq ? qb + (int64_t)(m0 + r) * p.q_rs : nullptr;
      });
      load_tile<T, D, LDT>(dOs, BM, p.vec, [&](int r) {
        return m0 + r < p.Nq ? dob + (int64_t)(m0 + r) * p.do_rs : nullptr;
      });
      for (int r = threadIdx.x; r < BM; r += kThreads) {
        const bool ok = m0 + r < p.Nq;
        lse_s[r] = ok ? p.lse[stat0 + m0 + r] * kLog2e : 0.f;
        dl_s[r] = ok ? p.delta[stat0 + m0 + r] : 0.f;
      }
      __syncthreads();

      gemm_abt<T, D, BM / 16, LDT, LDT, LDS>(Ks + warp * 16 * LDT, Qs, st_w);   // S^T
      gemm_abt<T, D, BM / 16, LDT, LDT, LDS>(Vs + warp * 16 * LDT, dOs, dpt_w);  // dP^T
      __syncwarp();

      float pr[HC], ds[HC];
      const float* srow = St + row * LDS + half * HC;
      const float* dprow = dPt + row * LDS + half * HC;
#pragma unroll
      for (int t = 0; t < HC; ++t) {
        const int c = half * HC + t, i = m0 + c;
        float x = srow[t] * sl2;
        if (bcol != nullptr && i < p.Nq) x += bcol[(int64_t)i * p.Nk] * kLog2e;
        pr[t] = (i < p.Nq && j < n_keys) ? exp2f(x - lse_s[c]) : 0.f;
        ds[t] = pr[t] * (dprow[t] - dl_s[c]) * p.scale;
      }
      __syncwarp();
      T* prow = reinterpret_cast<T*>(St + row * LDS) + half * HC;
      T* dsrow = reinterpret_cast<T*>(dPt + row * LDS) + half * HC;
#pragma unroll
      for (int t = 0; t < HC; ++t) {
        prow[t] = from_f<T>(pr[t]);
        dsrow[t] = from_f<T>(ds[t]);
      }
      __syncwarp();

      gemm_ab_acc<T, D, BM, 2 * LDS, LDT>(reinterpret_cast<const T*>(st_w), dOs, dv);   // P^T dO
      gemm_ab_acc<T, D, BM, 2 * LDS, LDT>(reinterpret_cast<const T*>(dpt_w), Qs, dk);   // dS^T Q
      __syncthreads();
    }
  }
  __syncthreads();  // Ks/Vs are reused as staging below

  // epilogue: stage through shared memory (over Ks/Vs); own keys stored in T, prompt keys as the
  // chunk's fp32 partial
  float* stage = reinterpret_cast<float*>(smem);
  float* sw = stage + warp * 16 * LDO;
  const float* srow = stage + row * LDO + half * (D / 2);
  auto write = [&](FragC(&acc)[D / 16], float* part, void* dst, int64_t bs, int64_t hs, int64_t rs) {
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) wmma::store_matrix_sync(sw + dt * 16, acc[dt], LDO, wmma::mem_row_major);
    __syncwarp();
    if (j < n_keys) {
      if constexpr (kPrompt) {
        store_row_f32(part + (((int64_t)unit * p.H + h) * p.P + j) * D + half * (D / 2), srow, D / 2);
      } else {
        T* g = static_cast<T*>(dst) + (int64_t)unit * bs + (int64_t)h * hs + (int64_t)j * rs;
        store_row<T>(g + half * (D / 2), srow, D / 2, 1.f);
      }
    }
    __syncwarp();
  };
  write(dk, p.dpk_part, p.dk, p.dk_bs, p.dk_hs, p.dk_rs);
  write(dv, p.dpv_part, p.dv, p.dv_bs, p.dv_hs, p.dv_rs);
#else
  __trap();
#endif
}

// dpk[s, h, i, c] = sum over j < prompt_split of dpk_part[s * prompt_split + j, h, i, c], added
// in increasing j (a fixed order: bitwise reproducible) and rounded once to T; likewise dpv.
// One thread per output element; consecutive threads read consecutive floats of every partial.
template <typename T>
__global__ void __launch_bounds__(256) bwd_prompt_reduce_kernel(const AttnParams p) {
  const int64_t unit_numel = (int64_t)p.H * p.P * p.d;
  const int64_t n = (int64_t)p.S * unit_numel;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int c = (int)(idx % p.d);
  int64_t r = idx / p.d;
  const int i = (int)(r % p.P);
  r /= p.P;
  const int h = (int)(r % p.H);
  const int64_t s = r / p.H;
  const int64_t src = s * p.prompt_split * unit_numel + ((int64_t)h * p.P + i) * p.d + c;
  float acc_k = 0.f, acc_v = 0.f;
#pragma unroll 4
  for (int j = 0; j < p.prompt_split; ++j) {
    acc_k += p.dpk_part[src + j * unit_numel];
    acc_v += p.dpv_part[src + j * unit_numel];
  }
  static_cast<T*>(p.dpk)[s * p.dpk_bs + (int64_t)h * p.dpk_hs + (int64_t)i * p.dpk_rs + c] = from_f<T>(acc_k);
  static_cast<T*>(p.dpv)[s * p.dpv_bs + (int64_t)h * p.dpv_hs + (int64_t)i * p.dpv_rs + c] = from_f<T>(acc_v);
}

}  // namespace kern
}  // namespace vpt_fast
