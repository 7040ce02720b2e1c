// vpt_fast._C: torch operator library `vpt_fast` (docs/design.md §3).
//
//   torch.ops.vpt_fast.attention_fwd(q, k, v, pk, pv, scale, bias=None, prompt_index=None)
//       -> (out, lse)
//   torch.ops.vpt_fast.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias=None,
//                                    prompt_index=None, dqkv=None) -> (dq, dk, dv, dpk, dpv)
//       dpk/dpv are empty (numel 0) tensors when pk is None; dq/dk/dv are empty when dqkv is given
//       (the op writes them into dqkv, its one mutated argument: no output aliases an input)
//
// Shapes: q (B, H, Nq, d); k, v (B, H, Nk, d); pk, pv (S, H, P, d) prompt sets; query batch b reads
// set prompt_index[b] with a prompt-set index (int64 (B,), contiguous, on q's device, values in
// [0, S): the caller checks values on CUDA, kernels trust them), else set b / (B / S) with S | B.
// bias (nB, H, Nq, Nk) with nB | B (query batch b reads bias[b % nB]) added to own-key scores
// only; lse (B, H, Nq) float32 (float64 for float64 inputs on CPU). dqkv (B, N, 3, H, d) in q's
// dtype, Nq == Nk == N (the qkv projection's output layout): dq, dk, dv are written into
// dqkv[:, :, i].transpose(1, 2), i = 0, 1, 2. Any strides with a unit stride on the last dim.
// Outputs out/dq/dk/dv/dpk/dpv are (B, H, N, d) views of (B, N, H, d) buffers.
//
// This file checks every argument (errors name the argument, what was expected, what came in;
// ValueError for shapes/devices/layouts, TypeError for dtypes) and dispatches to the CPU twin or
// the CUDA kernels. Fake (meta) implementations live in vpt_fast/backends/cuda_impl.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "attention/attention.h"

#ifdef VPT_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

#ifndef VPT_FAST_ARCHS
#define VPT_FAST_ARCHS ""
#endif

#ifdef TORCH_VERSION
#define VPT_FAST_TORCH_VERSION std::string(TORCH_VERSION)
#else
#define VPT_FAST_TORCH_VERSION                                                              \
  (std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." + \
   std::to_string(TORCH_VERSION_PATCH))
#endif

namespace vpt_fast {
namespace {

using at::Tensor;
using std::optional;

bool dtype_ok(const Tensor& t) {
  const auto s = t.scalar_type();
  if (s == at::kFloat || s == at::kHalf || s == at::kBFloat16) return true;
  return s == at::kDouble && t.device().is_cpu();
}

const char* dtypes_for(const Tensor& t) {
  return t.device().is_cpu() ? "float32, float16, bfloat16 or float64 (CPU)"
                             : "float32, float16 or bfloat16 (CUDA)";
}

void check_tensor(const char* fn, const char* name, const Tensor& t, const Tensor& q, int64_t dim) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device() == q.device(), fn, ": ", name, " must be on q's device ", q.device(),
                    ", got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, fn, ": ", name, " must have ", dim, " dims, got shape ",
                    t.sizes());
}

void check_unit_stride(const char* fn, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, fn, ": ", name,
                    " must have a unit stride on its last (head) dim (stride(-1) == 1), got strides ",
                    t.strides(), " for shape ", t.sizes());
}

void check_same_dtype(const char* fn, const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), fn, ": ", name, " dtype must match q (",
                   q.scalar_type(), "), got ", t.scalar_type());
}

// Checks the prompt-set index's dtype, shape, device and layout (its values: check_index_values).
void check_prompt_index(const char* fn, const Tensor& index, const Tensor& q,
                        const optional<Tensor>& pk) {
  const int64_t B = q.size(0);
  TORCH_CHECK_VALUE(pk.has_value(), fn, ": prompt_index needs the prompt sets pk, pv (S, H, P, d), "
                    "got pk None");
  TORCH_CHECK_VALUE(index.defined(), fn, ": prompt_index must be a tensor or None");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, fn, ": prompt_index dtype must be int64 (Long), "
                   "got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == B, fn,
                    ": prompt_index must be (B,) = (", B, ",), one prompt set per query batch, got shape ",
                    index.sizes());
  TORCH_CHECK_VALUE(index.device() == q.device(), fn, ": prompt_index must be on q's device ",
                    q.device(), ", got ", index.device());
  TORCH_CHECK_VALUE(index.is_contiguous(), fn, ": prompt_index must be contiguous, got strides ",
                    index.strides());
  TORCH_CHECK_VALUE(pk->size(0) >= 1, fn, ": prompt_index needs at least one prompt set, got pk shape ",
                    pk->sizes());
}

// CPU only (reading the values costs nothing there): every prompt set index in [0, S).
void check_index_values(const char* fn, const optional<Tensor>& index, const optional<Tensor>& pk) {
  if (!index.has_value()) return;
  const int64_t S = pk->size(0);
  const int64_t* values = index->data_ptr<int64_t>();
  for (int64_t b = 0; b < index->size(0); ++b)
    TORCH_CHECK_VALUE(values[b] >= 0 && values[b] < S, fn, ": prompt_index values must be in [0, S=", S,
                      "), got ", values[b], " at position ", b);
}

// Checks the qkv-gradient buffer dqkv (B, N, 3, H, d) against q, k.
void check_dqkv(const char* fn, const Tensor& dqkv, const Tensor& q, const Tensor& k) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  check_tensor(fn, "dqkv", dqkv, q, 5);
  check_same_dtype(fn, "dqkv", dqkv, q);
  TORCH_CHECK_VALUE(Nq == k.size(2), fn, ": dqkv needs as many queries as keys (Nq == Nk), got Nq=",
                    Nq, ", Nk=", k.size(2));
  TORCH_CHECK_VALUE(dqkv.size(0) == B && dqkv.size(1) == Nq && dqkv.size(2) == 3 && dqkv.size(3) == H &&
                        dqkv.size(4) == d,
                    fn, ": dqkv must be (B=", B, ", N=", Nq, ", 3, H=", H, ", d=", d, "), got shape ",
                    dqkv.sizes());
  check_unit_stride(fn, "dqkv", dqkv);
}

// dq, dk, dv: the (B, H, N, d) views dqkv[:, :, i].transpose(1, 2), or none.
QkvGradViews qkv_grad_views(const optional<Tensor>& dqkv) {
  if (!dqkv.has_value()) return {};
  return {dqkv->select(2, 0).transpose(1, 2), dqkv->select(2, 1).transpose(1, 2),
          dqkv->select(2, 2).transpose(1, 2)};
}

// Checks q, k, v, pk, pv, bias, prompt_index; returns true when a prompt segment is present.
bool check_attention(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                     const optional<Tensor>& pk, const optional<Tensor>& pv,
                     const optional<Tensor>& bias, const optional<Tensor>& prompt_index) {
  TORCH_CHECK_VALUE(q.defined(), fn, ": q must be a tensor");
  TORCH_CHECK_VALUE(q.device().is_cpu() || q.device().is_cuda(), fn,
                    ": q must be a CPU or CUDA tensor, got device ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 4, fn, ": q must be (B, H, Nq, d) with 4 dims, got shape ", q.sizes());
  TORCH_CHECK_TYPE(dtype_ok(q), fn, ": q dtype must be ", dtypes_for(q), ", got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  if (q.device().is_cuda()) {
    TORCH_CHECK_VALUE(d == 32 || d == 64 || d == 80 || d == 128, fn,
                      ": unsupported head dim on CUDA: expected d in {32, 64, 80, 128}, got d=", d);
  } else {
    TORCH_CHECK_VALUE(d >= 1, fn, ": head dim must be >= 1, got d=", d);
  }
  check_unit_stride(fn, "q", q);
  check_tensor(fn, "k", k, q, 4);
  check_tensor(fn, "v", v, q, 4);
  check_same_dtype(fn, "k", k, q);
  check_same_dtype(fn, "v", v, q);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == d, fn, ": k must be (B=", B,
                    ", H=", H, ", Nk, d=", d, "), got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), fn, ": v must have k's shape ", k.sizes(),
                    ", got shape ", v.sizes());
  check_unit_stride(fn, "k", k);
  check_unit_stride(fn, "v", v);
  TORCH_CHECK_VALUE(pk.has_value() == pv.has_value(), fn,
                    ": pk and pv must be given together (both or neither), got pk ",
                    pk.has_value() ? "given" : "None", " and pv ", pv.has_value() ? "given" : "None");
  int64_t P = 0;
  if (pk.has_value()) {
    check_tensor(fn, "pk", *pk, q, 4);
    check_tensor(fn, "pv", *pv, q, 4);
    check_same_dtype(fn, "pk", *pk, q);
    check_same_dtype(fn, "pv", *pv, q);
    TORCH_CHECK_VALUE(pk->size(1) == H && pk->size(3) == d, fn, ": pk must be (Bp, H=", H,
                      ", P, d=", d, "), got shape ", pk->sizes());
    TORCH_CHECK_VALUE(pv->sizes() == pk->sizes(), fn, ": pv must have pk's shape ", pk->sizes(),
                      ", got shape ", pv->sizes());
    const int64_t Bp = pk->size(0);
    if (prompt_index.has_value()) {
      check_prompt_index(fn, *prompt_index, q, pk);
    } else {
      TORCH_CHECK_VALUE(Bp >= 1 && B % Bp == 0, fn, ": prompt batch Bp=", Bp,
                        " must divide the query batch B=", B, " (pk shape ", pk->sizes(),
                        "; or pass prompt_index to pick a prompt set per query batch)");
    }
    check_unit_stride(fn, "pk", *pk);
    check_unit_stride(fn, "pv", *pv);
    P = pk->size(2);
  }
  if (prompt_index.has_value() && !pk.has_value()) check_prompt_index(fn, *prompt_index, q, pk);
  TORCH_CHECK_VALUE(k.size(2) + P >= 1, fn,
                    ": attention needs at least one key (Nk + P >= 1), got Nk=", k.size(2), ", P=", P);
  if (bias.has_value()) {
    const Tensor& b = *bias;
    check_tensor(fn, "bias", b, q, 4);
    TORCH_CHECK_TYPE(dtype_ok(b), fn, ": bias dtype must be ", dtypes_for(b), ", got ",
                     b.scalar_type());
    const int64_t nB = b.size(0);
    TORCH_CHECK_VALUE(b.size(1) == H && b.size(2) == Nq && b.size(3) == k.size(2) && nB >= 1 &&
                          B % nB == 0,
                      fn, ": bias must be (nB, H=", H, ", Nq=", Nq, ", Nk=", k.size(2),
                      ") with nB dividing B=", B, ", got shape ", b.sizes());
  }
  return P > 0 || pk.has_value();
}

void check_backward(const char* fn, const Tensor& dout, const Tensor& q, const Tensor& out,
                    const Tensor& lse) {
  check_tensor(fn, "dout", dout, q, 4);
  check_tensor(fn, "out", out, q, 4);
  check_same_dtype(fn, "dout", dout, q);
  check_same_dtype(fn, "out", out, q);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), fn, ": dout must have q's shape ", q.sizes(),
                    ", got shape ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), fn, ": out must have q's shape ", q.sizes(),
                    ", got shape ", out.sizes());
  check_unit_stride(fn, "dout", dout);
  check_unit_stride(fn, "out", out);
  check_tensor(fn, "lse", lse, q, 3);
  const auto want = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.scalar_type() == want, fn, ": lse must be ", want,
                    " (the log-sum-exp returned by attention_fwd), got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                    fn, ": lse must be (B, H, Nq) = ", q.sizes().slice(0, 3), ", got shape ",
                    lse.sizes());
}

// A prompt segment with P == 0 is the same as none.
optional<Tensor> nonempty(const optional<Tensor>& p) {
  if (p.has_value() && p->size(2) == 0) return std::nullopt;
  return p;
}

// The op's outputs from the computed gradients. P == 0 ran as "no prompts": zero-size prompt
// gradients of pk's shape. With dqkv, dq/dk/dv live in it (the mutated argument): the op returns
// empty tensors in their place, as no output may alias an input.
AttnGrads op_outputs(AttnGrads r, const Tensor& q, const optional<Tensor>& pk,
                     const optional<Tensor>& pv, const optional<Tensor>& dqkv) {
  if (pk.has_value() && pk->size(2) == 0) {
    std::get<3>(r) = at::zeros_like(*pk);
    std::get<4>(r) = at::zeros_like(*pv);
  }
  if (dqkv.has_value()) {
    std::get<0>(r) = at::empty({0}, q.options());
    std::get<1>(r) = at::empty({0}, q.options());
    std::get<2>(r) = at::empty({0}, q.options());
  }
  return r;
}

std::tuple<Tensor, Tensor> attention_fwd_cpu_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const optional<Tensor>& pk,
                                                const optional<Tensor>& pv, double scale,
                                                const optional<Tensor>& bias,
                                                const optional<Tensor>& prompt_index) {
  const char* fn = "vpt_fast.attention_fwd";
  check_attention(fn, q, k, v, pk, pv, bias, prompt_index);
  check_index_values(fn, prompt_index, pk);
  return attention_fwd_cpu(q, k, v, nonempty(pk), nonempty(pv), scale, bias, prompt_index);
}

AttnGrads attention_bwd_cpu_op(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                               const optional<Tensor>& pk, const optional<Tensor>& pv,
                               const Tensor& out, const Tensor& lse, double scale,
                               const optional<Tensor>& bias, const optional<Tensor>& prompt_index,
                               const optional<Tensor>& dqkv) {
  const char* fn = "vpt_fast.attention_bwd";
  check_attention(fn, q, k, v, pk, pv, bias, prompt_index);
  check_backward(fn, dout, q, out, lse);
  check_index_values(fn, prompt_index, pk);
  if (dqkv.has_value()) check_dqkv(fn, *dqkv, q, k);
  return op_outputs(attention_bwd_cpu(dout, q, k, v, nonempty(pk), nonempty(pv), out, lse, scale,
                                      bias, prompt_index, qkv_grad_views(dqkv)),
                    q, pk, pv, dqkv);
}

#ifdef VPT_FAST_WITH_CUDA
void check_cuda_capability(const char* fn, const Tensor& q) {
  if (q.scalar_type() == at::kFloat) return;
  int dev = q.device().index(), major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK_NOT_IMPLEMENTED(major >= 8, fn, ": ", q.scalar_type(),
                              " attention needs tensor cores of sm_80 or newer, got compute "
                              "capability ", major, ".x (use float32)");
}

std::tuple<Tensor, Tensor> attention_fwd_cuda_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const optional<Tensor>& pk,
                                                 const optional<Tensor>& pv, double scale,
                                                 const optional<Tensor>& bias,
                                                 const optional<Tensor>& prompt_index) {
  const char* fn = "vpt_fast.attention_fwd";
  check_attention(fn, q, k, v, pk, pv, bias, prompt_index);
  check_cuda_capability(fn, q);
  return attention_fwd_cuda(q, k, v, nonempty(pk), nonempty(pv), scale, bias, prompt_index);
}

AttnGrads attention_bwd_cuda_op(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                const optional<Tensor>& pk, const optional<Tensor>& pv,
                                const Tensor& out, const Tensor& lse, double scale,
                                const optional<Tensor>& bias, const optional<Tensor>& prompt_index,
                                const optional<Tensor>& dqkv) {
  const char* fn = "vpt_fast.attention_bwd";
  check_attention(fn, q, k, v, pk, pv, bias, prompt_index);
  check_backward(fn, dout, q, out, lse);
  if (dqkv.has_value()) check_dqkv(fn, *dqkv, q, k);
  check_cuda_capability(fn, q);
  return op_outputs(attention_bwd_cuda(dout, q, k, v, nonempty(pk), nonempty(pv), out, lse, scale,
                                       bias, prompt_index, qkv_grad_views(dqkv)),
                    q, pk, pv, dqkv);
}
#endif

}  // namespace
}  // namespace vpt_fast

TORCH_LIBRARY(vpt_fast, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? pk, Tensor? pv, float scale, "
        "Tensor? bias=None, Tensor? prompt_index=None) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? pk, Tensor? pv, "
        "Tensor out, Tensor lse, float scale, Tensor? bias=None, Tensor? prompt_index=None, "
        "Tensor(a!)? dqkv=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vpt_fast, CPU, m) {
  m.impl("attention_fwd", &vpt_fast::attention_fwd_cpu_op);
  m.impl("attention_bwd", &vpt_fast::attention_bwd_cpu_op);
}

#ifdef VPT_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(vpt_fast, CUDA, m) {
  m.impl("attention_fwd", &vpt_fast::attention_fwd_cuda_op);
  m.impl("attention_bwd", &vpt_fast::attention_bwd_cuda_op);
}
#endif

// Build facts for vpt_fast.backends.cuda_impl.ext_info().
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vpt_fast C++/CUDA extension: torch.ops.vpt_fast.attention_fwd / attention_bwd";
#ifdef VPT_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_version") = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string((CUDART_VERSION % 1000) / 10);
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_version") = pybind11::none();
#endif
  m.attr("archs") = std::string(VPT_FAST_ARCHS);
  m.attr("torch_version") = VPT_FAST_TORCH_VERSION;
}
