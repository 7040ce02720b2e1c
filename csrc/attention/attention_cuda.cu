// Host side of the CUDA prompt-aware attention: fills AttnParams from checked tensors (bindings.cpp),
// allocates outputs, and runs the tensor-core kernels (bf16/fp16, attention_{fwd,bwd}.cu) or the
// float32 kernels below.
//
// The float32 path is simple and exact rather than fast (fp32 accumulate, no tensor cores): one warp
// per query row (forward, dQ) or per joint key row (dK/dV); each lane scores one key (query) of a
// 32-wide chunk, then the chunk's probabilities are broadcast with shuffles to accumulate d-wide rows
// (lane c holds columns c, c+32, ...). Prompt-key rows of dK/dV are summed per split of the query
// batches reading a prompt set into fp32 partials that the reduce kernel adds in a fixed order, as
// for bf16/fp16.
//
// Prompt-key gradients are deterministic on every path: no atomics; the query batches reading a
// prompt set, sorted by set (stable sort of the prompt-set index, on the device: no host sync), are
// dealt round-robin to prompt_split splits; each split writes its own fp32 partial and
// bwd_prompt_reduce_kernel sums the splits in increasing order. The split count depends only on the
// shapes and the device's SM count.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention.h"
#include "attention_kernels.cuh"

namespace vpt_fast {
namespace {

constexpr int kMaxD = 128;
constexpr int kCols = kMaxD / 32;  // columns per lane

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float dot_row(const float* a, const float* b, int d) {
  float s = 0.f;
  for (int c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

__global__ void __launch_bounds__(kern::kThreads) fwd_f32_kernel(const AttnParams p) {
  __shared__ float qs[kern::kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int i = blockIdx.y * kern::kWarps + warp;
  if (i >= p.Nq) return;  // no block-wide barriers below
  const int d = p.d, n_all = p.P + p.Nk;
  const float sl2 = p.scale * kern::kLog2e;
  const float* qrow = static_cast<const float*>(p.q) + (int64_t)b * p.q_bs + (int64_t)h * p.q_hs +
                      (int64_t)i * p.q_rs;
  for (int c = lane; c < d; c += 32) qs[warp][c] = qrow[c] * sl2;
  __syncwarp();
  const auto kr = kern::joint_rows<float>(p.k, p.k_bs, p.k_hs, p.k_rs, p.pk, p.pk_bs, p.pk_hs, p.pk_rs, p, b, h);
  const auto vr = kern::joint_rows<float>(p.v, p.v_bs, p.v_hs, p.v_rs, p.pv, p.pv_bs, p.pv_hs, p.pv_rs, p, b, h);
  const float* brow = p.bias ? p.bias + (((int64_t)(b % p.nB) * p.H + h) * p.Nq + i) * p.Nk : nullptr;

  float m = -INFINITY, l = 0.f, o[kCols] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < n_all; j0 += 32) {
    const int j = j0 + lane;
    float s = -INFINITY;
    if (j < n_all) {
      s = dot_row(qs[warp], kr.row(j), d);
      if (brow != nullptr && j >= p.P) s += brow[j - p.P] * kern::kLog2e;
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float pj = j < n_all ? exp2f(s - m_use) : 0.f;
    const float alpha = exp2f(m - m_use);
    l = l * alpha + warp_sum(pj);
    m = m_new;
#pragma unroll
    for (int t = 0; t < kCols; ++t) o[t] *= alpha;
    const int nj = min(32, n_all - j0);
    for (int jj = 0; jj < nj; ++jj) {
      const float pp = __shfl_sync(0xffffffffu, pj, jj);
      const float* v = vr.row(j0 + jj);
#pragma unroll
      for (int t = 0; t < kCols; ++t)
        if (lane + 32 * t < d) o[t] += pp * v[lane + 32 * t];
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  float* orow = static_cast<float*>(p.out) + (int64_t)b * p.o_bs + (int64_t)h * p.o_hs + (int64_t)i * p.o_rs;
#pragma unroll
  for (int t = 0; t < kCols; ++t)
    if (lane + 32 * t < d) orow[lane + 32 * t] = o[t] * inv;
  if (lane == 0) p.lse[((int64_t)b * p.H + h) * p.Nq + i] = (m + log2f(l)) * kern::kLn2;
}

__global__ void __launch_bounds__(kern::kThreads) bwd_dq_f32_kernel(const AttnParams p) {
  __shared__ float qs[kern::kWarps][kMaxD], dos[kern::kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int i = blockIdx.y * kern::kWarps + warp;
  if (i >= p.Nq) return;
  const int d = p.d, n_all = p.P + p.Nk;
  const float sl2 = p.scale * kern::kLog2e;
  const float* qrow = static_cast<const float*>(p.q) + (int64_t)b * p.q_bs + (int64_t)h * p.q_hs +
                      (int64_t)i * p.q_rs;
  const float* dorow = static_cast<const float*>(p.dout) + (int64_t)b * p.do_bs + (int64_t)h * p.do_hs +
                       (int64_t)i * p.do_rs;
  for (int c = lane; c < d; c += 32) {
    qs[warp][c] = qrow[c] * sl2;
    dos[warp][c] = dorow[c];
  }
  __syncwarp();
  const auto kr = kern::joint_rows<float>(p.k, p.k_bs, p.k_hs, p.k_rs, p.pk, p.pk_bs, p.pk_hs, p.pk_rs, p, b, h);
  const auto vr = kern::joint_rows<float>(p.v, p.v_bs, p.v_hs, p.v_rs, p.pv, p.pv_bs, p.pv_hs, p.pv_rs, p, b, h);
  const float* brow = p.bias ? p.bias + (((int64_t)(b % p.nB) * p.H + h) * p.Nq + i) * p.Nk : nullptr;
  const int64_t stat = ((int64_t)b * p.H + h) * p.Nq + i;
  const float lse2 = p.lse[stat] * kern::kLog2e, dl = p.delta[stat];

  float dq[kCols] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < n_all; j0 += 32) {
    const int j = j0 + lane;
    float ds = 0.f;
    if (j < n_all) {
      float s = dot_row(qs[warp], kr.row(j), d);
      if (brow != nullptr && j >= p.P) s += brow[j - p.P] * kern::kLog2e;
      const float pr = exp2f(s - lse2);
      ds = pr * (dot_row(dos[warp], vr.row(j), d) - dl) * p.scale;
    }
    const int nj = min(32, n_all - j0);
    for (int jj = 0; jj < nj; ++jj) {
      const float g = __shfl_sync(0xffffffffu, ds, jj);
      const float* k = kr.row(j0 + jj);
#pragma unroll
      for (int t = 0; t < kCols; ++t)
        if (lane + 32 * t < d) dq[t] += g * k[lane + 32 * t];
    }
  }
  float* g = static_cast<float*>(p.dq) + (int64_t)b * p.dq_bs + (int64_t)h * p.dq_hs + (int64_t)i * p.dq_rs;
#pragma unroll
  for (int t = 0; t < kCols; ++t)
    if (lane + 32 * t < d) g[lane + 32 * t] = dq[t];
}

// One warp per key row j of one head. kPrompt == false: own key j of batch b (blockIdx.x = b * H + h),
// loops over the queries of b. kPrompt == true: prompt key j of set s, loops over the queries of the
// batches of split u (blockIdx.x = (s * prompt_split + u) * H + h) and writes their sum as the
// split's fp32 partial.
template <bool kPrompt>
__global__ void __launch_bounds__(kern::kThreads) bwd_dkdv_f32_kernel(const AttnParams p) {
  __shared__ float ks[kern::kWarps][kMaxD], vs[kern::kWarps][kMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.x % p.H, unit = blockIdx.x / p.H;
  const int j = blockIdx.y * kern::kWarps + warp;
  const int d = p.d;
  if (j >= (kPrompt ? p.P : p.Nk)) return;
  const float sl2 = p.scale * kern::kLog2e;
  const float* krow;
  const float* vrow;
  kern::SetSamples samples{nullptr, unit, 1};
  int first = 0, step = 1;
  if constexpr (kPrompt) {
    const int s = unit / p.prompt_split;
    samples = kern::set_samples(p, s);
    first = unit % p.prompt_split;
    step = p.prompt_split;
    krow = static_cast<const float*>(p.pk) + (int64_t)s * p.pk_bs + (int64_t)h * p.pk_hs + (int64_t)j * p.pk_rs;
    vrow = static_cast<const float*>(p.pv) + (int64_t)s * p.pv_bs + (int64_t)h * p.pv_hs + (int64_t)j * p.pv_rs;
  } else {
    krow = static_cast<const float*>(p.k) + (int64_t)unit * p.k_bs + (int64_t)h * p.k_hs + (int64_t)j * p.k_rs;
    vrow = static_cast<const float*>(p.v) + (int64_t)unit * p.v_bs + (int64_t)h * p.v_hs + (int64_t)j * p.v_rs;
  }
  for (int c = lane; c < d; c += 32) {
    ks[warp][c] = krow[c] * sl2;
    vs[warp][c] = vrow[c];
  }
  __syncwarp();

  float dk[kCols] = {0.f, 0.f, 0.f, 0.f}, dv[kCols] = {0.f, 0.f, 0.f, 0.f};
  for (int pos = first; pos < samples.count; pos += step) {
    const int b = samples[pos];
    const float* bcol = (!kPrompt && p.bias != nullptr)
                            ? p.bias + ((int64_t)(b % p.nB) * p.H + h) * p.Nq * p.Nk + j
                            : nullptr;
    const float* qb = static_cast<const float*>(p.q) + (int64_t)b * p.q_bs + (int64_t)h * p.q_hs;
    const float* dob = static_cast<const float*>(p.dout) + (int64_t)b * p.do_bs + (int64_t)h * p.do_hs;
    const int64_t stat0 = ((int64_t)b * p.H + h) * p.Nq;
    for (int i0 = 0; i0 < p.Nq; i0 += 32) {
      const int i = i0 + lane;
      float pr = 0.f, ds = 0.f;
      if (i < p.Nq) {
        float s = dot_row(ks[warp], qb + (int64_t)i * p.q_rs, d);
        if (bcol != nullptr) s += bcol[(int64_t)i * p.Nk] * kern::kLog2e;
        pr = exp2f(s - p.lse[stat0 + i] * kern::kLog2e);
        ds = pr * (dot_row(vs[warp], dob + (int64_t)i * p.do_rs, d) - p.delta[stat0 + i]) * p.scale;
      }
      const int ni = min(32, p.Nq - i0);
      for (int ii = 0; ii < ni; ++ii) {
        const float gp = __shfl_sync(0xffffffffu, pr, ii), gs = __shfl_sync(0xffffffffu, ds, ii);
        const float* q = qb + (int64_t)(i0 + ii) * p.q_rs;
        const float* g = dob + (int64_t)(i0 + ii) * p.do_rs;
#pragma unroll
        for (int t = 0; t < kCols; ++t)
          if (lane + 32 * t < d) {
            dv[t] += gp * g[lane + 32 * t];
            dk[t] += gs * q[lane + 32 * t];
          }
      }
    }
  }
  float* gk;
  float* gv;
  if constexpr (kPrompt) {  // the split's partial
    const int64_t off = (((int64_t)unit * p.H + h) * p.P + j) * d;
    gk = p.dpk_part + off;
    gv = p.dpv_part + off;
  } else {
    gk = static_cast<float*>(p.dk) + (int64_t)unit * p.dk_bs + (int64_t)h * p.dk_hs + (int64_t)j * p.dk_rs;
    gv = static_cast<float*>(p.dv) + (int64_t)unit * p.dv_bs + (int64_t)h * p.dv_hs + (int64_t)j * p.dv_rs;
  }
#pragma unroll
  for (int t = 0; t < kCols; ++t)
    if (lane + 32 * t < d) {
      gk[lane + 32 * t] = dk[t];
      gv[lane + 32 * t] = dv[t];
    }
}

// ------------------------------------------------------------------------------------------------
// host
// ------------------------------------------------------------------------------------------------
bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const int64_t e = t.element_size();
  for (int dim = 0; dim < t.dim() - 1; ++dim)
    if (t.size(dim) > 1 && (t.stride(dim) * e) % 16 != 0) return false;
  return true;
}

void set_strides(const at::Tensor& t, int64_t& bs, int64_t& hs, int64_t& rs) {
  bs = t.size(0) > 1 ? t.stride(0) : 0;
  hs = t.stride(1);
  rs = t.stride(2);
}

struct Prepared {
  AttnParams p;
  std::optional<at::Tensor> bias_f32;  // keeps the converted bias alive until the launches
  at::Tensor set_order, set_offsets;   // backward with a prompt-set index (see order_by_set)
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv, double scale,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& prompt_index) {
  Prepared r;
  AttnParams& p = r.p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides(q, p.q_bs, p.q_hs, p.q_rs);
  set_strides(k, p.k_bs, p.k_hs, p.k_rs);
  set_strides(v, p.v_bs, p.v_hs, p.v_rs);
  p.B = (int)q.size(0);
  p.H = (int)q.size(1);
  p.Nq = (int)q.size(2);
  p.d = (int)q.size(3);
  p.Nk = (int)k.size(2);
  p.vec = aligned16(q) && aligned16(k) && aligned16(v);
  if (pk.has_value()) {
    p.pk = pk->data_ptr();
    p.pv = pv->data_ptr();
    set_strides(*pk, p.pk_bs, p.pk_hs, p.pk_rs);
    set_strides(*pv, p.pv_bs, p.pv_hs, p.pv_rs);
    p.P = (int)pk->size(2);
    p.S = (int)pk->size(0);
    if (prompt_index.has_value()) {
      p.prompt_index = prompt_index->data_ptr<int64_t>();
    } else {
      p.G = p.B / p.S;
    }
    p.vec = p.vec && aligned16(*pk) && aligned16(*pv);
  }
  if (bias.has_value()) {
    r.bias_f32 = bias->to(at::kFloat).contiguous();
    p.bias = r.bias_f32->data_ptr<float>();
    p.nB = (int)bias->size(0);
  }
  p.scale = (float)scale;
  TORCH_CHECK_VALUE((int64_t)p.B * p.H * std::max(p.Nq, p.Nk + p.P) < (int64_t(1) << 31),
                    "vpt_fast.attention: B * H * N must be < 2^31, got B=", p.B, ", H=", p.H,
                    ", N=", std::max(p.Nq, p.Nk + p.P));
  return r;
}

void set_out(AttnParams& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = out.data_ptr();
  set_strides(out, p.o_bs, p.o_hs, p.o_rs);
  p.lse = lse.data_ptr<float>();
}

// With a prompt-set index: the query batches sorted by set (stable) and where each set starts, on
// the device with fixed shapes (no host sync): set_offsets[s] = #batches reading a set < s.
void order_by_set(Prepared& r, const at::Tensor& prompt_index) {
  const auto sorted = at::sort(prompt_index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  r.set_order = std::get<1>(sorted).contiguous();
  r.set_offsets = at::searchsorted(std::get<0>(sorted), at::arange(r.p.S + 1, prompt_index.options()));
  r.p.set_order = r.set_order.data_ptr<int64_t>();
  r.p.set_offsets = r.set_offsets.data_ptr<int64_t>();
}

// Splits of each prompt set's query batches (see AttnParams::prompt_split), up to the batches per
// set (the mean with an index: its counts are on the device). Tensor-core path: enough (set,
// split, head, key tile) CTAs for ~4 per SM (ViT-B, B=128, H=12, P=50, one set on 132 SMs: 44
// splits of about 3 batches). With an index, a set holding far more than the mean is walked by its
// splits serially: correct, slower. float32 path: one split per batch (per set mean).
void set_prompt_split(AttnParams& p, bool fp32, int device) {
  const int per_set = p.prompt_index != nullptr ? std::max(1, kern::ceil_div(p.B, p.S)) : p.G;
  if (fp32) {
    p.prompt_split = per_set;
    return;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int base = kern::ceil_div(p.P, kern::kBwdRows) * p.S * p.H;
  const int want = std::max(1, kern::ceil_div(4 * sms, base));
  p.prompt_split = std::min(per_set, want);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& pk,
                                                      const std::optional<at::Tensor>& pv,
                                                      double scale,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& prompt_index) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, pk, pv, scale, bias, prompt_index);
  AttnParams& p = r.p;
  at::Tensor out = empty_bnhd(p.B, p.H, p.Nq, p.d, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Nq}, q.options().dtype(at::kFloat));
  if (p.B * p.H * p.Nq == 0) return {out, lse};
  set_out(p, out, lse);
  if (q.scalar_type() == at::kFloat) {
    const dim3 grid(p.B * p.H, kern::ceil_div(p.Nq, kern::kWarps));
    fwd_f32_kernel<<<grid, kern::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    launch_attention_fwd_tc(p, q.scalar_type() == at::kBFloat16);
  }
  return {out, lse};
}

AttnGrads attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const std::optional<at::Tensor>& pk,
                             const std::optional<at::Tensor>& pv, const at::Tensor& out,
                             const at::Tensor& lse, double scale,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& prompt_index,
                             const QkvGradViews& into) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, pk, pv, scale, bias, prompt_index);
  AttnParams& p = r.p;
  const at::Tensor lse_c = lse.contiguous();
  set_out(p, out, lse_c);
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  p.dout = dout.data_ptr();
  set_strides(dout, p.do_bs, p.do_hs, p.do_rs);
  p.vec = p.vec && aligned16(dout) && aligned16(out);

  const bool fp32 = q.scalar_type() == at::kFloat;
  // the tensor-core kernels store gradient rows with 16-byte vector stores
  TORCH_CHECK_VALUE(!into.given() || fp32 || (aligned16(into.dq) && aligned16(into.dk) && aligned16(into.dv)),
                    "vpt_fast.attention_bwd: dqkv must be 16-byte aligned for ", q.scalar_type(),
                    " on CUDA (data pointer and every stride but the last a multiple of 16 bytes), got "
                    "strides ", into.dq.strides(), " of the dq view at data offset ",
                    reinterpret_cast<uintptr_t>(into.dq.data_ptr()) % 16, " (mod 16 bytes)");
  at::Tensor dq = into.given() ? into.dq : empty_bnhd(p.B, p.H, p.Nq, p.d, q.options());
  at::Tensor dk = into.given() ? into.dk : empty_bnhd(p.B, p.H, p.Nk, p.d, k.options());
  at::Tensor dv = into.given() ? into.dv : empty_bnhd(p.B, p.H, p.Nk, p.d, v.options());
  at::Tensor delta = at::empty({p.B, p.H, p.Nq}, q.options().dtype(at::kFloat));
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides(dq, p.dq_bs, p.dq_hs, p.dq_rs);
  set_strides(dk, p.dk_bs, p.dk_hs, p.dk_rs);
  set_strides(dv, p.dv_bs, p.dv_hs, p.dv_rs);
  p.delta = delta.data_ptr<float>();

  const bool run = p.B * p.H > 0 && p.Nq > 0;  // else every key gradient is zero
  at::Tensor dpk, dpv, dpk_part, dpv_part;
  if (pk.has_value()) {
    dpk = empty_bnhd(pk->size(0), p.H, p.P, p.d, pk->options());
    dpv = empty_bnhd(pv->size(0), p.H, p.P, p.d, pv->options());
    p.dpk = dpk.data_ptr();
    p.dpv = dpv.data_ptr();
    set_strides(dpk, p.dpk_bs, p.dpk_hs, p.dpk_rs);
    set_strides(dpv, p.dpv_bs, p.dpv_hs, p.dpv_rs);
    if (run && p.P > 0) {
      if (prompt_index.has_value()) order_by_set(r, *prompt_index);
      set_prompt_split(p, fp32, (int)q.get_device());
      const int64_t units = (int64_t)p.S * p.prompt_split;
      dpk_part = at::empty({units, p.H, p.P, p.d}, q.options().dtype(at::kFloat));
      dpv_part = at::empty({units, p.H, p.P, p.d}, q.options().dtype(at::kFloat));
      p.dpk_part = dpk_part.data_ptr<float>();
      p.dpv_part = dpv_part.data_ptr<float>();
    }
  }

  if (!run) {
    dk.zero_();
    dv.zero_();
    if (dpk.defined()) {
      dpk.zero_();
      dpv.zero_();
    }
  } else {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (fp32) {
      const int64_t rows = (int64_t)p.B * p.H * p.Nq;
      kern::bwd_delta_kernel<float><<<(unsigned)((rows + kern::kWarps - 1) / kern::kWarps), kern::kThreads, 0,
                                      stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bwd_dq_f32_kernel<<<dim3(p.B * p.H, kern::ceil_div(p.Nq, kern::kWarps)), kern::kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (p.Nk > 0) {
        bwd_dkdv_f32_kernel<false><<<dim3(p.B * p.H, kern::ceil_div(p.Nk, kern::kWarps)), kern::kThreads, 0,
                                     stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (p.P > 0) {
        bwd_dkdv_f32_kernel<true><<<dim3(p.S * p.prompt_split * p.H, kern::ceil_div(p.P, kern::kWarps)),
                                    kern::kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      launch_attention_bwd_tc(p, q.scalar_type() == at::kBFloat16);
    }
    if (dpk.defined() && p.P > 0) {  // sum the splits' partials in a fixed order
      const unsigned blocks = (unsigned)((dpk.numel() + 255) / 256);
      if (q.scalar_type() == at::kBFloat16) {
        kern::bwd_prompt_reduce_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p);
      } else if (q.scalar_type() == at::kHalf) {
        kern::bwd_prompt_reduce_kernel<__half><<<blocks, 256, 0, stream>>>(p);
      } else {
        kern::bwd_prompt_reduce_kernel<float><<<blocks, 256, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  if (!pk.has_value()) {
    at::Tensor none = at::empty({0}, q.options());
    return {dq, dk, dv, none, none};
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace vpt_fast
