// Device helpers the SAE selector kernels share: order keys of floats, block scans, the loads of
// one (row, segment) of pre-activations into registers, and the exact top-k of a block's keys.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "sae/sae.h"

namespace mechinterp::sae::select_device {

constexpr int kThreads = static_cast<int>(kCudaThreads);
constexpr int kItems = static_cast<int>(kCudaItems);
constexpr int kSegment = static_cast<int>(kCudaSegment);
constexpr int kCandidates = static_cast<int>(kCudaCandidates);
constexpr int kWarps = kThreads / 32;

// Order-preserving map of a float to an unsigned key (see float_key_host). Key 0 marks "no
// value": every real float maps above it but a negative NaN with a full payload.
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

// Stores v rounded to nearest in the output's type.
__device__ __forceinline__ void store_float(float* at, float v) { *at = v; }
__device__ __forceinline__ void store_float(__half* at, float v) { *at = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* at, float v) {
  *at = __float2bfloat16_rn(v);
}

// Inclusive prefix sum of one int per lane over the warp, in lane order. Every lane of the warp
// must call it.
__device__ __forceinline__ int warp_inclusive_sum(int value) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, value, delta);
    if (lane >= delta) value += up;
  }
  return value;
}

// Exclusive prefix sum of one int per thread over the block, in thread order; *total gets the
// sum. Every thread of the block must call it.
__device__ inline int block_exclusive_scan(int value, int* warp_totals, int* total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int inclusive = warp_inclusive_sum(value);
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

__device__ inline int block_sum(int value, int* warp_totals) {
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

// Item (j, v) of a thread is column (j kThreads + t) kWidth + v, so a warp's loads are adjacent
// and columns run in (load, thread, lane) order.
template <typename T, bool kVector>
__device__ __forceinline__ int strided_column(int item) {
  using L = Loads<T, kVector>;
  return ((item / L::kWidth) * kThreads + static_cast<int>(threadIdx.x)) * L::kWidth +
         item % L::kWidth;
}

// The order keys of this thread's items of a segment of cols columns (key 0 past the end and
// where in_index marks padding), with bias and scale applied; returns the thread's largest key.
// bias, scale and in_index start at the segment's first column.
template <typename T, bool kVector>
__device__ __forceinline__ std::uint32_t load_keys(const T* in, int cols, const float* bias,
                                                   const float* scale,
                                                   const std::int32_t* in_index,
                                                   std::uint32_t (&key)[kItems]) {
  using L = Loads<T, kVector>;
  float x[kItems];
#pragma unroll
  for (int j = 0; j < L::kCount; ++j) {
    const int base = (j * kThreads + static_cast<int>(threadIdx.x)) * L::kWidth;
    T buf[L::kWidth];
    load_run<T, kVector>(in, base, cols, buf);
#pragma unroll
    for (int v = 0; v < L::kWidth; ++v) x[j * L::kWidth + v] = to_float(buf[v]);
  }
  std::uint32_t thread_max = 0;
  if (cols == kSegment && !bias && !scale && !in_index) {
    // The common case (a full segment of GEMM output with the bias already in it): nothing to
    // test per item.
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      key[i] = float_key(x[i]);
      thread_max = max(thread_max, key[i]);
    }
    return thread_max;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = strided_column<T, kVector>(i);
    bool valid = c < cols;
    float v = x[i];
    if (valid && bias) v += bias[c];
    if (valid && scale) v *= scale[c];
    if (valid && in_index) valid = in_index[c] >= 0;  // padding of an earlier selection
    key[i] = valid ? float_key(v) : 0u;
    thread_max = max(thread_max, key[i]);
  }
  return thread_max;
}

// The warp's 32 values in descending order over the lanes (a bitonic network over shuffles).
__device__ __forceinline__ std::uint32_t warp_sort_descending(std::uint32_t value) {
  const int lane = threadIdx.x % 32;
  for (int size = 2; size <= 32; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const std::uint32_t other = __shfl_xor_sync(0xffffffffu, value, stride);
      const bool keep_larger = ((lane & stride) == 0) == ((lane & size) == 0);
      value = keep_larger ? max(value, other) : min(value, other);
    }
  }
  return value;
}

// The k-th largest of the block's thread maxima (0 when fewer than k are non-zero), a lower
// bound of the k-th largest key (those k maxima are k values). sorted is this thread's maximum
// after warp_sort_descending, so a maximum's count of maxima at or above it takes one binary
// search per warp. s_max holds kThreads keys.
__device__ inline std::uint32_t kth_thread_max(std::uint32_t sorted, int k, std::uint32_t* s_max,
                                               std::uint32_t* s_bar) {
  s_max[threadIdx.x] = sorted;
  if (threadIdx.x == 0) *s_bar = 0;
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
  if (at_least >= k) atomicMax(s_bar, sorted);
  __syncthreads();
  return *s_bar;
}

// The block's exact k largest keys, ties to the lowest column, handed to push(item, slot) with
// slots 0.. in no particular order; returns how many (k, or fewer when fewer keys are
// non-zero). The k-th key is found by bisection over the key bits, so any number of ties costs
// the same. *s_count is scratch; every thread of the block must call it.
template <typename T, bool kVector, typename Push>
__device__ int push_exact_topk(const std::uint32_t (&key)[kItems], int k, int* s_warp,
                               int* s_count, Push&& push) {
  std::uint32_t kth = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const std::uint32_t trial = kth | (1u << bit);
    int count = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) count += key[i] >= trial;
    if (block_sum(count, s_warp) >= k) kth = trial;
  }
  if (threadIdx.x == 0) *s_count = 0;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (key[i] != 0u && key[i] > kth) push(i, atomicAdd(s_count, 1));
  }
  __syncthreads();
  const int above = *s_count;  // < k
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
      if (slot < k) push(item, slot);
    }
    taken += total;
  }
  __syncthreads();
  return min(above + taken, k);
}

template <typename T>
bool can_load_vectors(const T* values, std::int64_t row_stride) {
  constexpr std::int64_t width = 16 / sizeof(T);
  return reinterpret_cast<std::uintptr_t>(values) % 16 == 0 && row_stride % width == 0;
}

}  // namespace mechinterp::sae::select_device
