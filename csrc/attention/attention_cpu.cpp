// CPU twin of the prompt-aware flash attention (same semantics as attention_cuda.cu and
// vpt_fast/backends/torch_impl.py): exact softmax over [prompt keys, own keys] with float32
// accumulation (float64 for float64 inputs), parallel over (batch, head) with at::parallel_for.
//
// Cost per (b, h): forward 4 * Nq * (P + Nk) * d FLOPs, backward 2.5x that. Each task gathers its
// joint K/V rows (its prompt set, read through the prompt-set index when there is one, + own) once
// in the accumulation dtype and runs the products as BLAS GEMMs (single-threaded inside the
// parallel region); the (Nq, P + Nk) score tile lives only in the task. Prompt-key gradients: one
// partial per (b, h), then per set the partials of the batches that read it, added one by one in
// the set's fixed order (batches sorted by set, stable: the order the CUDA kernels deal from).
#include "attention.h"

#include <ATen/Parallel.h>

#include <vector>

namespace vpt_fast {
namespace {

struct Shape {
  int64_t B, H, Nq, Nk, P, d, S, G, nB;
  const int64_t* index;  // (B,) prompt set of each query batch, or nullptr: set b / G

  int64_t set_of(int64_t b) const { return index != nullptr ? index[b] : b / G; }
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& pk,
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& prompt_index) {
  Shape s;
  s.B = q.size(0);
  s.H = q.size(1);
  s.Nq = q.size(2);
  s.d = q.size(3);
  s.Nk = k.size(2);
  s.P = pk.has_value() ? pk->size(2) : 0;
  s.S = pk.has_value() ? pk->size(0) : 1;
  s.index = pk.has_value() && prompt_index.has_value() ? prompt_index->data_ptr<int64_t>() : nullptr;
  s.G = s.index == nullptr && pk.has_value() ? s.B / s.S : 1;
  s.nB = bias.has_value() ? bias->size(0) : 1;
  return s;
}

// Joint K (or V) rows of (b, h) in the accumulation dtype: [prompt rows of b's set; own rows].
at::Tensor joint(const at::Tensor& x, const std::optional<at::Tensor>& px, const Shape& s, int64_t b,
                 int64_t h, at::ScalarType acc) {
  at::Tensor own = x.select(0, b).select(0, h);
  if (s.P == 0) return own.to(acc);
  return at::cat({px->select(0, s.set_of(b)).select(0, h), own}, 0).to(acc);
}

// Query batches sorted by prompt set, stable (counting sort): the batches of set `set` are
// order[offsets[set]] .. order[offsets[set + 1] - 1], in increasing batch order.
void order_by_set(const Shape& s, std::vector<int64_t>& order, std::vector<int64_t>& offsets) {
  order.resize(s.B);
  offsets.assign(s.S + 1, 0);
  for (int64_t b = 0; b < s.B; ++b) ++offsets[s.set_of(b) + 1];
  for (int64_t set = 0; set < s.S; ++set) offsets[set + 1] += offsets[set];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t b = 0; b < s.B; ++b) order[next[s.set_of(b)]++] = b;
}

// Probabilities of (b, h), (Nq, P + Nk): exp(q K^T * scale + [0, bias] - lse).
at::Tensor scores(const at::Tensor& qa, const at::Tensor& kk, const at::Tensor* bias, const Shape& s,
                  int64_t b, int64_t h, double scale) {
  at::Tensor sc = at::mm(qa, kk.t()).mul_(scale);
  if (bias != nullptr) sc.narrow(1, s.P, s.Nk).add_(bias->select(0, b % s.nB).select(0, h));
  return sc;
}

void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
              const at::Tensor* bias, const Shape& s, double scale, at::ScalarType acc,
              at::Tensor& out, at::Tensor& lse) {
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      at::Tensor sc = scores(q.select(0, b).select(0, h).to(acc), joint(k, pk, s, b, h, acc), bias,
                             s, b, h, scale);
      at::Tensor l = at::logsumexp(sc, {1}, true);
      out.select(0, b).select(0, h).copy_(at::mm(sc.sub_(l).exp_(), joint(v, pv, s, b, h, acc)));
      lse.select(0, b).select(0, h).copy_(l.squeeze(1));
    }
  });
}

void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv,
              const at::Tensor& out, const at::Tensor& lse, const at::Tensor* bias, const Shape& s,
              double scale, at::ScalarType acc, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              at::Tensor& dpk_part, at::Tensor& dpv_part) {
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const at::Tensor qa = q.select(0, b).select(0, h).to(acc);
      const at::Tensor kk = joint(k, pk, s, b, h, acc), vv = joint(v, pv, s, b, h, acc);
      const at::Tensor doa = dout.select(0, b).select(0, h).to(acc);
      const at::Tensor delta = (doa * out.select(0, b).select(0, h).to(acc)).sum(1, true);
      at::Tensor p = scores(qa, kk, bias, s, b, h, scale)
                         .sub_(lse.select(0, b).select(0, h).to(acc).unsqueeze(1))
                         .exp_();
      const at::Tensor dvv = at::mm(p.t(), doa);
      at::Tensor ds = p.mul_(at::mm(doa, vv.t()).sub_(delta)).mul_(scale);  // p is not needed after
      const at::Tensor dkk = at::mm(ds.t(), qa);
      dq.select(0, b).select(0, h).copy_(at::mm(ds, kk));
      dk.select(0, b).select(0, h).copy_(dkk.narrow(0, s.P, s.Nk));
      dv.select(0, b).select(0, h).copy_(dvv.narrow(0, s.P, s.Nk));
      if (s.P > 0) {  // per-(b, h) partials, reduced over the G batches sharing the segment below
        dpk_part.select(0, b).select(0, h).copy_(dkk.narrow(0, 0, s.P));
        dpv_part.select(0, b).select(0, h).copy_(dvv.narrow(0, 0, s.P));
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
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& prompt_index) {
  const Shape s = shape_of(q, k, pk, bias, prompt_index);
  const at::ScalarType acc = acc_type(q.scalar_type());
  at::Tensor out = empty_bnhd(s.B, s.H, s.Nq, s.d, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(acc));
  const auto b = bias_acc(bias, acc);
  fwd_impl(q, k, v, pk, pv, b ? &*b : nullptr, s, scale, acc, out, lse);
  return {out, lse};
}

AttnGrads attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& pk,
                            const std::optional<at::Tensor>& pv, const at::Tensor& out,
                            const at::Tensor& lse, double scale,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& prompt_index,
                            const QkvGradViews& into) {
  const Shape s = shape_of(q, k, pk, bias, prompt_index);
  const at::ScalarType acc = acc_type(q.scalar_type());
  at::Tensor dq = into.given() ? into.dq : empty_bnhd(s.B, s.H, s.Nq, s.d, q.options());
  at::Tensor dk = into.given() ? into.dk : empty_bnhd(s.B, s.H, s.Nk, s.d, k.options());
  at::Tensor dv = into.given() ? into.dv : empty_bnhd(s.B, s.H, s.Nk, s.d, v.options());
  at::Tensor dpk_part, dpv_part;
  if (s.P > 0) {
    dpk_part = at::empty({s.B, s.H, s.P, s.d}, q.options().dtype(acc));
    dpv_part = at::empty({s.B, s.H, s.P, s.d}, q.options().dtype(acc));
  }
  const auto b = bias_acc(bias, acc);
  bwd_impl(dout, q, k, v, pk, pv, out, lse, b ? &*b : nullptr, s, scale, acc, dq, dk, dv, dpk_part,
           dpv_part);
  if (!pk.has_value()) {
    at::Tensor none = at::empty({0}, q.options());
    return {dq, dk, dv, none, none};
  }
  // Per set, add the partials of the batches that read it one by one in the set's fixed order
  // (no atomics: bitwise reproducible; zeros for a set no batch reads); layout (S, P, H, d).
  std::vector<int64_t> order, offsets;
  order_by_set(s, order, offsets);
  auto reduce = [&](const at::Tensor& part, const at::Tensor& like) {
    at::Tensor r = empty_bnhd(s.S, s.H, s.P, s.d, like.options());
    at::parallel_for(0, s.S, 1, [&](int64_t begin, int64_t end) {
      for (int64_t set = begin; set < end; ++set) {
        at::Tensor sum = at::zeros({s.H, s.P, s.d}, part.options());
        for (int64_t pos = offsets[set]; pos < offsets[set + 1]; ++pos) sum.add_(part.select(0, order[pos]));
        r.select(0, set).copy_(sum);
      }
    });
    return r;
  };
  return {dq, dk, dv, reduce(dpk_part, *pk), reduce(dpv_part, *pv)};
}

}  // namespace vpt_fast
