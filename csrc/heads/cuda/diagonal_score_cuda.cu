#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dispatch.h"
#include "heads/heads.h"

namespace mechinterp::heads {

namespace {

// A fixed block size and a fixed reduction tree make every run add the same numbers in the same
// order, so results are bit-reproducible; no float atomics anywhere.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
  return v;
}

// One block per head. The diagonal is strided in memory whatever the layout, so reads cannot
// coalesce; the (batch, query) items are flattened so that short sequences still keep every
// thread of the block busy.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    DiagonalScoreKernel(const T* __restrict__ pattern, Acc* __restrict__ out,
                        DiagonalScoreParams p) {
  const std::int64_t h = blockIdx.x;
  const std::int64_t per_row = p.query - p.q_begin;
  const std::int64_t items = p.batch * per_row;
  const std::int64_t diag_step = p.stride_query + p.stride_key;
  const T* base = pattern + h * p.stride_head + p.q_begin * p.stride_query +
                  (p.q_begin - p.offset) * p.stride_key;

  Acc sum = 0;
  for (std::int64_t i = threadIdx.x; i < items; i += kThreads) {
    const std::int64_t b = i / per_row;
    const std::int64_t j = i - b * per_row;
    sum += to_acc<Acc>(base[b * p.stride_batch + j * diag_step]);
  }

  __shared__ Acc warp_sums[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  sum = warp_sum(sum);
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = lane < kWarps ? warp_sums[lane] : Acc(0);
    sum = warp_sum(sum);
    if (lane == 0) out[h] = sum / (static_cast<Acc>(p.batch) * static_cast<Acc>(per_row));
  }
}

}  // namespace

template <typename T>
void launch_diagonal_score_cuda(const T* pattern, acc_t<T>* out, const DiagonalScoreParams& params,
                                cudaStream_t stream) {
  MECHINTERP_CHECK(params.heads <= std::numeric_limits<int>::max(),
                   "diagonal_score: CUDA kernel supports at most ",
                   std::numeric_limits<int>::max(), " heads, got ", params.heads);
  using device_t = cuda_scalar_t<T>;
  DiagonalScoreKernel<device_t, acc_t<T>>
      <<<static_cast<unsigned>(params.heads), kThreads, 0, stream>>>(
          reinterpret_cast<const device_t*>(pattern), out, params);
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template void launch_diagonal_score_cuda<double>(const double*, double*,
                                                 const DiagonalScoreParams&, cudaStream_t);
template void launch_diagonal_score_cuda<float>(const float*, float*, const DiagonalScoreParams&,
                                                cudaStream_t);
template void launch_diagonal_score_cuda<Half>(const Half*, float*, const DiagonalScoreParams&,
                                               cudaStream_t);
template void launch_diagonal_score_cuda<BFloat16>(const BFloat16*, float*,
                                                   const DiagonalScoreParams&, cudaStream_t);

}  // namespace mechinterp::heads
