// Backward launchers of the tensor-core prompt-aware FlashAttention (kernels: attention_kernels.cuh):
// delta = rowsum(dout * out), the dQ kernel (per query tile), the dK/dV kernel over own keys (per
// key tile) and over prompt keys (per key tile, prompt set and split of its query batches, fp32
// partials that attention_cuda.cu reduces in a fixed order); bf16/fp16 x head dims {32, 64, 80, 128}.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "attention_kernels.cuh"

namespace vpt_fast {
namespace {

template <typename T, int D>
void run_bwd(const AttnParams& p) {
  using C = kern::BwdCfg<T, D>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = (int64_t)p.B * p.H * p.Nq;
  kern::bwd_delta_kernel<T><<<(unsigned)((rows + kern::kWarps - 1) / kern::kWarps), kern::kThreads, 0,
                              stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto dq_kernel = kern::bwd_dq_tc_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(C::bytes)));
  dq_kernel<<<dim3(p.B * p.H, kern::ceil_div(p.Nq, C::BR)), kern::kThreads, C::bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (p.Nk > 0) {
    auto own_kernel = kern::bwd_dkdv_tc_kernel<T, D, false>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(own_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(C::bytes)));
    own_kernel<<<dim3(p.B * p.H, kern::ceil_div(p.Nk, C::BR)), kern::kThreads, C::bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.P > 0) {
    auto prompt_kernel = kern::bwd_dkdv_tc_kernel<T, D, true>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(prompt_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(C::bytes)));
    const int units = p.S * p.prompt_split;  // (prompt set, split) pairs
    prompt_kernel<<<dim3(units * p.H, kern::ceil_div(p.P, C::BR)), kern::kThreads, C::bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void dispatch_bwd(const AttnParams& p) {
  switch (p.d) {
    case 32: return run_bwd<T, 32>(p);
    case 64: return run_bwd<T, 64>(p);
    case 80: return run_bwd<T, 80>(p);
    case 128: return run_bwd<T, 128>(p);
    default: TORCH_CHECK_VALUE(false, "vpt_fast.attention_bwd: unsupported head dim on CUDA: ", p.d);
  }
}

}  // namespace

void launch_attention_bwd_tc(const AttnParams& p, bool bf16) {
  if (bf16) dispatch_bwd<__nv_bfloat16>(p);
  else dispatch_bwd<__half>(p);
}

}  // namespace vpt_fast
