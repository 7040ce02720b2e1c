// Prompt-aware attention (docs/design.md §2.1, executable spec: vpt_fast/backends/torch_impl.py).
//
// Queries of query batch b attend jointly to a prompt segment pk/pv[set(b)] followed by the
// sample's own keys k/v[b]; pk/pv hold S prompt sets (S, H, P, d). set(b) = prompt_index[b] with a
// prompt-set index (int64 (B,), e.g. one task per sample; read inside the kernels, no gathered
// copy), else b / G with G = B / S (S == 1 is the batch-shared segment of deep VPT, read with batch
// stride 0). Joint key index j: j < P is prompt key j, j >= P is own key j - P. An optional bias
// (nB, H, Nq, Nk) is added to own-key scores only (query batch b reads bias[b % nB]).
//
// Backward: dpk/dpv (S, H, P, d), each set the sum over the query batches that read it, added in a
// fixed order (bitwise reproducible, no atomics; zeros for a set no batch reads). dq/dk/dv are
// fresh (B, H, N, d) views of (B, N, H, d) buffers, or written into the caller's `dq`, `dk`, `dv`
// views (the qkv-gradient buffer, any strides with a unit last stride).
//
// Host-side declarations shared by bindings.cpp (argument checks, dispatch), the CPU twin
// attention_cpu.cpp and the CUDA kernels attention_{cuda,fwd,bwd}.cu.
#pragma once

#include <ATen/ATen.h>

#include "attention_params.h"

#include <cstdint>
#include <optional>
#include <tuple>

namespace vpt_fast {

// CPU twin (attention_cpu.cpp): exact, float32/float64 accumulation, at::parallel_for.
// Backward outputs: dq, dk, dv (the given `into` views, or fresh), dpk, dpv (S, H, P, d).
using AttnGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Where the backward writes dq, dk, dv: the views of the caller's qkv-gradient buffer, or none.
struct QkvGradViews {
  at::Tensor dq, dk, dv;
  bool given() const { return dq.defined(); }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& pk,
                                                     const std::optional<at::Tensor>& pv,
                                                     double scale,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& prompt_index);

AttnGrads attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& pk,
                            const std::optional<at::Tensor>& pv, const at::Tensor& out,
                            const at::Tensor& lse, double scale,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& prompt_index, const QkvGradViews& into);

#ifdef VPT_FAST_WITH_CUDA
// CUDA (attention_cuda.cu): tensors already checked by bindings.cpp.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& pk,
                                                      const std::optional<at::Tensor>& pv,
                                                      double scale,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& prompt_index);

AttnGrads attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const std::optional<at::Tensor>& pk,
                             const std::optional<at::Tensor>& pv, const at::Tensor& out,
                             const at::Tensor& lse, double scale,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& prompt_index,
                             const QkvGradViews& into);

#endif

// (B, H, N, d) tensor whose memory is laid out (B, N, H, d): `x.transpose(1, 2).reshape(B, N, H*d)`
// is then free, as the attention output is consumed by the projection.
inline at::Tensor empty_bnhd(int64_t B, int64_t H, int64_t N, int64_t d, const at::TensorOptions& o) {
  return at::empty({B, N, H, d}, o).transpose(1, 2);
}

}  // namespace vpt_fast
