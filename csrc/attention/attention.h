// Prompt-aware attention (DESIGN.md §2.1, executable spec: vpt_fast/backends/torch_impl.py).
//
// Queries of query batch b attend jointly to a prompt segment pk/pv[b / G] (G = B / Bp; Bp == 1 is
// the batch-shared segment of deep VPT, read with batch stride 0) followed by the sample's own
// keys k/v[b]. Joint key index j: j < P is prompt key j, j >= P is own key j - P. An optional bias
// (nB, H, Nq, Nk) is added to own-key scores only (query batch b reads bias[b % nB]).
//
// Host-side declarations shared by bindings.cpp (argument checks, dispatch), the CPU twin
// attention_cpu.cpp and the CUDA kernels attention_{cuda,fwd,bwd}.cu.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace vpt_fast {

// Everything a kernel needs; strides are in elements (batch, head, row; the last dim has stride 1).
struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* pk = nullptr;  // nullptr when P == 0
  const void* pv = nullptr;
  const float* bias = nullptr;  // float32 contiguous (nB, H, Nq, Nk) or nullptr
  void* out = nullptr;
  float* lse = nullptr;  // (B, H, Nq) contiguous, natural log

  int64_t q_bs = 0, q_hs = 0, q_rs = 0;
  int64_t k_bs = 0, k_hs = 0, k_rs = 0;
  int64_t v_bs = 0, v_hs = 0, v_rs = 0;
  int64_t pk_bs = 0, pk_hs = 0, pk_rs = 0;
  int64_t pv_bs = 0, pv_hs = 0, pv_rs = 0;
  int64_t o_bs = 0, o_hs = 0, o_rs = 0;

  // backward only
  const void* dout = nullptr;
  int64_t do_bs = 0, do_hs = 0, do_rs = 0;
  float* delta = nullptr;  // (B, H, Nq) contiguous: rowsum(dout * out)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_bs = 0, dq_hs = 0, dq_rs = 0;
  int64_t dk_bs = 0, dk_hs = 0, dk_rs = 0;
  int64_t dv_bs = 0, dv_hs = 0, dv_rs = 0;
  float* dpk_acc = nullptr;  // float32 contiguous (Bp, H, P, d), zero-initialised, atomics
  float* dpv_acc = nullptr;

  int B = 0, H = 0, Nq = 0, Nk = 0, P = 0, d = 0;
  int G = 1;   // query batches per prompt batch: B / Bp
  int nB = 1;  // bias batches
  float scale = 1.f;
  bool vec = false;  // every base pointer 16-byte aligned and every stride a multiple of 16 bytes
};

// CPU twin (attention_cpu.cpp): exact, float32/float64 accumulation, at::parallel_for.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& pk,
                                                     const std::optional<at::Tensor>& pv,
                                                     double scale,
                                                     const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv, const at::Tensor& out,
    const at::Tensor& lse, double scale, const std::optional<at::Tensor>& bias);

#ifdef VPT_FAST_WITH_CUDA
// CUDA (attention_cuda.cu): tensors already checked by bindings.cpp.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& pk,
                                                      const std::optional<at::Tensor>& pv,
                                                      double scale,
                                                      const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& pk, const std::optional<at::Tensor>& pv, const at::Tensor& out,
    const at::Tensor& lse, double scale, const std::optional<at::Tensor>& bias);

// Tensor-core kernels (attention_fwd.cu / attention_bwd.cu), T in {half, bf16}, D in {32,64,80,128}.
void launch_attention_fwd_tc(const AttnParams& p, bool bf16);
void launch_attention_bwd_tc(const AttnParams& p, bool bf16);
#endif

// (B, H, N, d) tensor whose memory is laid out (B, N, H, d): `x.transpose(1, 2).reshape(B, N, H*d)`
// is then free, as the attention output is consumed by the projection.
inline at::Tensor empty_bnhd(int64_t B, int64_t H, int64_t N, int64_t d, const at::TensorOptions& o) {
  return at::empty({B, N, H, d}, o).transpose(1, 2);
}

}  // namespace vpt_fast
