// The fused encode's records as compressed rows (see sae/fused_threshold.h): one block a tile
// row, whose warps put the records of 32 record regions at a time in the next free slots of
// their rows, then put each of a row's entries at its rank among the row's columns. An ordered
// sweep per row tile and a count plus scan per (row, tile) were both slower on an H100 (0.7-2.9
// ms and 0.2 ms at 768 x 32768 against 0.1 ms).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "sae/cuda/select_common.cuh"
#include "sae/fused_threshold.h"

namespace mechinterp::sae {

namespace {

constexpr int kTileRowsThreads = 1024;  // a warp for each 32 of a tile row's regions at d_sae 32768

// Sums over a warp's lanes (every lane gets them).
__device__ long long warp_sum(long long v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// One block a tile row. First its rows' ranges: the entries of the tile rows before it are the
// sum of their tile totals (an overflowed tile row keeps none), at most one load a thread for
// the tile rows a block of 128 x 1024 rows holds, and its own rows' counts are scanned by four
// warps; the block writes its rows' running sums, and the summary gets the widest row from every
// block and the entries and overflowed tile rows from the last. (A separate one-block tally
// kernel took 15 us at 16,384 rows on an H100, on the GPU after the GEMM.)
//
// The records of a tile row belong to its kFusedTileM rows alone, so the rows' next free slots
// are counters in shared memory. Each warp places the records of 32 consecutive regions (a
// lane's count each, one warp scan for where each region's records start in the warp's list),
// 32 records a step whatever the regions they come from, so that lanes are not left idle by
// regions of a few records (a handful at realistic densities). Then, with kOrder, a warp a row
// puts each of the row's entries at its rank among the row's columns (the block's writes are
// visible to it after the barrier). At 768 x 32768 (JumpReLU, 16,384 rows, about 31 entries a
// row; H100) the ordered rows took 28-29 us where placing with global atomics and ordering in a
// second kernel took 24 + 10 us, and rows in arrival order 19 us against 24-26 us.
template <bool kOrder>
__global__ void __launch_bounds__(kTileRowsThreads)
    tile_rows_kernel(const std::uint32_t* records, FusedCounts counts, std::int64_t* row_ptr,
                     std::int64_t* summary, std::int32_t* scratch_index,
                     std::uint16_t* scratch_values, std::int64_t* out_index,
                     std::uint16_t* out_values, FusedRowsParams p) {
  constexpr int kWarps = kTileRowsThreads / 32;
  constexpr int kRowWarps = kFusedTileM / 32;
  static_assert(kFusedTileM % 32 == 0 && kRowWarps <= kWarps, "a warp scans 32 rows");
  __shared__ int next[kFusedTileM];            // entries placed so far, per row of the tile row
  __shared__ long long start[kFusedTileM + 1];  // the rows' ranges
  __shared__ long long earlier[kWarps];         // entries of the earlier tile rows, per warp
  __shared__ int flagged[kWarps];               // overflowed earlier tile rows, per warp
  __shared__ int row_sums[kRowWarps];           // entries of each row warp's 32 rows
  __shared__ int widest[kRowWarps];
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % 32;
  const int warp = t / 32;
  const std::int64_t tm = blockIdx.x;
  const std::int64_t row0 = tm * kFusedTileM;
  const int rows = static_cast<int>(min(static_cast<std::int64_t>(kFusedTileM), p.rows - row0));
  long long before = 0;
  int dropped = 0;
  for (std::int64_t j = t; j < tm; j += kTileRowsThreads) {
    const bool overflowed = counts.tile_overflow[j] != 0;
    before += overflowed ? 0 : counts.tile_total[j];
    dropped += overflowed;
  }
  before = warp_sum(before);
  dropped = static_cast<int>(warp_sum(dropped));
  if (lane == 0) {
    earlier[warp] = before;
    flagged[warp] = dropped;
  }
  const bool overflowed = counts.tile_overflow[tm] != 0;  // its rows are left empty
  int upto = 0;  // inclusive scan of the row counts over a row warp's lanes
  if (warp < kRowWarps) {
    const int count = t < rows && !overflowed ? counts.row_count[row0 + t] : 0;
    upto = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, upto, d);
      if (lane >= d) upto += up;
    }
    int most = count;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) most = max(most, __shfl_xor_sync(0xffffffffu, most, d));
    if (lane == 31) row_sums[warp] = upto;
    if (lane == 0) widest[warp] = most;
  }
  __syncthreads();
  if (warp < kRowWarps) {
    long long base = 0;
    for (int w = 0; w < kWarps; ++w) base += earlier[w];
    for (int w = 0; w < warp; ++w) base += row_sums[w];
    if (t == 0) start[0] = base;
    if (t < rows) {
      start[t + 1] = base + upto;
      next[t] = 0;
      row_ptr[row0 + t + 1] = base + upto;
    }
  }
  if (t == 0) {
    if (tm == 0) row_ptr[0] = 0;
    int most = 0;
    for (int w = 0; w < kRowWarps; ++w) most = max(most, widest[w]);
    if (most > 0) {
      atomicMax(reinterpret_cast<unsigned long long*>(summary + 2),
                static_cast<unsigned long long>(most));
    }
  }
  __syncthreads();
  if (t == 0 && tm == p.tiles_m - 1) {  // the last tile row: where the entries end
    int total_flagged = overflowed;
    for (int w = 0; w < kWarps; ++w) total_flagged += flagged[w];
    summary[0] = start[rows];
    summary[1] = total_flagged;
  }
  // No entries (none survived, or the tile row overflowed), or arrays of none: rows alone.
  if (start[0] == start[rows] || p.nnz == 0) return;  // block-uniform
  const std::int64_t regions = p.tiles_n * kFusedWarps;  // of this tile row
  const std::int64_t region0 = tm * regions;
  for (std::int64_t first = static_cast<std::int64_t>(warp) * 32; first < regions;
       first += 32 * kWarps) {  // warp-uniform
    const std::int64_t mine = first + lane;
    const int count =
        mine < regions
            ? static_cast<int>(min(static_cast<std::int64_t>(counts.warp_count[region0 + mine]),
                                   p.cap))
            : 0;
    int upto = count;  // inclusive scan of the counts over the lanes
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, upto, d);
      if (lane >= d) upto += up;
    }
    const int begin = upto - count;  // where this lane's region's records begin in the list
    const int total = __shfl_sync(0xffffffffu, upto, 31);
    for (int base = 0; base < total; base += 32) {  // warp-uniform bounds: the shuffles below
      const int item = base + lane;
      // The region holding item: the last lane whose start is at most item (empty regions
      // share their start with the next one, so the search lands past them).
      int owner = 0, owner_begin = 0;
#pragma unroll
      for (int step = 16; step > 0; step >>= 1) {
        const int probe = owner + step;
        const int probe_begin = __shfl_sync(0xffffffffu, begin, probe);
        if (probe_begin <= item) {
          owner = probe;
          owner_begin = probe_begin;
        }
      }
      if (item >= total) continue;
      const std::int64_t region = first + owner;
      const std::uint32_t r = records[(region0 + region) * p.cap + (item - owner_begin)];
      const int m = static_cast<int>(r >> 24);
      if (m >= rows) continue;  // not produced by the kernel; kept out all the same
      const std::int64_t at = start[m] + atomicAdd(next + m, 1);
      // An incomplete row whose range was emptied, or arrays sized before the count was known
      // and too short: the caller compacts again.
      if (at >= start[m + 1] || at >= p.nnz) continue;
      scratch_index[at] =
          static_cast<std::int32_t>(region / kFusedWarps * kFusedTileN + ((r >> 16) & 0xffu));
      scratch_values[at] = static_cast<std::uint16_t>(r & 0xffffu);
    }
  }
  if constexpr (kOrder) {
    __syncthreads();
    for (int m = warp; m < rows; m += kWarps) {
      const std::int64_t base = start[m];
      const std::int64_t end = start[m + 1];
      // Wide rows are left to the caller's sort; rows past the arrays to its second compaction.
      if (end - base > p.order_max || end > p.nnz) continue;  // warp-uniform
      const int n = static_cast<int>(end - base);
      const std::int32_t* cols = scratch_index + base;
      for (int i = lane; i < n; i += 32) {
        const std::int32_t key = cols[i];  // a row's columns are distinct
        int rank = 0;
        for (int j = 0; j < n; ++j) rank += cols[j] < key;
        out_index[base + rank] = key;
        out_values[base + rank] = scratch_values[base + i];
      }
    }
  }
}

// A gated SAE's survivors' activations, in place: relu(h * scale[c] + bias[c]) in float32, the
// multiply rounded before the add (no fused multiply-add), as torch computes it one operation at
// a time in the chunked selector's reference, then rounded to the values' type (Value:
// __nv_bfloat16 or __half).
template <class Value>
__global__ void gated_magnitudes_kernel(const std::int64_t* index, Value* values,
                                        const float* scale, const float* bias, std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const std::int64_t c = index[i];
  const float h = select_device::to_float(values[i]);
  const float m = __fadd_rn(__fmul_rn(h, scale[c]), bias[c]);
  // As torch.relu on CUDA: NaN passes, -0 becomes +0 (on the CPU torch keeps -0). A survivor's
  // magnitude is above 0 (its bound says so), so this matters only to other callers.
  const float relu = m <= 0.0f ? 0.0f : m;
  select_device::store_float(values + i, relu);
}

// out = E(x - center[column]) over n = rows * d_in elements, kWidth a thread a step (8: one
// 16-byte load and store, which needs x and out aligned and d_in a multiple of 8, so that the
// eight share a row). The difference is taken in float32 and rounded once, as torch does. The
// grid also zeroes zero_words words at zero.
template <typename T, int kWidth>
__global__ void center_rows_kernel(const T* __restrict__ x, const T* __restrict__ center,
                                   T* __restrict__ out, std::int64_t n, std::int64_t d_in,
                                   std::int32_t* __restrict__ zero, std::int64_t zero_words) {
  const std::int64_t thread =
      static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t threads = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = thread; i < zero_words; i += threads) zero[i] = 0;
  const std::int64_t step = threads * kWidth;
  for (std::int64_t i = thread * kWidth; i < n; i += step) {
    const std::int64_t c = i % d_in;
    if constexpr (kWidth == 8) {
      const uint4 packed = *reinterpret_cast<const uint4*>(x + i);
      const T* in = reinterpret_cast<const T*>(&packed);
      uint4 result;
      T* diff = reinterpret_cast<T*>(&result);
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        select_device::store_float(
            diff + v, select_device::to_float(in[v]) - select_device::to_float(center[c + v]));
      }
      *reinterpret_cast<uint4*>(out + i) = result;
    } else {
      select_device::store_float(out + i,
                                 select_device::to_float(x[i]) - select_device::to_float(center[c]));
    }
  }
}

template <typename T>
void launch_center_rows_as(const T* x, const T* center, T* out, std::int64_t n,
                           std::int64_t d_in, bool x_aligned, std::int32_t* zero,
                           std::int64_t zero_words, int sm_count, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int width = x_aligned && d_in % 8 == 0 ? 8 : 1;
  // Enough blocks to fill the GPU a few times over; each then strides through the rest.
  const std::int64_t wanted = (n / width + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned>(
      std::max<std::int64_t>(1, std::min<std::int64_t>(wanted, std::int64_t{sm_count} * 8)));
  if (width == 8) {
    center_rows_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(x, center, out, n, d_in, zero,
                                                              zero_words);
  } else {
    center_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(x, center, out, n, d_in, zero,
                                                              zero_words);
  }
  MECHINTERP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_center_rows(const std::uint16_t* x, const std::uint16_t* center,
                        std::uint16_t* centered, std::int64_t rows, std::int64_t d_in,
                        bool float16, bool x_aligned, std::int32_t* zero,
                        std::int64_t zero_words, int sm_count, cudaStream_t stream) {
  const std::int64_t n = rows * d_in;
  if (float16) {
    launch_center_rows_as(reinterpret_cast<const __half*>(x),
                          reinterpret_cast<const __half*>(center),
                          reinterpret_cast<__half*>(centered), n, d_in, x_aligned, zero,
                          zero_words, sm_count, stream);
  } else {
    launch_center_rows_as(reinterpret_cast<const __nv_bfloat16*>(x),
                          reinterpret_cast<const __nv_bfloat16*>(center),
                          reinterpret_cast<__nv_bfloat16*>(centered), n, d_in, x_aligned, zero,
                          zero_words, sm_count, stream);
  }
}

void launch_fused_records_to_rows(const std::uint32_t* records, const FusedCounts& counts,
                                  std::int64_t* row_ptr, std::int64_t* summary,
                                  std::int32_t* scratch_index, std::uint16_t* scratch_values,
                                  std::int64_t* out_index, std::uint16_t* out_values,
                                  const FusedRowsParams& params, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(params.tiles_m);
  if (params.order) {
    tile_rows_kernel<true><<<blocks, kTileRowsThreads, 0, stream>>>(
        records, counts, row_ptr, summary, scratch_index, scratch_values, out_index, out_values,
        params);
  } else {
    tile_rows_kernel<false><<<blocks, kTileRowsThreads, 0, stream>>>(
        records, counts, row_ptr, summary, scratch_index, scratch_values, out_index, out_values,
        params);
  }
  MECHINTERP_CUDA_CHECK(cudaGetLastError());
}

void launch_gated_magnitudes(const std::int64_t* index, std::uint16_t* values, const float* scale,
                             const float* bias, std::int64_t n, bool float16,
                             cudaStream_t stream) {
  if (n == 0) return;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  if (float16) {
    gated_magnitudes_kernel<<<blocks, kThreads, 0, stream>>>(
        index, reinterpret_cast<__half*>(values), scale, bias, n);
  } else {
    gated_magnitudes_kernel<<<blocks, kThreads, 0, stream>>>(
        index, reinterpret_cast<__nv_bfloat16*>(values), scale, bias, n);
  }
  MECHINTERP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mechinterp::sae
