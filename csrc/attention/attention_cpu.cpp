// CPU twin of the prompt-aware flash attention (same semantics as attention_cuda.cu and
// vpt_fast/backends/torch_impl.py): exact softmax over [prompt keys, own keys] with float32
// accumulation (float64 for float64 inputs), parallel over (batch, head) with at::parallel_for.
//
// Cost per (b, h): forward 4 * Nq * (P + Nk) * d FLOPs, backward 2.5x that; each task converts its
// K/V rows (prompt + own) once into an accumulation-dtype buffer, so memory traffic is one read of
// q, k, v, pk, pv (+ bias) and one write of the outputs.
#include "attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace vpt_fast {
namespace {

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc_t>
inline void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Copies rows [0, n) of a (n, d) strided slice into a contiguous accumulation buffer.
template <typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* src, int64_t row_stride, int64_t n, int64_t d, acc_t* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* s = src + r * row_stride;
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = static_cast<acc_t>(s[c]);
  }
}

struct Shape {
  int64_t B, H, Nq, Nk, P, d, G, nB;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& pk,
               const std::optional<at::Tensor>& bias) {
  Shape s;
  s.B = q.size(0);
  s.H = q.size(1);
  s.Nq = q.size(2);
  s.d = q.size(3);
  s.Nk = k.size(2);
  s.P = pk.has_value() ? pk->size(2) : 0;
  s.G = pk.has_value() ? s.B / pk->size(0) : 1;
  s.nB = bias.has_value() ? bias->size(0) : 1;
  return s;
}

// Joint K (or V) rows of (b, h): [prompt rows of batch b / G; own rows of b] -> (P + Nk, d) buffer.
template <typename scalar_t, typename acc_t>
void load_joint(const at::Tensor& x, const std::optional<at::Tensor>& px, const Shape& s, int64_t b,
                int64_t h, acc_t* dst) {
  if (s.P > 0) {
    const at::Tensor& p = *px;
    load_rows(p.data_ptr<scalar_t>() + (b / s.G) * p.stride(0) + h * p.stride(1), p.stride(2), s.P,
              s.d, dst);
  }
  load_rows(x.data_ptr<scalar_t>() + b * x.stride(0) + h * x.stride(1), x.stride(2), s.Nk, s.d,
            dst + s.P * s.d);
}

// Scores of query row i against all joint keys (scaled, own keys biased) -> s[0, P + Nk).
template <typename acc_t>
inline void scores(const acc_t* qi, const acc_t* kk, const acc_t* bias_row, const Shape& s,
                   acc_t scale, acc_t* out) {
  const int64_t n = s.P + s.Nk;
  for (int64_t j = 0; j < n; ++j) out[j] = dot(qi, kk + j * s.d, s.d) * scale;
  if (bias_row != nullptr)
    for (int64_t j = 0; j < s.Nk; ++j) out[s.P + j] += bias_row[j];
}

template <typename scalar_t, typename acc_t>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
              const at::Tensor* bias, const Shape& s, acc_t scale, at::Tensor& out,
              at::Tensor& lse) {
  const int64_t n = s.P + s.Nk;
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kk(n * s.d), vv(n * s.d), qi(s.d), sc(n), o(s.d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      load_joint<scalar_t>(k, pk, s, b, h, kk.data());
      load_joint<scalar_t>(v, pv, s, b, h, vv.data());
      const scalar_t* qb = q.data_ptr<scalar_t>() + b * q.stride(0) + h * q.stride(1);
      scalar_t* ob = out.data_ptr<scalar_t>() + b * out.stride(0) + h * out.stride(1);
      acc_t* lb = lse.data_ptr<acc_t>() + (b * s.H + h) * s.Nq;
      const acc_t* bb = bias ? bias->data_ptr<acc_t>() + ((b % s.nB) * s.H + h) * s.Nq * s.Nk
                             : nullptr;
      for (int64_t i = 0; i < s.Nq; ++i) {
        load_rows(qb + i * q.stride(2), 0, 1, s.d, qi.data());
        scores(qi.data(), kk.data(), bb ? bb + i * s.Nk : nullptr, s, scale, sc.data());
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < n; ++j) m = std::max(m, sc[j]);
        const acc_t m_use = std::isinf(m) ? acc_t(0) : m;
        acc_t l = 0;
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const acc_t p = std::exp(sc[j] - m_use);
          l += p;
          axpy(p, vv.data() + j * s.d, o.data(), s.d);
        }
        const acc_t inv = l > 0 ? acc_t(1) / l : acc_t(0);
        for (int64_t c = 0; c < s.d; ++c) ob[i * out.stride(2) + c] = static_cast<scalar_t>(o[c] * inv);
        lb[i] = m_use + std::log(l);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
              const at::Tensor& out, const at::Tensor& lse, const at::Tensor* bias, const Shape& s,
              acc_t scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk_part,
              at::Tensor& dpv_part) {
  const int64_t n = s.P + s.Nk;
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kk(n * s.d), vv(n * s.d), dkk(n * s.d), dvv(n * s.d);
    std::vector<acc_t> qi(s.d), doi(s.d), oi(s.d), dqi(s.d), sc(n);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      load_joint<scalar_t>(k, pk, s, b, h, kk.data());
      load_joint<scalar_t>(v, pv, s, b, h, vv.data());
      std::fill(dkk.begin(), dkk.end(), acc_t(0));
      std::fill(dvv.begin(), dvv.end(), acc_t(0));
      const scalar_t* qb = q.data_ptr<scalar_t>() + b * q.stride(0) + h * q.stride(1);
      const scalar_t* dob = dout.data_ptr<scalar_t>() + b * dout.stride(0) + h * dout.stride(1);
      const scalar_t* ob = out.data_ptr<scalar_t>() + b * out.stride(0) + h * out.stride(1);
      const acc_t* lb = lse.data_ptr<acc_t>() + b * lse.stride(0) + h * lse.stride(1);
      const acc_t* bb = bias ? bias->data_ptr<acc_t>() + ((b % s.nB) * s.H + h) * s.Nq * s.Nk
                             : nullptr;
      scalar_t* dqb = dq.data_ptr<scalar_t>() + b * dq.stride(0) + h * dq.stride(1);
      for (int64_t i = 0; i < s.Nq; ++i) {
        load_rows(qb + i * q.stride(2), 0, 1, s.d, qi.data());
        load_rows(dob + i * dout.stride(2), 0, 1, s.d, doi.data());
        load_rows(ob + i * out.stride(2), 0, 1, s.d, oi.data());
        const acc_t delta = dot(doi.data(), oi.data(), s.d);
        const acc_t li = lb[i * lse.stride(2)];
        scores(qi.data(), kk.data(), bb ? bb + i * s.Nk : nullptr, s, scale, sc.data());
        std::fill(dqi.begin(), dqi.end(), acc_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const acc_t p = std::exp(sc[j] - li);
          const acc_t dp = dot(doi.data(), vv.data() + j * s.d, s.d);
          const acc_t ds = p * (dp - delta) * scale;
          axpy(ds, kk.data() + j * s.d, dqi.data(), s.d);
          axpy(ds, qi.data(), dkk.data() + j * s.d, s.d);
          axpy(p, doi.data(), dvv.data() + j * s.d, s.d);
        }
        for (int64_t c = 0; c < s.d; ++c) dqb[i * dq.stride(2) + c] = static_cast<scalar_t>(dqi[c]);
      }
      scalar_t* dkb = dk.data_ptr<scalar_t>() + b * dk.stride(0) + h * dk.stride(1);
      scalar_t* dvb = dv.data_ptr<scalar_t>() + b * dv.stride(0) + h * dv.stride(1);
      for (int64_t j = 0; j < s.Nk; ++j)
        for (int64_t c = 0; c < s.d; ++c) {
          dkb[j * dk.stride(2) + c] = static_cast<scalar_t>(dkk[(s.P + j) * s.d + c]);
          dvb[j * dv.stride(2) + c] = static_cast<scalar_t>(dvv[(s.P + j) * s.d + c]);
        }
      if (s.P > 0) {  // per-(b, h) partials, reduced over the G batches sharing the segment below
        acc_t* pkp = dpk_part.data_ptr<acc_t>() + (b * s.H + h) * s.P * s.d;
        acc_t* pvp = dpv_part.data_ptr<acc_t>() + (b * s.H + h) * s.P * s.d;
        std::copy(dkk.begin(), dkk.begin() + s.P * s.d, pkp);
        std::copy(dvv.begin(), dvv.begin() + s.P * s.d, pvp);
      }
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::optional<at::Tensor> bias_acc(const std::optional<at::Tensor>& bias, at::ScalarType acc) {
  if (!bias.has_value()) return std::nullopt;
  return bias->to(acc).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& pk,
                                                     const std::optional<at::Tensor>& pv,
                                                     double scale,
                                                     const std::optional<at::Tensor>& bias) {
  const Shape s = shape_of(q, k, pk, bias);
  const at::ScalarType acc = acc_type(q.scalar_type());
  at::Tensor out = empty_bnhd(s.B, s.H, s.Nq, s.d, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(acc));
  const auto b = bias_acc(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_impl<scalar_t, acc_t>(q, k, v, pk, pv, b ? &*b : nullptr, s, static_cast<acc_t>(scale), out,
                              lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv, const at::Tensor& out,
    const at::Tensor& lse, double scale, const std::optional<at::Tensor>& bias) {
  const Shape s = shape_of(q, k, pk, bias);
  const at::ScalarType acc = acc_type(q.scalar_type());
  at::Tensor dq = empty_bnhd(s.B, s.H, s.Nq, s.d, q.options());
  at::Tensor dk = empty_bnhd(s.B, s.H, s.Nk, s.d, k.options());
  at::Tensor dv = empty_bnhd(s.B, s.H, s.Nk, s.d, v.options());
  at::Tensor dpk_part, dpv_part;
  if (s.P > 0) {
    dpk_part = at::empty({s.B, s.H, s.P, s.d}, q.options().dtype(acc));
    dpv_part = at::empty({s.B, s.H, s.P, s.d}, q.options().dtype(acc));
  }
  const auto b = bias_acc(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bwd_impl<scalar_t, acc_t>(dout, q, k, v, pk, pv, out, lse, b ? &*b : nullptr, s,
                              static_cast<acc_t>(scale), dq, dk, dv, dpk_part, dpv_part);
  });
  if (!pk.has_value()) {
    at::Tensor none = at::empty({0}, q.options());
    return {dq, dk, dv, none, none};
  }
  const int64_t Bp = pk->size(0);
  // Sum the partials of the G query batches that share each prompt batch; layout (Bp, P, H, d).
  auto reduce = [&](const at::Tensor& part, const at::Tensor& like) {
    at::Tensor r = empty_bnhd(Bp, s.H, s.P, s.d, like.options());
    r.copy_(part.view({Bp, s.G, s.H, s.P, s.d}).sum(1));
    return r;
  };
  return {dq, dk, dv, reduce(dpk_part, *pk), reduce(dpv_part, *pv)};
}

}  // namespace vpt_fast
