#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dispatch.h"
#include "sae/sae.h"

namespace mechinterp::sae {

namespace {

constexpr int kThreads = static_cast<int>(kCudaThreads);
constexpr int kItems = static_cast<int>(kCudaItems);
constexpr int kSegment = static_cast<int>(kCudaSegment);
constexpr int kCandidates = static_cast<int>(kCudaCandidates);
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ std::uint32_t float_key(float f) {
  const std::uint32_t bits = __float_as_uint(f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_float(std::uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Exclusive prefix sum of one int per thread over the block, in thread order; *total gets the
// sum. Every thread of the block must call it.
__device__ int block_exclusive_scan(int value, int* warp_totals, int* total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int inclusive = value;
  for (int delta = 1; delta < 32; delta <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, delta);
    if (lane >= delta) inclusive += up;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int t = lane < kWarps ? warp_totals[lane] : 0;
    for (int delta = 1; delta < 32; delta <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, t, delta);
      if (lane >= delta) t += up;
    }
    if (lane < kWarps) warp_totals[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  const int before = (warp == 0 ? 0 : warp_totals[warp - 1]) + inclusive - value;
  *total = warp_totals[kWarps - 1];
  __syncthreads();  // warp_totals may be reused right after
  return before;
}

__device__ int block_sum(int value, int* warp_totals) {
  int total;
  block_exclusive_scan(value, warp_totals, &total);
  return total;
}

// Values per 16-byte load.
template <typename T, bool kVector>
struct Loads {
  static constexpr int kWidth = kVector ? static_cast<int>(16 / sizeof(T)) : 1;
  static constexpr int kCount = kItems / kWidth;
};

// kWidth adjacent values from column base on: one 16-byte load when they all exist, else one
// at a time, with zeros past the end.
template <typename T, bool kVector>
__device__ __forceinline__ void load_run(const T* in, int base, int cols,
                                         T (&buf)[Loads<T, kVector>::kWidth]) {
  constexpr int kWidth = Loads<T, kVector>::kWidth;
  if (kVector && base + kWidth <= cols) {
    *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(in + base);
  } else {
#pragma unroll
    for (int v = 0; v < kWidth; ++v) buf[v] = base + v < cols ? in[base + v] : T(0.0f);
  }
}

// Load this thread's items of a segment: item (j, v) is column (j kThreads + t) kWidth + v, so a
// warp's loads are adjacent. Columns past the end read as zero.
template <typename T, bool kVector>
__device__ __forceinline__ void load_strided(const T* in, int cols, float (&x)[kItems]) {
  using L = Loads<T, kVector>;
#pragma unroll
  for (int j = 0; j < L::kCount; ++j) {
    const int base = (j * kThreads + static_cast<int>(threadIdx.x)) * L::kWidth;
    T buf[L::kWidth];
    load_run<T, kVector>(in, base, cols, buf);
#pragma unroll
    for (int v = 0; v < L::kWidth; ++v) x[j * L::kWidth + v] = to_float(buf[v]);
  }
}

template <typename T, bool kVector>
__device__ __forceinline__ int strided_column(int item) {
  using L = Loads<T, kVector>;
  return ((item / L::kWidth) * kThreads + static_cast<int>(threadIdx.x)) * L::kWidth +
         item % L::kWidth;
}

// One block per (row, segment). Keys of the segment's values stay in registers. The k-th largest
// of the 256 thread maxima bounds the k-th largest value from below (those k maxima are k
// values), so the values at or above it are few, about k for smooth data; they go to shared
// memory and are ranked there exactly. When too many pass (heavy ties), the exact k-th key is
// found by bisection over the key bits instead, and ties are taken in column order.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    SelectTopkKernel(const T* __restrict__ values, float* __restrict__ out_values,
                     std::int32_t* __restrict__ out_index, SelectParams p) {
  __shared__ std::uint32_t s_max[kThreads];
  __shared__ std::uint32_t s_key[kCandidates];
  __shared__ std::int32_t s_index[kCandidates];
  __shared__ int s_warp[kWarps];
  __shared__ std::uint32_t s_bar;
  __shared__ int s_count;

  const std::int64_t row = blockIdx.x / p.segments;
  const std::int64_t segment = blockIdx.x - row * p.segments;
  const std::int64_t first = segment * kSegment;
  const int cols = static_cast<int>(min(static_cast<std::int64_t>(kSegment), p.cols - first));
  const std::int32_t* in_index = p.index ? p.index + row * p.index_row_stride + first : nullptr;
  const int k = static_cast<int>(p.k);

  float x[kItems];
  load_strided<T, kVector>(values + row * p.row_stride + first, cols, x);
  std::uint32_t key[kItems];
  std::uint32_t thread_max = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = strided_column<T, kVector>(i);
    bool valid = c < cols;
    float v = x[i];
    if (valid && p.bias) v += p.bias[first + c];
    if (valid && p.scale) v *= p.scale[first + c];
    if (valid && in_index) valid = in_index[c] >= 0;  // padding of an earlier selection
    // Key 0 marks "no value": every real float maps above it but a negative NaN with a full
    // payload, which ranks last anyway.
    key[i] = valid ? float_key(v) : 0u;
    thread_max = max(thread_max, key[i]);
  }
  // Sort each warp's 32 maxima in descending order (a bitonic network over shuffles), so that a
  // maximum's count of maxima at or above it takes a binary search per warp, not 256 reads.
  const int lane = threadIdx.x % 32;
  std::uint32_t sorted = thread_max;
  for (int size = 2; size <= 32; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const std::uint32_t other = __shfl_xor_sync(0xffffffffu, sorted, stride);
      const bool keep_larger = ((lane & stride) == 0) == ((lane & size) == 0);
      sorted = keep_larger ? max(sorted, other) : min(sorted, other);
    }
  }
  s_max[threadIdx.x] = sorted;
  if (threadIdx.x == 0) {
    s_bar = 0;
    s_count = 0;
  }
  __syncthreads();

  int at_least = 0;
  for (int w = 0; w < kWarps; ++w) {
    const std::uint32_t* list = s_max + w * 32;
    int lo = 0;
    int hi = 32;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (list[mid] >= sorted) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    at_least += lo;
  }
  if (at_least >= k) atomicMax(&s_bar, sorted);
  __syncthreads();
  const std::uint32_t bar = s_bar;

  auto global_index = [&](int item) -> std::int32_t {
    const int c = strided_column<T, kVector>(item);
    return in_index ? in_index[c] : static_cast<std::int32_t>(p.col_offset + first + c);
  };
  auto push = [&](int item) {
    const int slot = atomicAdd(&s_count, 1);
    if (slot < kCandidates) {
      s_key[slot] = key[item];
      s_index[slot] = global_index(item);
    }
  };

#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (key[i] != 0u && key[i] >= bar) push(i);
  }
  __syncthreads();
  int held = s_count;

  if (held > kCandidates) {
    // Bisection: the largest key with at least k values at or above it is the k-th largest.
    std::uint32_t kth = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const std::uint32_t trial = kth | (1u << bit);
      int count = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) count += key[i] >= trial;
      if (block_sum(count, s_warp) >= k) kth = trial;
    }
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (key[i] != 0u && key[i] > kth) push(i);
    }
    __syncthreads();
    const int above = s_count;  // < k
    int taken = 0;
    // Ties at the k-th key, lowest columns first: columns run in (load, thread, lane) order.
    using L = Loads<T, kVector>;
#pragma unroll
    for (int j = 0; j < L::kCount; ++j) {
      // Uniform over the block, so every thread reaches the scan or none does. The loop stays
      // unrolled: a run-time index into key[] would move it out of registers.
      if (kth == 0u || above + taken >= k) break;
      int ties = 0;
#pragma unroll
      for (int v = 0; v < L::kWidth; ++v) ties += key[j * L::kWidth + v] == kth;
      int total;
      int rank = block_exclusive_scan(ties, s_warp, &total);
#pragma unroll
      for (int v = 0; v < L::kWidth; ++v) {
        const int item = j * L::kWidth + v;
        if (key[item] != kth) continue;
        const int slot = above + taken + rank++;
        if (slot < k) {
          s_key[slot] = kth;
          s_index[slot] = global_index(item);
        }
      }
      taken += total;
    }
    __syncthreads();
    held = min(above + taken, k);
  }

  // Rank each candidate among the others: descending key, then ascending index. The order is
  // total, so the ranks below k fill the output once each.
  float* out_v = out_values + row * p.out_row_stride + segment * p.k;
  std::int32_t* out_i = out_index + row * p.out_row_stride + segment * p.k;
  for (int c = threadIdx.x; c < held; c += kThreads) {
    const std::uint32_t ck = s_key[c];
    const std::int32_t ci = s_index[c];
    int rank = 0;
    for (int o = 0; o < held; ++o) {
      const std::uint32_t ok = s_key[o];
      rank += (ok > ck) || (ok == ck && s_index[o] < ci);
    }
    if (rank < k) {
      out_v[rank] = key_float(ck);
      out_i[rank] = ci;
    }
  }
  for (int r = held + static_cast<int>(threadIdx.x); r < k; r += kThreads) {
    out_v[r] = __int_as_float(0xff800000);  // -inf
    out_i[r] = -1;
  }
}

// One block per (row, segment); thread t owns 32 adjacent columns so that one scan puts the
// survivors in column order.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    SelectThresholdKernel(const T* __restrict__ values, float* __restrict__ out_values,
                          std::int32_t* __restrict__ out_index,
                          std::int32_t* __restrict__ out_count, SelectParams p) {
  __shared__ int s_warp[kWarps];
  using L = Loads<T, kVector>;
  const std::int64_t row = blockIdx.x / p.segments;
  const std::int64_t segment = blockIdx.x - row * p.segments;
  const std::int64_t first = segment * kSegment;
  const int cols = static_cast<int>(min(static_cast<std::int64_t>(kSegment), p.cols - first));
  const T* in = values + row * p.row_stride + first;
  const int begin = static_cast<int>(threadIdx.x) * kItems;

  float value[kItems];
  std::uint64_t passed = 0;
  int count = 0;
#pragma unroll
  for (int j = 0; j < L::kCount; ++j) {
    const int base = begin + j * L::kWidth;
    T buf[L::kWidth];
    load_run<T, kVector>(in, base, cols, buf);
#pragma unroll
    for (int v = 0; v < L::kWidth; ++v) {
      const int item = j * L::kWidth + v;
      const int c = base + v;
      value[item] = 0.0f;
      if (c >= cols) continue;
      const std::int64_t g = first + c;
      const float h = to_float(buf[v]);
      const float pre = p.bias ? h + p.bias[g] : h;
      if (!(pre > (p.threshold ? p.threshold[g] : 0.0f))) continue;
      const float out = p.mag_scale ? fmaxf(h * p.mag_scale[g] + p.mag_bias[g], 0.0f) : pre;
      if (!(out > 0.0f)) continue;
      value[item] = out;
      passed |= std::uint64_t{1} << item;
      ++count;
    }
  }
  int total;
  int slot = block_exclusive_scan(count, s_warp, &total);
  const std::int64_t cell = row * p.segments + segment;
  float* out_v = out_values + cell * p.cap;
  std::int32_t* out_i = out_index + cell * p.cap;
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    if (!(passed & (std::uint64_t{1} << item))) continue;
    if (slot < p.cap) {
      out_v[slot] = value[item];
      out_i[slot] = static_cast<std::int32_t>(p.col_offset + first + begin + item);
    }
    ++slot;
  }
  if (threadIdx.x == 0) out_count[cell] = total;
}

template <typename T>
bool can_load_vectors(const T* values, std::int64_t row_stride) {
  constexpr std::int64_t width = 16 / sizeof(T);
  return reinterpret_cast<std::uintptr_t>(values) % 16 == 0 && row_stride % width == 0;
}

unsigned blocks_for(const SelectParams& p, const char* op) {
  const std::int64_t blocks = p.rows * p.segments;
  MECHINTERP_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": at most ",
                   std::numeric_limits<int>::max(), " (row, segment) pairs, got ", blocks);
  return static_cast<unsigned>(blocks);
}

}  // namespace

template <typename T>
void launch_select_topk_cuda(const T* values, float* out_values, std::int32_t* out_index,
                             const SelectParams& params, cudaStream_t stream) {
  using device_t = cuda_scalar_t<T>;
  const auto* in = reinterpret_cast<const device_t*>(values);
  const unsigned blocks = blocks_for(params, "select_topk");
  if (can_load_vectors(values, params.row_stride)) {
    SelectTopkKernel<device_t, true>
        <<<blocks, kThreads, 0, stream>>>(in, out_values, out_index, params);
  } else {
    SelectTopkKernel<device_t, false>
        <<<blocks, kThreads, 0, stream>>>(in, out_values, out_index, params);
  }
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template <typename T>
void launch_select_threshold_cuda(const T* values, float* out_values, std::int32_t* out_index,
                                  std::int32_t* out_count, const SelectParams& params,
                                  cudaStream_t stream) {
  using device_t = cuda_scalar_t<T>;
  const auto* in = reinterpret_cast<const device_t*>(values);
  const unsigned blocks = blocks_for(params, "select_threshold");
  if (can_load_vectors(values, params.row_stride)) {
    SelectThresholdKernel<device_t, true>
        <<<blocks, kThreads, 0, stream>>>(in, out_values, out_index, out_count, params);
  } else {
    SelectThresholdKernel<device_t, false>
        <<<blocks, kThreads, 0, stream>>>(in, out_values, out_index, out_count, params);
  }
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template void launch_select_topk_cuda<float>(const float*, float*, std::int32_t*,
                                             const SelectParams&, cudaStream_t);
template void launch_select_topk_cuda<Half>(const Half*, float*, std::int32_t*,
                                            const SelectParams&, cudaStream_t);
template void launch_select_topk_cuda<BFloat16>(const BFloat16*, float*, std::int32_t*,
                                                const SelectParams&, cudaStream_t);
template void launch_select_threshold_cuda<float>(const float*, float*, std::int32_t*,
                                                  std::int32_t*, const SelectParams&,
                                                  cudaStream_t);
template void launch_select_threshold_cuda<Half>(const Half*, float*, std::int32_t*,
                                                 std::int32_t*, const SelectParams&,
                                                 cudaStream_t);
template void launch_select_threshold_cuda<BFloat16>(const BFloat16*, float*, std::int32_t*,
                                                     std::int32_t*, const SelectParams&,
                                                     cudaStream_t);

}  // namespace mechinterp::sae
