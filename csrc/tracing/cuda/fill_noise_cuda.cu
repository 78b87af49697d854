#include <cstdint>

#include "common/check.h"
#include "common/dispatch.h"
#include "tracing/tracing.h"

namespace mechinterp::tracing {

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T narrow(double v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half narrow<__half>(double v) {
  return __float2half_rn(static_cast<float>(v));
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) FillNoiseKernel(T* __restrict__ out, NoiseParams p) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(kThreads) + threadIdx.x; i < p.n;
       i += static_cast<std::int64_t>(gridDim.x) * kThreads) {
    out[i] = narrow<T>(noise_value(p.offset + static_cast<std::uint64_t>(i), p.seed, p.kind));
  }
}

}  // namespace

template <typename T>
void launch_fill_noise_cuda(T* out, const NoiseParams& params, cudaStream_t stream) {
  using device_t = cuda_scalar_t<T>;
  const std::int64_t blocks = (params.n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  FillNoiseKernel<device_t><<<grid, kThreads, 0, stream>>>(reinterpret_cast<device_t*>(out),
                                                           params);
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template void launch_fill_noise_cuda<double>(double*, const NoiseParams&, cudaStream_t);
template void launch_fill_noise_cuda<float>(float*, const NoiseParams&, cudaStream_t);
template void launch_fill_noise_cuda<Half>(Half*, const NoiseParams&, cudaStream_t);
template void launch_fill_noise_cuda<BFloat16>(BFloat16*, const NoiseParams&, cudaStream_t);

}  // namespace mechinterp::tracing
