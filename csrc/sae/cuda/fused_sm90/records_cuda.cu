// The fused encode's records as compressed rows (see sae/fused_threshold.h): each warp puts the
// records of 32 record regions in the next free slots of their rows; one warp per row then puts
// each of the row's entries at its rank among the row's columns. An ordered sweep per row tile
// and a count plus scan per (row, tile) were both slower on an H100 (0.7-2.9 ms and 0.2 ms at
// 768 x 32768 against 0.1 ms).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/block/block_store.cuh>

#include "common/check.h"
#include "sae/cuda/select_common.cuh"
#include "sae/fused_threshold.h"

namespace mechinterp::sae {

namespace {

constexpr int kPlaceThreads = 256;
constexpr int kOrderThreads = 256;
constexpr int kTallyThreads = 1024;
constexpr int kTallyItems = 4;  // rows a thread per pass

struct Larger {
  __device__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};

// One block, passes of kTallyThreads * kTallyItems rows (loaded and stored coalesced through
// shared memory): the running sums of the rows' counts, with the rows of overflowed tile rows
// counted as empty, and (entries, overflowed tile rows, widest row) for the host's one read.
__global__ void __launch_bounds__(kTallyThreads)
    tally_kernel(const std::int32_t* row_count, const std::int32_t* tile_overflow,
                 std::int64_t* row_ptr, std::int64_t* summary, FusedTallyParams p) {
  using Load = cub::BlockLoad<int, kTallyThreads, kTallyItems, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Scan = cub::BlockScan<long long, kTallyThreads>;
  using Store =
      cub::BlockStore<long long, kTallyThreads, kTallyItems, cub::BLOCK_STORE_WARP_TRANSPOSE>;
  using Reduce = cub::BlockReduce<long long, kTallyThreads>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Scan::TempStorage scan;
    typename Store::TempStorage store;
    typename Reduce::TempStorage reduce;
  } shared;
  __shared__ long long before;  // entries of the earlier passes
  constexpr int kPass = kTallyThreads * kTallyItems;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    before = 0;
    row_ptr[0] = 0;
  }
  long long widest = 0;
  for (std::int64_t r0 = 0; r0 < p.rows; r0 += kPass) {
    const int valid = static_cast<int>(min(static_cast<std::int64_t>(kPass), p.rows - r0));
    __syncthreads();  // `before` is written, and the shared storage free
    int counts[kTallyItems];
    Load(shared.load).Load(row_count + r0, counts, valid, 0);
    long long sums[kTallyItems];
    for (int i = 0; i < kTallyItems; ++i) {  // thread t holds rows r0 + t * kTallyItems + i
      const std::int64_t r = r0 + static_cast<std::int64_t>(t) * kTallyItems + i;
      sums[i] = (r < p.rows && tile_overflow[r / kFusedTileM] == 0) ? counts[i] : 0;
      widest = max(widest, sums[i]);
    }
    __syncthreads();
    long long pass_total = 0;
    Scan(shared.scan).InclusiveSum(sums, sums, pass_total);
    const long long base = before;
    __syncthreads();
    for (int i = 0; i < kTallyItems; ++i) sums[i] += base;
    Store(shared.store).Store(row_ptr + 1 + r0, sums, valid);
    if (t == 0) before = base + pass_total;
  }
  __syncthreads();
  widest = Reduce(shared.reduce).Reduce(widest, Larger{});
  __syncthreads();
  long long overflowed = 0;
  for (std::int64_t tm = t; tm < p.tiles_m; tm += kTallyThreads) overflowed += tile_overflow[tm];
  overflowed = Reduce(shared.reduce).Sum(overflowed);
  if (t == 0) {
    summary[0] = before;
    summary[1] = overflowed;
    summary[2] = widest;
  }
}

// Each warp places the records of 32 consecutive regions (a lane's count each, one warp scan
// for where each region's records start in the warp's list), 32 records a step whatever the
// regions they come from, so that lanes are not left idle by regions of a few records (a
// handful at realistic densities). At 768 x 32768 (JumpReLU, 131,072 regions, 16,384 rows;
// H100) it takes 24 us where a warp per region took 39 us; for a TopK encode's candidates
// there (about 16 a region) 62 us against 65 us. Four records a lane a step, their loads and
// atomics side by side, took 29 us and 60 us: the atomics' throughput, not their latency,
// bounds it.
__global__ void __launch_bounds__(kPlaceThreads)
    place_records_kernel(const std::uint32_t* records, const std::int32_t* warp_count,
                         const std::int64_t* row_ptr, std::int32_t* cursor,
                         std::int32_t* scratch_index, std::uint16_t* scratch_values,
                         FusedRowsParams p) {
  const std::int64_t regions = p.tiles_m * p.tiles_n * kFusedWarps;
  const std::int64_t first =
      (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32 * 32;
  if (first >= regions) return;  // warp-uniform
  const int lane = static_cast<int>(threadIdx.x % 32);
  const std::int64_t mine = first + lane;
  const int count =
      mine < regions ? static_cast<int>(min(static_cast<std::int64_t>(warp_count[mine]), p.cap))
                     : 0;
  int upto = count;  // inclusive scan of the counts over the lanes
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, upto, d);
    if (lane >= d) upto += up;
  }
  const int start = upto - count;  // where this lane's region's records begin in the list
  const int total = __shfl_sync(0xffffffffu, upto, 31);
  for (int base = 0; base < total; base += 32) {  // warp-uniform bounds: the shuffles below
    const int item = base + lane;
    // The region holding item: the last lane whose start is at most item (empty regions share
    // their start with the next one, so the search lands past them).
    int owner = 0, owner_start = 0;  // lane 0's region starts the list
#pragma unroll
    for (int step = 16; step > 0; step >>= 1) {
      const int probe = owner + step;
      const int probe_start = __shfl_sync(0xffffffffu, start, probe);
      if (probe_start <= item) {
        owner = probe;
        owner_start = probe_start;
      }
    }
    if (item >= total) continue;
    const std::int64_t region = first + owner;
    const std::int64_t tile = region / kFusedWarps;
    const std::int64_t tm = tile / p.tiles_n;
    const std::int64_t tn = tile % p.tiles_n;
    const std::uint32_t r = records[region * p.cap + (item - owner_start)];
    const std::int64_t m = tm * kFusedTileM + (r >> 24);
    if (m >= p.rows) continue;  // not produced by the kernel; kept out all the same
    const std::int64_t at = row_ptr[m] + atomicAdd(cursor + m, 1);
    // An incomplete row whose range was emptied, or arrays sized before the count was known
    // and too short: the caller compacts again.
    if (at >= row_ptr[m + 1] || at >= p.nnz) continue;
    scratch_index[at] = static_cast<std::int32_t>(tn * kFusedTileN + ((r >> 16) & 0xffu));
    scratch_values[at] = static_cast<std::uint16_t>(r & 0xffffu);
  }
}

__global__ void order_rows_kernel(const std::int64_t* row_ptr, const std::int32_t* scratch_index,
                                  const std::uint16_t* scratch_values, std::int64_t* out_index,
                                  std::uint16_t* out_values, std::int64_t rows,
                                  std::int64_t nnz, std::int64_t order_max) {
  const std::int64_t m = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (m >= rows) return;
  const std::int64_t base = row_ptr[m];
  const std::int64_t end = row_ptr[m + 1];
  // Wide rows are left to the caller's sort; rows past the arrays to its second compaction.
  if (end - base > order_max || end > nnz) return;  // warp-uniform
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
// eight share a row). The difference is taken in float32 and rounded once, as torch does.
template <typename T, int kWidth>
__global__ void center_rows_kernel(const T* __restrict__ x, const T* __restrict__ center,
                                   T* __restrict__ out, std::int64_t n, std::int64_t d_in) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x * kWidth;
  for (std::int64_t i = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) *
                        kWidth;
       i < n; i += step) {
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
                           std::int64_t d_in, bool x_aligned, int sm_count,
                           cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int width = x_aligned && d_in % 8 == 0 ? 8 : 1;
  // Enough blocks to fill the GPU a few times over; each then strides through the rest.
  const std::int64_t wanted = (n / width + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned>(
      std::max<std::int64_t>(1, std::min<std::int64_t>(wanted, std::int64_t{sm_count} * 8)));
  if (width == 8) {
    center_rows_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(x, center, out, n, d_in);
  } else {
    center_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(x, center, out, n, d_in);
  }
  MECHINTERP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_center_rows(const std::uint16_t* x, const std::uint16_t* center,
                        std::uint16_t* centered, std::int64_t rows, std::int64_t d_in,
                        bool float16, bool x_aligned, int sm_count, cudaStream_t stream) {
  const std::int64_t n = rows * d_in;
  if (float16) {
    launch_center_rows_as(reinterpret_cast<const __half*>(x),
                          reinterpret_cast<const __half*>(center),
                          reinterpret_cast<__half*>(centered), n, d_in, x_aligned, sm_count,
                          stream);
  } else {
    launch_center_rows_as(reinterpret_cast<const __nv_bfloat16*>(x),
                          reinterpret_cast<const __nv_bfloat16*>(center),
                          reinterpret_cast<__nv_bfloat16*>(centered), n, d_in, x_aligned,
                          sm_count, stream);
  }
}

void launch_fused_tally(const std::int32_t* row_count, const std::int32_t* tile_overflow,
                        std::int64_t* row_ptr, std::int64_t* summary,
                        const FusedTallyParams& params, cudaStream_t stream) {
  tally_kernel<<<1, kTallyThreads, 0, stream>>>(row_count, tile_overflow, row_ptr, summary,
                                                params);
  MECHINTERP_CUDA_CHECK(cudaGetLastError());
}

void launch_fused_records_to_rows(const std::uint32_t* records, const std::int32_t* warp_count,
                                  const std::int64_t* row_ptr, std::int32_t* cursor,
                                  std::int32_t* scratch_index, std::uint16_t* scratch_values,
                                  std::int64_t* out_index, std::uint16_t* out_values,
                                  const FusedRowsParams& params, cudaStream_t stream) {
  const std::int64_t regions = params.tiles_m * params.tiles_n * kFusedWarps;
  // 32 regions a warp: as many regions a block as it has threads.
  const auto place_blocks =
      static_cast<unsigned>((regions + kPlaceThreads - 1) / kPlaceThreads);
  place_records_kernel<<<place_blocks, kPlaceThreads, 0, stream>>>(
      records, warp_count, row_ptr, cursor, scratch_index, scratch_values, params);
  MECHINTERP_CUDA_CHECK(cudaGetLastError());
  if (!params.order) return;
  const std::int64_t rows_per_block = kOrderThreads / 32;
  const auto blocks = static_cast<unsigned>((params.rows + rows_per_block - 1) / rows_per_block);
  order_rows_kernel<<<blocks, kOrderThreads, 0, stream>>>(row_ptr, scratch_index, scratch_values,
                                                          out_index, out_values, params.rows,
                                                          params.nnz, params.order_max);
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
