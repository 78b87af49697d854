#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dispatch.h"
#include "sae/cuda/select_common.cuh"
#include "sae/sae.h"

namespace mechinterp::sae {

namespace {

using namespace select_device;

// One block per (row, segment). Keys of the segment's values stay in registers. The k-th largest
// of the 256 thread maxima bounds the k-th largest value from below, so the values at or above
// it are few, about k for smooth data; they go to shared memory and are ranked there exactly.
// When too many pass (heavy ties), the exact k largest are taken by bisection instead.
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

  std::uint32_t key[kItems];
  const std::uint32_t thread_max = load_keys<T, kVector>(
      values + row * p.row_stride + first, cols, p.bias ? p.bias + first : nullptr,
      p.scale ? p.scale + first : nullptr, in_index, key);
  if (threadIdx.x == 0) s_count = 0;
  const std::uint32_t bar = kth_thread_max(warp_sort_descending(thread_max), k, s_max, &s_bar);

  auto push = [&](int item, int slot) {
    if (slot < kCandidates) {
      const int c = strided_column<T, kVector>(item);
      s_key[slot] = key[item];
      s_index[slot] = in_index ? in_index[c] : static_cast<std::int32_t>(p.col_offset + first + c);
    }
  };
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (key[i] != 0u && key[i] >= bar) push(i, atomicAdd(&s_count, 1));
  }
  __syncthreads();
  int held = s_count;
  if (held > kCandidates) held = push_exact_topk<T, kVector>(key, k, s_warp, &s_count, push);

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

// kWidth adjacent per-column floats from column base on (zeros past cols): 16-byte loads when
// kVector (the caller checked alignment), else one at a time.
template <int kWidth, bool kVector>
__device__ __forceinline__ void load_column_floats(const float* p, int base, int cols,
                                                   float (&out)[kWidth]) {
  if (kVector && base + kWidth <= cols) {
#pragma unroll
    for (int q = 0; q < kWidth / 4; ++q) {
      *reinterpret_cast<float4*>(out + 4 * q) = *reinterpret_cast<const float4*>(p + base + 4 * q);
    }
  } else {
#pragma unroll
    for (int v = 0; v < kWidth; ++v) out[v] = base + v < cols ? p[base + v] : 0.0f;
  }
}

// A gated SAE's activation: relu(h * scale + shift), rounded after the multiply as the CPU
// selector computes it (no fused multiply-add).
__device__ __forceinline__ float gated_magnitude(float h, float scale, float shift) {
  return fmaxf(__fadd_rn(__fmul_rn(h, scale), shift), 0.0f);
}

// Writes a row segment's survivors to their slots in column order, (warp, load, lane, item)
// being column order: a scan over the lanes per load (two loads' counts packed in one int) and
// one over the warps give each survivor its slot. passed has bit j kWidth + v set where item v
// of load j survives; write(slot, j, v) stores it (slot < cap). Returns the segment's count of
// survivors. totals holds kWarps ints no other thread reads until every thread has returned;
// every thread of the block must call it. A warp none of whose lanes has a survivor skips its
// scans.
template <int kWidth, int kCount, typename Write>
__device__ __forceinline__ int write_survivors(std::uint32_t passed, int cap, int* totals,
                                               Write&& write) {
  static_assert(kCount % 2 == 0, "loads are scanned in pairs");
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  // Survivors before this lane in each load's group, and each group's total over the warp.
  int before[kCount] = {};
  int group_total[kCount] = {};
  int warp_total = 0;
  if (__any_sync(0xffffffffu, passed != 0u)) {
#pragma unroll
    for (int j = 0; j < kCount; j += 2) {
      const int packed =  // <= 32 x 8 each: no carry
          __popc((passed >> (j * kWidth)) & ((1u << kWidth) - 1u)) |
          (__popc((passed >> ((j + 1) * kWidth)) & ((1u << kWidth) - 1u)) << 16);
      const int inclusive = warp_inclusive_sum(packed);
      const int exclusive = inclusive - packed;
      const int total = __shfl_sync(0xffffffffu, inclusive, 31);
      before[j] = exclusive & 0xffff;
      before[j + 1] = exclusive >> 16;
      group_total[j] = total & 0xffff;
      group_total[j + 1] = total >> 16;
      warp_total += group_total[j] + group_total[j + 1];
    }
  }
  if (lane == 0) totals[warp] = warp_total;
  __syncthreads();
  int slot = 0;
  int total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    slot += w < warp ? totals[w] : 0;
    total += totals[w];
  }
  if (passed) {
#pragma unroll
    for (int j = 0; j < kCount; ++j) {
      int at = slot + before[j];
#pragma unroll
      for (int v = 0; v < kWidth; ++v) {
        if (!(passed & (1u << (j * kWidth + v)))) continue;
        if (at < cap) write(at, j, v);
        ++at;
      }
      slot += group_total[j];
    }
  }
  return total;
}

// One block per (row, segment). Warp w reads columns [w, w + 1) x kWarpColumns of the segment,
// 16 adjacent bytes per lane and load, so every load is coalesced; the per-column parameters
// come the same way; write_survivors gives the survivors their slots in column order.
template <typename T, bool kVector, bool kPlain>
__global__ void __launch_bounds__(kThreads)
    SelectThresholdKernel(const T* __restrict__ values, float* __restrict__ out_values,
                          std::int32_t* __restrict__ out_index,
                          std::int32_t* __restrict__ out_count, SelectParams p) {
  using L = Loads<T, kVector>;
  constexpr int kWidth = L::kWidth;
  constexpr int kWarpColumns = kItems * 32;
  __shared__ int s_warp[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const std::int64_t row = blockIdx.x / p.segments;
  const std::int64_t segment = blockIdx.x - row * p.segments;
  const std::int64_t first = segment * kSegment;
  const int cols = static_cast<int>(min(static_cast<std::int64_t>(kSegment), p.cols - first));
  const T* in = values + row * p.row_stride + first;
  const float* bias = p.bias ? p.bias + first : nullptr;
  const float* threshold = p.threshold ? p.threshold + first : nullptr;
  const float* mag_scale = p.mag_scale ? p.mag_scale + first : nullptr;
  const float* mag_bias = p.mag_bias ? p.mag_bias + first : nullptr;

  // Only which items survive is kept: the few survivors' activations are computed again from
  // memory when written, which leaves registers for more resident blocks.
  std::uint32_t passed = 0;  // bit i: item i survives
#pragma unroll
  for (int j = 0; j < L::kCount; ++j) {
    const int base = warp * kWarpColumns + (j * 32 + lane) * kWidth;
    T buf[kWidth];
    load_run<T, kVector>(in, base, cols, buf);
    float bar[kWidth] = {};
    if (threshold) load_column_floats<kWidth, kVector>(threshold, base, cols, bar);
    if constexpr (kPlain) {
      // No bias and not gated (the usual JumpReLU / ReLU encode, whose bias is in the GEMM):
      // one test per item, and the zeros past the end never pass it.
#pragma unroll
      for (int v = 0; v < kWidth; ++v) {
        const float h = to_float(buf[v]);
        passed |= static_cast<std::uint32_t>(h > bar[v] && h > 0.0f) << (j * kWidth + v);
      }
    } else {
      float add[kWidth] = {};
      float scale[kWidth] = {};
      float shift[kWidth] = {};
      if (bias) load_column_floats<kWidth, kVector>(bias, base, cols, add);
      if (mag_scale) {
        load_column_floats<kWidth, kVector>(mag_scale, base, cols, scale);
        load_column_floats<kWidth, kVector>(mag_bias, base, cols, shift);
      }
#pragma unroll
      for (int v = 0; v < kWidth; ++v) {
        const float h = to_float(buf[v]);
        const bool keep =
            base + v < cols && h + add[v] > bar[v] &&
            (mag_scale ? gated_magnitude(h, scale[v], shift[v]) : h + add[v]) > 0.0f;
        passed |= static_cast<std::uint32_t>(keep) << (j * kWidth + v);
      }
    }
  }
  float* out_v = out_values + row * p.out_row_stride + segment * p.cap;
  std::int32_t* out_i = out_index + row * p.out_row_stride + segment * p.cap;
  const int total = write_survivors<kWidth, L::kCount>(
      passed, static_cast<int>(p.cap), s_warp, [&](int at, int j, int v) {
        const int c = warp * kWarpColumns + (j * 32 + lane) * kWidth + v;
        const float h = to_float(in[c]);
        out_v[at] = mag_scale ? gated_magnitude(h, mag_scale[c], mag_bias[c])
                              : h + (bias ? bias[c] : 0.0f);
        out_i[at] = static_cast<std::int32_t>(p.col_offset + first + c);
      });
  if (threadIdx.x == 0) out_count[row * p.count_row_stride + segment] = total;
}

// Packed pairs of a 16-bit type, and the bound a value of that type must exceed to pass a
// float threshold t with the ReLU's test folded in: h > max(t, 0) exactly when h > max(t, 0)
// rounded down to the type, for every h of the type (no value of the type lies between the
// rounded bound and t), and NaN stays NaN so that nothing passes it.
template <typename T>
struct ThresholdPair;

template <>
struct ThresholdPair<__nv_bfloat16> {
  using Packed = __nv_bfloat162;
  static __device__ __forceinline__ Packed pack(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return __halves2bfloat162(lo, hi);
  }
  static __device__ __forceinline__ __nv_bfloat16 round_down(float v) {
    return __float2bfloat16_rd(v);
  }
};

template <>
struct ThresholdPair<__half> {
  using Packed = __half2;
  static __device__ __forceinline__ Packed pack(__half lo, __half hi) {
    return __halves2half2(lo, hi);
  }
  static __device__ __forceinline__ __half round_down(float v) { return __float2half_rd(v); }
};

template <typename T>
__device__ __forceinline__ T relu_threshold_bound(float t) {
  return ThresholdPair<T>::round_down(isnan(t) ? t : fmaxf(t, 0.0f));
}

// 16 bytes from global to shared memory without a register round trip; the bytes past
// src_bytes (0 to 16) are zero-filled.
__device__ __forceinline__ void copy_16_async(void* to, const void* from, int src_bytes) {
  const auto at = static_cast<unsigned>(__cvta_generic_to_shared(to));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(at), "l"(from),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void commit_async_copies() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_async_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Rows one pairs-kernel block walks through, with its segment's bounds held in registers.
constexpr int kThresholdRows = 8;
// Rows of one block in shared memory at once: one being tested, the rest arriving.
constexpr int kThresholdStages = 3;

template <typename T>
constexpr int threshold_stage_bytes() {
  return kThresholdStages * kSegment * static_cast<int>(sizeof(T));
}

// The plain threshold test (no bias, not gated: the usual JumpReLU / ReLU encode, whose bias is
// in the GEMM) of 16-bit values that load 16 bytes at a time. One block per (group of
// kThresholdRows rows, segment).
// - The rows stream through kThresholdStages buffers in shared memory by asynchronous copies,
//   so that each SM has several rows' loads in flight without holding them in registers. Every
//   thread copies exactly the bytes it reads back, so its own waits order them: no barrier.
// - Two columns are tested by one packed compare against bounds loaded once per block, and a
//   warp with no survivor (the usual case at SAE densities) skips write_survivors's scans.
// Columns run (warp, load, lane, item) as in SelectThresholdKernel, so the slots are the same.
// On an H100 (bf16 chunks of 16,384 x 8,192) it read 2.1-2.4 TB/s, the rate of torch's amax over
// the same chunk, where SelectThresholdKernel read 2.0-2.3 TB/s.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SelectThresholdPairsKernel(const T* __restrict__ values, float* __restrict__ out_values,
                               std::int32_t* __restrict__ out_index,
                               std::int32_t* __restrict__ out_count, SelectParams p) {
  using L = Loads<T, true>;
  using Pair = ThresholdPair<T>;
  constexpr int kWidth = L::kWidth;
  constexpr int kPairs = kWidth / 2;
  constexpr int kWarpColumns = kItems * 32;
  extern __shared__ uint4 s_rows[];  // kThresholdStages rows of kSegment values
  // Two sets of warp totals, a row's and the next one's, so one barrier a row is enough.
  __shared__ int s_warp[2][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const std::int64_t group = blockIdx.x / p.segments;
  const std::int64_t segment = blockIdx.x - group * p.segments;
  const std::int64_t first = segment * kSegment;
  const int cols = static_cast<int>(min(static_cast<std::int64_t>(kSegment), p.cols - first));
  const std::int64_t row_begin = group * kThresholdRows;
  const int rows = static_cast<int>(min(p.rows - row_begin, std::int64_t{kThresholdRows}));
  auto column = [&](int j) { return warp * kWarpColumns + (j * 32 + lane) * kWidth; };
  auto stage = [&](int i) {
    return reinterpret_cast<T*>(s_rows) + (i % kThresholdStages) * kSegment;
  };
  auto copy_row = [&](int i) {
    const T* in = values + (row_begin + i) * p.row_stride + first;
    T* to = stage(i);
#pragma unroll
    for (int j = 0; j < L::kCount; ++j) {
      const int base = column(j);
      const int bytes = max(0, min(kWidth, cols - base)) * static_cast<int>(sizeof(T));
      copy_16_async(to + base, bytes > 0 ? in + base : in, bytes);
    }
  };
#pragma unroll
  for (int i = 0; i < kThresholdStages - 1; ++i) {
    if (i < rows) copy_row(i);
    commit_async_copies();  // empty groups too, so that every wait counts the same groups
  }

  typename Pair::Packed bound[L::kCount][kPairs];
#pragma unroll
  for (int j = 0; j < L::kCount; ++j) {
    float t[kWidth] = {};  // columns past the end: bound 0, which their zeros never exceed
    if (p.threshold) load_column_floats<kWidth, true>(p.threshold + first, column(j), cols, t);
#pragma unroll
    for (int q = 0; q < kPairs; ++q) {
      bound[j][q] = Pair::pack(relu_threshold_bound<T>(t[2 * q]),
                               relu_threshold_bound<T>(t[2 * q + 1]));
    }
  }

#pragma unroll 1
  for (int i = 0; i < rows; ++i) {
    if (i + kThresholdStages - 1 < rows) copy_row(i + kThresholdStages - 1);
    commit_async_copies();
    wait_async_copies<kThresholdStages - 1>();  // row i has arrived
    const T* here = stage(i);
    std::uint32_t passed = 0;  // bit i: item i survives
    std::uint32_t any = 0;
    std::uint32_t mask[L::kCount][kPairs];
#pragma unroll
    for (int j = 0; j < L::kCount; ++j) {
      T buf[kWidth];
      *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(here + column(j));
#pragma unroll
      for (int q = 0; q < kPairs; ++q) {
        mask[j][q] = __hgt2_mask(Pair::pack(buf[2 * q], buf[2 * q + 1]), bound[j][q]);
        any |= mask[j][q];
      }
    }
    if (any) {
#pragma unroll
      for (int j = 0; j < L::kCount; ++j) {
#pragma unroll
        for (int q = 0; q < kPairs; ++q) {
          const int item = j * kWidth + 2 * q;
          passed |= ((mask[j][q] & 1u) << item) | (((mask[j][q] >> 16) & 1u) << (item + 1));
        }
      }
    }

    const std::int64_t row = row_begin + i;
    float* out_v = out_values + row * p.out_row_stride + segment * p.cap;
    std::int32_t* out_i = out_index + row * p.out_row_stride + segment * p.cap;
    const int total = write_survivors<kWidth, L::kCount>(
        passed, static_cast<int>(p.cap), s_warp[i % 2], [&](int at, int j, int v) {
          const int c = column(j) + v;
          out_v[at] = to_float(here[c]);
          out_i[at] = static_cast<std::int32_t>(p.col_offset + first + c);
        });
    if (threadIdx.x == 0) out_count[row * p.count_row_stride + segment] = total;
  }
}

constexpr int kCompactWarps = 8;

// One warp per row. Each group of 32 segments: a lane per segment takes its filled slots'
// count, a scan over the lanes gives each segment its place in the row, and the warp copies
// the segments' slots one segment at a time, a lane per slot.
template <typename T>
__global__ void __launch_bounds__(kCompactWarps * 32)
    CompactSlotsKernel(const float* __restrict__ kept, const std::int32_t* __restrict__ index,
                       const std::int32_t* __restrict__ count, T* __restrict__ out_values,
                       std::int64_t* __restrict__ out_index, CompactParams p) {
  const int lane = threadIdx.x % 32;
  const std::int64_t row =
      static_cast<std::int64_t>(blockIdx.x) * kCompactWarps + threadIdx.x / 32;
  if (row >= p.rows) return;  // uniform over the warp
  const int cap = static_cast<int>(p.cap);
  std::int64_t at = p.row_start[row];
  for (std::int64_t s0 = 0; s0 < p.segments; s0 += 32) {
    const std::int64_t mine = s0 + lane;
    const int filled = mine < p.segments ? min(max(count[row * p.segments + mine], 0), cap) : 0;
    const int inclusive = warp_inclusive_sum(filled);
    const int before = inclusive - filled;
    const int group = static_cast<int>(min(static_cast<std::int64_t>(32), p.segments - s0));
    for (int g = 0; g < group; ++g) {
      const int n = __shfl_sync(0xffffffffu, filled, g);
      const std::int64_t base = at + __shfl_sync(0xffffffffu, before, g);
      const std::int64_t cell = (row * p.segments + s0 + g) * cap;
      for (int j = lane; j < n; j += 32) {
        const std::int64_t to = base + j;
        if (to >= 0 && to < p.nnz) {
          store_float(out_values + to, kept[cell + j]);
          out_index[to] = index[cell + j];
        }
      }
    }
    at += __shfl_sync(0xffffffffu, inclusive, 31);
  }
}

template <typename T>
bool threshold_can_load_vectors(const T* values, const SelectParams& p) {
  auto aligned = [](const float* f) { return reinterpret_cast<std::uintptr_t>(f) % 16 == 0; };
  return can_load_vectors(values, p.row_stride) && aligned(p.bias) && aligned(p.threshold) &&
         aligned(p.mag_scale) && aligned(p.mag_bias);
}

unsigned blocks_for(const SelectParams& p, const char* op, std::int64_t rows_per_block = 1) {
  const std::int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block * p.segments;
  MECHINTERP_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": at most ",
                   std::numeric_limits<int>::max(), " blocks of rows and a segment, got ",
                   blocks);
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
  const bool vector = threshold_can_load_vectors(values, params);
  const bool plain = !params.bias && !params.mag_scale;
  if constexpr (sizeof(device_t) == 2) {
    if (vector && plain) {
      constexpr int bytes = threshold_stage_bytes<device_t>();
      // Past the 48 KiB default with the static totals; the opt-in is per device, so it is made
      // on every launch (a host call of about a microsecond) rather than once per process.
      MECHINTERP_CUDA_CHECK(cudaFuncSetAttribute(SelectThresholdPairsKernel<device_t>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 bytes));
      SelectThresholdPairsKernel<device_t>
          <<<blocks_for(params, "select_threshold", kThresholdRows), kThreads, bytes, stream>>>(
              in, out_values, out_index, out_count, params);
      MECHINTERP_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  const unsigned blocks = blocks_for(params, "select_threshold");
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(in, out_values, out_index, out_count, params);
  };
  if (vector && plain) {
    launch(SelectThresholdKernel<device_t, true, true>);
  } else if (vector) {
    launch(SelectThresholdKernel<device_t, true, false>);
  } else if (plain) {
    launch(SelectThresholdKernel<device_t, false, true>);
  } else {
    launch(SelectThresholdKernel<device_t, false, false>);
  }
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

template <typename T>
void launch_compact_slots_cuda(const float* kept, const std::int32_t* index,
                               const std::int32_t* count, T* out_values, std::int64_t* out_index,
                               const CompactParams& params, cudaStream_t stream) {
  using device_t = cuda_scalar_t<T>;
  const std::int64_t blocks = (params.rows + kCompactWarps - 1) / kCompactWarps;
  MECHINTERP_CHECK(blocks <= std::numeric_limits<int>::max(), "compact_slots: at most ",
                   std::int64_t{std::numeric_limits<int>::max()} * kCompactWarps, " rows, got ",
                   params.rows);
  CompactSlotsKernel<device_t><<<static_cast<unsigned>(blocks), kCompactWarps * 32, 0, stream>>>(
      kept, index, count, reinterpret_cast<device_t*>(out_values), out_index, params);
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

template void launch_compact_slots_cuda<float>(const float*, const std::int32_t*,
                                               const std::int32_t*, float*, std::int64_t*,
                                               const CompactParams&, cudaStream_t);
template void launch_compact_slots_cuda<Half>(const float*, const std::int32_t*,
                                              const std::int32_t*, Half*, std::int64_t*,
                                              const CompactParams&, cudaStream_t);
template void launch_compact_slots_cuda<BFloat16>(const float*, const std::int32_t*,
                                                  const std::int32_t*, BFloat16*, std::int64_t*,
                                                  const CompactParams&, cudaStream_t);

}  // namespace mechinterp::sae
