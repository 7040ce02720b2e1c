// Kernel parameters of the prompt-aware attention (see attention.h); plain C++ so that the kernel
// translation units need no ATen headers (faster builds).
#pragma once

#include <cstdint>

namespace vpt_fast {

// Everything a kernel needs; strides are in elements (batch, head, row; the last dim has stride 1).
struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* pk = nullptr;  // nullptr when P == 0
  const void* pv = nullptr;
  // (B,) prompt set of each query batch, contiguous; nullptr: query batch b reads set b / G.
  const int64_t* prompt_index = nullptr;
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
  // Prompt-key gradients, reduced without atomics (bitwise reproducible). The query batches that
  // read prompt set s, in a fixed order (set_order[set_offsets[s] + pos], pos < count; without an
  // index: batches s * G + pos, pos < G), are dealt to prompt_split splits round-robin: split j
  // sums the batches at pos = j, j + prompt_split, ... into dpk_part/dpv_part[s * prompt_split + j],
  // float32 contiguous (S * prompt_split, H, P, d); bwd_prompt_reduce_kernel adds the splits in
  // increasing j into dpk/dpv (pk's dtype, (S, H, P, d) with the strides below). A set no batch
  // reads gets exact zeros.
  const int64_t* set_order = nullptr;    // (B,) batches sorted by set (stable), or nullptr
  const int64_t* set_offsets = nullptr;  // (S + 1,) start of each set in set_order
  float* dpk_part = nullptr;
  float* dpv_part = nullptr;
  int prompt_split = 1;
  void* dpk = nullptr;
  void* dpv = nullptr;
  int64_t dpk_bs = 0, dpk_hs = 0, dpk_rs = 0;
  int64_t dpv_bs = 0, dpv_hs = 0, dpv_rs = 0;

  int B = 0, H = 0, Nq = 0, Nk = 0, P = 0, d = 0;
  int S = 1;   // prompt sets: pk.size(0)
  int G = 1;   // query batches per prompt set without an index: B / S
  int nB = 1;  // bias batches
  float scale = 1.f;
  bool vec = false;  // every base pointer 16-byte aligned and every stride a multiple of 16 bytes
};

#ifdef VPT_FAST_WITH_CUDA
// Tensor-core kernels (attention_fwd.cu / attention_bwd.cu), T in {half, bf16}, D in {32,64,80,128}.
void launch_attention_fwd_tc(const AttnParams& p, bool bf16);
void launch_attention_bwd_tc(const AttnParams& p, bool bf16);
#endif

}  // namespace vpt_fast
