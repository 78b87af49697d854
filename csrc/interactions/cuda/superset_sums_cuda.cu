#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "interactions/cuda/tile.cuh"
#include "interactions/interactions.h"

namespace mechinterp::interactions {

namespace {

// A fixed block size and a fixed reduction tree make every run add the same numbers in the same
// order, so results are bit-reproducible; no float atomics anywhere.
constexpr int kThreads = 1 << (kLowBits - kRegisterBits);  // 256: 16 entries each per block
constexpr int kWarps = kThreads / 32;
constexpr int kReduceBlocks = 1 << 16;

__device__ __forceinline__ double warp_sum(double v) {
  for (int delta = 16; delta > 0; delta >>= 1) v += __shfl_down_sync(0xffffffffu, v, delta);
  return v;
}

// Step 1, one block of 2^kLowBits entries per high coalition (blockIdx.x): for each output size
// t, the entries weighted by weights[|S|, t] and summed over supersets within the block, in three
// register rounds (bits 8..11, 0..3, 4..7, as the Moebius transform's first sweep). The sums of
// the low patterns of at most t players go to scratch[column][high].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SupersetBlockKernel(const T* __restrict__ dividends, const double* __restrict__ weights,
                        T* __restrict__ scratch, SupersetParams p) {
  __shared__ T tile[padded_tile_size<kLowBits>()];
  const std::uint32_t thread = threadIdx.x;
  const std::int64_t high = blockIdx.x;
  const int high_players = popcount(static_cast<std::uint64_t>(high));
  const T* source = dividends + (high << kLowBits);
  T values[kPerThread];
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) values[r] = source[tile_index(thread, r, 8)];
  std::int64_t column = 0;
  for (int t = 0; t <= p.order; ++t) {
    T x[kPerThread];
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int size = high_players + popcount(tile_index(thread, r, 8));
      x[r] = values[r] * static_cast<T>(weights[size * (p.order + 1) + t]);
    }
    register_butterflies<T, true, false>(x, 8, 0, kLowBits);
    if (t > 0) __syncthreads();  // the previous size's last round has read the tile
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) tile[padded(tile_index(thread, r, 8))] = x[r];
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) x[r] = tile[padded(tile_index(thread, r, 0))];
    register_butterflies<T, true, false>(x, 0, 0, kLowBits);
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) tile[padded(tile_index(thread, r, 0))] = x[r];
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) x[r] = tile[padded(tile_index(thread, r, 4))];
    register_butterflies<T, true, false>(x, 4, 0, kLowBits);
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const std::uint32_t low = tile_index(thread, r, 4);
      if (popcount(low) <= t) {
        const std::int64_t at = column + canonical_rank(low, kLowBits);
        scratch[(at << p.high_bits) + high] = x[r];
      }
    }
    column += count_up_to(kLowBits, t);
  }
}

// Step 2, one output per block (grid-stride): its low part's partial sums over every high
// coalition that contains its high part, added in float64.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SupersetReduceKernel(const T* __restrict__ scratch, T* __restrict__ out, SupersetParams p) {
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (std::int64_t output = blockIdx.x; output < p.outputs; output += gridDim.x) {
    int t = 0;
    std::int64_t rank = output;
    while (rank >= binomial(p.n, t)) rank -= binomial(p.n, t++);
    const std::uint64_t mask = lex_unrank(rank, p.n, t);
    const std::uint64_t low = mask & ((std::uint64_t{1} << p.low_bits) - 1);
    const std::uint64_t high = mask >> p.low_bits;
    const std::int64_t column = column_base(p.low_bits, t) + canonical_rank(low, p.low_bits);
    const T* row = scratch + (column << p.high_bits);
    const std::int64_t free_count = std::int64_t{1} << (p.high_bits - popcount(high));
    double sum = 0.0;
    for (std::int64_t c = threadIdx.x; c < free_count; c += kThreads) {
      sum += static_cast<double>(row[spread_around(static_cast<std::uint64_t>(c), high) | high]);
    }
    sum = warp_sum(sum);
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    if (warp == 0) {
      sum = lane < kWarps ? warp_sums[lane] : 0.0;
      sum = warp_sum(sum);
      if (lane == 0) out[output] = static_cast<T>(sum);
    }
    __syncthreads();  // warp_sums is free for the next output
  }
}

// Tables of fewer than 2^kLowBits entries: one block does everything in shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SupersetSmallKernel(const T* __restrict__ dividends, const double* __restrict__ weights,
                        T* __restrict__ out, SupersetParams p) {
  __shared__ T values[1 << (kLowBits - 1)];
  __shared__ T sums[1 << (kLowBits - 1)];
  const int size = 1 << p.n;
  for (int i = threadIdx.x; i < size; i += kThreads) values[i] = dividends[i];
  std::int64_t first_output = 0;
  for (int t = 0; t <= p.order; ++t) {
    __syncthreads();
    for (int i = threadIdx.x; i < size; i += kThreads) {
      sums[i] = values[i] * static_cast<T>(weights[popcount(i) * (p.order + 1) + t]);
    }
    for (int player = 0; player < p.n; ++player) {
      __syncthreads();
      const int bit = 1 << player;
      for (int pair = threadIdx.x; pair < size / 2; pair += kThreads) {
        const int lo = ((pair & ~(bit - 1)) << 1) | (pair & (bit - 1));
        sums[lo] += sums[lo | bit];
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < size; i += kThreads) {
      if (popcount(i) == t) out[first_output + lex_rank(i, p.n)] = sums[i];
    }
    first_output += binomial(p.n, t);
  }
}

}  // namespace

template <typename T>
void launch_superset_weighted_sums_cuda(const T* dividends, const double* weights,
                                        acc_t<T>* scratch, T* out, const SupersetParams& p,
                                        cudaStream_t stream) {
  if (p.n < kLowBits) {
    SupersetSmallKernel<T><<<1, kThreads, 0, stream>>>(dividends, weights, out, p);
    MECHINTERP_CUDA_LAUNCH_CHECK();
    return;
  }
  SupersetBlockKernel<T><<<static_cast<unsigned>(std::int64_t{1} << p.high_bits), kThreads, 0,
                           stream>>>(dividends, weights, scratch, p);
  MECHINTERP_CUDA_LAUNCH_CHECK();
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(p.outputs, kReduceBlocks));
  SupersetReduceKernel<T><<<blocks, kThreads, 0, stream>>>(scratch, out, p);
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template void launch_superset_weighted_sums_cuda<double>(const double*, const double*, double*,
                                                         double*, const SupersetParams&,
                                                         cudaStream_t);
template void launch_superset_weighted_sums_cuda<float>(const float*, const double*, float*,
                                                        float*, const SupersetParams&,
                                                        cudaStream_t);

}  // namespace mechinterp::interactions
