// CUDA launches of the grouped_conv3x3 direct kernels (bodies and design notes in
// grouped_conv_kernels.h): each kernel runs its phases with __syncthreads() between them.
// Only c10's CUDA headers, as in bn_act_cuda.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "grouped_conv.h"

namespace engine {
namespace {

template <typename T, int CG, bool TRANSPOSED, int STRIDE, bool PROLOGUE>
__global__ void __launch_bounds__(direct::kThreads) direct_conv_kernel(const direct::ConvArgs<T> a) {
  extern __shared__ float smem[];
  direct::conv_load_weights<T, CG, TRANSPOSED>(a, blockIdx.y, threadIdx.x, blockDim.x, smem);
  __syncthreads();
  const direct::RowStats<CG> stats =
      direct::conv_rows<T, CG, TRANSPOSED, STRIDE, PROLOGUE>(a, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x, smem);
  if (a.part == nullptr) return;
  // The weights' shared memory now holds each thread's statistics.
  __syncthreads();
  direct::conv_share_stats<CG>(stats, threadIdx.x, smem);
  __syncthreads();
  direct::conv_write_stats<T, CG>(a, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x, smem);
}

template <typename T, int CG, int TAPS>
__global__ void __launch_bounds__(direct::kThreads) direct_wgrad_kernel(const direct::WgradArgs<T> a) {
  __shared__ float scratch[direct::kThreads * CG];
  const direct::WgradSums<CG, TAPS> sums =
      direct::wgrad_rows<T, CG, TAPS>(a, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, blockDim.x);
  // Unrolled, so that the sums stay in registers (constant indices).
#pragma unroll
  for (int t = 0; t < TAPS; ++t) {
#pragma unroll
    for (int o = 0; o < CG; ++o) {
      direct::wgrad_share<CG, TAPS>(sums, t, o, threadIdx.x, scratch);
      __syncthreads();
      direct::wgrad_write<T, CG, TAPS>(a, blockIdx.x, blockIdx.y, blockIdx.z, t, o, threadIdx.x, blockDim.x,
                                       scratch);
      __syncthreads();
    }
  }
}

struct CudaBlocks {
  using Guard = c10::cuda::CUDAGuard;

  // Blocks of the weight gradient kernel the device runs at once, as the occupancy API
  // computes them from its registers and shared memory (2 per SM at width 8, not 4).
  template <typename T, int CG, int TAPS>
  static int64_t wgrad_resident_blocks(const at::Tensor& t) {
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, direct_wgrad_kernel<T, CG, TAPS>,
                                                                 direct::kThreads, 0));
    return static_cast<int64_t>(sms) * per_sm;
  }

  template <typename T, int CG, bool TRANSPOSED, int STRIDE, bool PROLOGUE>
  static void conv(const direct::ConvArgs<T>& a, int group_chunks) {
    const size_t smem = sizeof(float) * direct::conv_shared_floats(CG, direct::kThreads);
    const dim3 grid(static_cast<unsigned>(a.tiles), static_cast<unsigned>(group_chunks));
    direct_conv_kernel<T, CG, TRANSPOSED, STRIDE, PROLOGUE>
        <<<grid, direct::kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, int CG, int TAPS>
  static void wgrad(const direct::WgradArgs<T>& a, const direct::WgradPlan& plan) {
    const dim3 grid(static_cast<unsigned>(plan.tap_chunks), static_cast<unsigned>(plan.splits),
                    static_cast<unsigned>(plan.group_chunks));
    direct_wgrad_kernel<T, CG, TAPS><<<grid, direct::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace engine

TORCH_LIBRARY_IMPL(engine, CUDA, m) {
  m.impl("grouped_conv3x3_fwd", &engine::direct_conv_fwd<engine::CudaBlocks>);
  m.impl("grouped_conv3x3_dgrad", &engine::direct_conv_dgrad<engine::CudaBlocks>);
  m.impl("grouped_conv3x3_wgrad", &engine::direct_conv_wgrad<engine::CudaBlocks>);
}
