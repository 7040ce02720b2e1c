// Forward launchers of the tensor-core prompt-aware FlashAttention (kernels: attention_kernels.cuh):
// bf16/fp16 x head dims {32, 64, 80, 128} = 8 instantiations.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "attention_kernels.cuh"

namespace vpt_fast {
namespace {

template <typename T, int D>
void run_fwd(const AttnParams& p) {
  using C = kern::FwdCfg<T, D>;
  auto kernel = kern::fwd_tc_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(C::bytes)));
  const dim3 grid(p.B * p.H, kern::ceil_div(p.Nq, C::BM));
  kernel<<<grid, kern::kThreads, C::bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_fwd(const AttnParams& p) {
  switch (p.d) {
    case 32: return run_fwd<T, 32>(p);
    case 64: return run_fwd<T, 64>(p);
    case 80: return run_fwd<T, 80>(p);
    case 128: return run_fwd<T, 128>(p);
    default: TORCH_CHECK_VALUE(false, "vpt_fast.attention_fwd: unsupported head dim on CUDA: ", p.d);
  }
}

}  // namespace

void launch_attention_fwd_tc(const AttnParams& p, bool bf16) {
  if (bf16) dispatch_fwd<__nv_bfloat16>(p);
  else dispatch_fwd<__half>(p);
}

}  // namespace vpt_fast
