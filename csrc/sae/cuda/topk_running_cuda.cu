// A running top-k over chunks of latents: topk_candidates keeps, per (row, segment) of a chunk's
// pre-activations, only what can still be among the row's k largest; topk_merge folds those
// candidates into the row's running top-k and raises the row's bar to its exact k-th key.
//
// Why two kernels: ordering candidates exactly is the costly step, which the selector of one
// segment cannot afford (it would dominate an 8,192-value read), while a merge per row and
// chunk sees few candidates once the bar is the running k-th value.
#include <cstdint>
#include <limits>

#include "common/check.h"
#include "common/dispatch.h"
#include "sae/cuda/select_common.cuh"
#include "sae/sae.h"

namespace mechinterp::sae {

namespace {

using namespace select_device;

constexpr int kMergeWarps = 4;

// Packed pairs of a 16-bit type, with the paired operations the fast path of
// TopkCandidatesKernel uses (the cuda_fp16 / cuda_bf16 intrinsics are overloaded on the pair
// type; only the conversion that rounds down is named per type).
template <typename T>
struct PairOf;

template <>
struct PairOf<__half> {
  using type = __half2;
  static __device__ __forceinline__ type splat_down(float f) {
    return __half2half2(__float2half_rd(f));
  }
};

template <>
struct PairOf<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type splat_down(float f) {
    return __bfloat162bfloat162(__float2bfloat16_rd(f));
  }
};

template <typename T>
struct Pairs : PairOf<T> {
  using type = typename PairOf<T>::type;
  static __device__ __forceinline__ type max_nan(type a, type b) { return __hmax2_nan(a, b); }
  static __device__ __forceinline__ unsigned at_least(type a, type b) { return __hge2_mask(a, b); }
  static __device__ __forceinline__ float low(type a) { return __low2float(a); }
  static __device__ __forceinline__ float high(type a) { return __high2float(a); }
};

template <typename T>
constexpr bool kHasPairs = sizeof(T) == 2;

// The segment's bar: the larger of the row's bound *s_known (which thread 0 wrote before the
// call; it is read after this function's barriers) and the segment's own (see
// TopkCandidatesKernel), which thread 0 writes into *row_bar when it is higher. thread_max is
// this thread's largest key. Every thread of the block must call it.
__device__ inline std::uint32_t segment_bar(std::uint32_t thread_max, int cols, int k,
                                            const std::uint32_t* s_known, std::uint32_t* row_bar,
                                            std::uint32_t* s_max, std::uint32_t* s_warp_bar,
                                            std::uint32_t* s_bar) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const std::uint32_t sorted = warp_sort_descending(thread_max);
  std::uint32_t own;
  if (cols == kSegment) {
    const int per_warp = (k + kWarps - 1) / kWarps;
    const std::uint32_t mine = __shfl_sync(0xffffffffu, sorted, per_warp - 1);
    if (lane == 0) s_warp_bar[warp] = mine;
    __syncthreads();
    own = s_warp_bar[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) own = min(own, s_warp_bar[w]);
  } else {
    own = kth_thread_max(sorted, k, s_max, s_bar);
  }
  const std::uint32_t known = *s_known;
  if (threadIdx.x == 0 && own > known) atomicMax(row_bar, own);
  return max(own, known);
}

// The count of a cell the packed path could not finish (TopkCandidatesRedoKernel takes it again).
constexpr std::int32_t kRedo = -1;

// Shared memory of one block of the candidates kernels.
struct CandidateShared {
  std::uint32_t max[kThreads];
  std::uint32_t warp_bar[kWarps];
  int warp[kWarps];
  std::uint32_t bar;
  std::uint32_t known;
  int count;
};

// What one (row, segment) of a chunk reads and writes.
template <typename T>
struct Cell {
  const T* in;
  float* out_v;
  std::int32_t* out_i;
  std::int64_t row;
  std::int64_t first;  // the segment's first column
  int cols;
};

template <typename T>
__device__ __forceinline__ Cell<T> cell_at(std::int64_t cell, const T* values, float* out_values,
                                           std::int32_t* out_index, const SelectParams& p) {
  Cell<T> c;
  c.row = cell / p.segments;
  const std::int64_t segment = cell - c.row * p.segments;
  c.first = segment * kSegment;
  c.cols = static_cast<int>(min(static_cast<std::int64_t>(kSegment), p.cols - c.first));
  c.in = values + c.row * p.row_stride + c.first;
  c.out_v = out_values + c.row * p.out_row_stride + segment * p.cap;
  c.out_i = out_index + c.row * p.out_row_stride + segment * p.cap;
  return c;
}

// Thread 0 starts a cell: the row's bound so far, and no slot taken. Read after a barrier.
__device__ __forceinline__ void begin_cell(CandidateShared& s, const std::uint32_t* row_bar,
                                           std::int64_t row) {
  if (threadIdx.x == 0) {
    s.known = row_bar[row];
    s.count = 0;
  }
}

// Writes slot `slot` (if there is room) of a cell: the value and its column.
template <typename T, bool kVector>
__device__ __forceinline__ void write_slot(const Cell<T>& c, const SelectParams& p, int slot,
                                           float value, int item) {
  if (slot < p.cap) {
    c.out_v[slot] = value;
    c.out_i[slot] =
        static_cast<std::int32_t>(p.col_offset + c.first + strided_column<T, kVector>(item));
  }
}

// The packed path of a full segment of 16-bit values without bias or scale: the values stay in
// pairs, a thread's maximum takes 15 paired max instructions, and only the few threads whose
// maximum reaches the bar test their values against it (rounded down to the type, so that no
// value at or above the bar is missed; the merge compares exactly). Returns the cell's count, or
// kRedo when the cell needs the key path: a NaN anywhere in it (the key path ranks NaN by its
// bits), or more than cap values at the bar (heavy ties). Every thread returns the same.
template <typename T>
__device__ __forceinline__ int packed_candidates(const Cell<T>& c, const SelectParams& p,
                                                 std::uint32_t* row_bar, CandidateShared& s) {
  using P = Pairs<T>;
  using Pair = typename P::type;
  using L = Loads<T, true>;
  constexpr int kPairs = kItems / 2;
  Pair raw[kPairs];
#pragma unroll
  for (int j = 0; j < L::kCount; ++j) {
    const int base = (j * kThreads + static_cast<int>(threadIdx.x)) * L::kWidth;
    *reinterpret_cast<uint4*>(raw + j * (L::kWidth / 2)) =
        *reinterpret_cast<const uint4*>(c.in + base);
  }
  Pair top = raw[0];
#pragma unroll
  for (int q = 1; q < kPairs; ++q) top = P::max_nan(top, raw[q]);
  const float lo = P::low(top);
  const float hi = P::high(top);
  if (__syncthreads_or(lo != lo || hi != hi)) return kRedo;
  const float thread_max = fmaxf(lo, hi);
  const std::uint32_t bar = segment_bar(float_key(thread_max), c.cols, static_cast<int>(p.k),
                                        &s.known, row_bar + c.row, s.max, s.warp_bar, &s.bar);
  const float bar_value = key_float(bar);
  // -0 and +0 compare equal here, so a thread whose maximum came out as -0 still tests.
  if (thread_max >= bar_value) {
    const Pair bar2 = P::splat_down(bar_value);
#pragma unroll
    for (int q = 0; q < kPairs; ++q) {
      const unsigned reach = P::at_least(raw[q], bar2);
      if (reach & 0x0000ffffu) {
        write_slot<T, true>(c, p, atomicAdd(&s.count, 1), P::low(raw[q]), 2 * q);
      }
      if (reach & 0xffff0000u) {
        write_slot<T, true>(c, p, atomicAdd(&s.count, 1), P::high(raw[q]), 2 * q + 1);
      }
    }
  }
  __syncthreads();
  const int held = s.count;
  __syncthreads();  // every thread has read the count before anyone reuses it
  return held <= p.cap ? held : kRedo;
}

// The key path of a cell: every key at or above the bar goes to the slots, unordered; when more
// than cap do (heavy ties), the segment's exact k largest go instead. Returns the count.
template <typename T, bool kVector>
__device__ __forceinline__ int key_candidates(const Cell<T>& c, const SelectParams& p,
                                              std::uint32_t* row_bar, CandidateShared& s) {
  std::uint32_t key[kItems];
  const std::uint32_t thread_max = load_keys<T, kVector>(
      c.in, c.cols, p.bias ? p.bias + c.first : nullptr, p.scale ? p.scale + c.first : nullptr,
      nullptr, key);
  const int k = static_cast<int>(p.k);
  const std::uint32_t bar =
      segment_bar(thread_max, c.cols, k, &s.known, row_bar + c.row, s.max, s.warp_bar, &s.bar);
  auto push = [&](int item, int slot) {
    write_slot<T, kVector>(c, p, slot, key_float(key[item]), item);
  };
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (key[i] != 0u && key[i] >= bar) push(i, atomicAdd(&s.count, 1));
  }
  __syncthreads();
  int held = s.count;
  if (held > p.cap) held = push_exact_topk<T, kVector>(key, k, s.warp, &s.count, push);
  return held;
}

// One block per (row, segment). The bar is the larger of two lower bounds of what the row's
// k-th largest can be: row_bar[row] (the exact k-th key of the chunks merged so far, raised by
// the segments of this chunk) and this segment's own, the smallest over the warps of each warp's
// ceil(k / 8)-th largest thread maximum (8 ceil(k / 8) >= k distinct values reach it). The own
// bound costs one warp sort and one exchange between warps, where the exact k-th largest
// thread maximum costs a binary search per warp and maximum; it is used only for a segment cut
// short, whose threads need not all hold values.
//
// 16-bit values of a full segment without bias or scale take the packed path first.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads, 4)
    TopkCandidatesKernel(const T* __restrict__ values, float* __restrict__ out_values,
                         std::int32_t* __restrict__ out_index,
                         std::int32_t* __restrict__ out_count, std::uint32_t* __restrict__ row_bar,
                         SelectParams p) {
  __shared__ CandidateShared s;
  const Cell<T> c = cell_at(blockIdx.x, values, out_values, out_index, p);
  begin_cell(s, row_bar, c.row);
  if constexpr (kVector && kHasPairs<T>) {
    if (c.cols == kSegment && !p.bias && !p.scale) {
      const int held = packed_candidates(c, p, row_bar, s);
      if (held != kRedo) {
        if (threadIdx.x == 0) out_count[blockIdx.x] = held;
        return;  // uniform: every thread got the same count
      }
      begin_cell(s, row_bar, c.row);  // the key path starts over
    }
  }
  const int held = key_candidates<T, kVector>(c, p, row_bar, s);
  if (threadIdx.x == 0) out_count[blockIdx.x] = held;
}

// Resident blocks per SM of the packed kernel: without the key path's registers it fits 6
// (40 registers) where TopkCandidatesKernel fits 4, and more blocks keep more loads in flight.
// On an H100 (bf16, 16,384 tokens) the TopK encode ran 1-3% faster than with the packed path
// inside TopkCandidatesKernel; 8 blocks (32 registers, 52 bytes of spills) ran no faster.
constexpr int kPackedBlocks = 6;

// The packed path alone, for chunks of full segments of 16-bit values without bias or scale
// (every chunk of a bf16 / fp16 encode but a short last one). Cells it cannot finish get count
// kRedo and go to TopkCandidatesRedoKernel.
template <typename T>
__global__ void __launch_bounds__(kThreads, kPackedBlocks)
    TopkCandidatesPackedKernel(const T* __restrict__ values, float* __restrict__ out_values,
                               std::int32_t* __restrict__ out_index,
                               std::int32_t* __restrict__ out_count,
                               std::uint32_t* __restrict__ row_bar, SelectParams p) {
  __shared__ CandidateShared s;
  const Cell<T> c = cell_at(blockIdx.x, values, out_values, out_index, p);
  begin_cell(s, row_bar, c.row);
  const int held = packed_candidates(c, p, row_bar, s);
  if (threadIdx.x == 0) out_count[blockIdx.x] = held;
}

// The key path for the cells TopkCandidatesPackedKernel marked, a block per kThreads cells:
// each thread reads one cell's count, and the block takes the marked ones in turn (rarely any).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    TopkCandidatesRedoKernel(const T* __restrict__ values, float* __restrict__ out_values,
                             std::int32_t* __restrict__ out_index,
                             std::int32_t* __restrict__ out_count,
                             std::uint32_t* __restrict__ row_bar, SelectParams p) {
  __shared__ CandidateShared s;
  __shared__ std::int64_t s_cells[kThreads];
  __shared__ int s_marked;
  const std::int64_t mine = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (threadIdx.x == 0) s_marked = 0;
  __syncthreads();
  if (mine < p.rows * p.segments && out_count[mine] == kRedo) {
    s_cells[atomicAdd(&s_marked, 1)] = mine;
  }
  __syncthreads();
  const int marked = s_marked;
  for (int m = 0; m < marked; ++m) {
    const std::int64_t cell = s_cells[m];
    const Cell<T> c = cell_at(cell, values, out_values, out_index, p);
    begin_cell(s, row_bar, c.row);
    const int held = key_candidates<T, true>(c, p, row_bar, s);
    if (threadIdx.x == 0) out_count[cell] = held;
    __syncthreads();  // every thread is done with this cell's shared state
  }
}

// Entries of the merge as one 64-bit word: the order key above the inverted index, so that a
// larger word is a larger value, or an equal value at a lower index. Padding (key 0) is 0.
__device__ __forceinline__ unsigned long long compose(std::uint32_t key, std::int32_t index) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<std::uint32_t>(~index);
}

__device__ __forceinline__ unsigned long long larger(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}

__device__ __forceinline__ unsigned long long smaller(unsigned long long a, unsigned long long b) {
  return a > b ? b : a;
}

// One stage of a bitonic network over a warp's 32 R entries, entry e = 32 r + lane: entries e
// and e ^ stride are ordered, descending within blocks of size whose e & size is 0 (ascending
// there when ascending is set), the other way in the others. Partners within 32 meet through
// a shuffle, farther ones in one lane's registers. size and stride must be compile-time
// constants after unrolling, so that v stays in registers.
template <int R>
__device__ __forceinline__ void bitonic_stage(unsigned long long (&v)[R], int size, int stride,
                                              bool ascending) {
  const int lane = threadIdx.x % 32;
  if (stride < 32) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int e = r * 32 + lane;
      const unsigned long long other = __shfl_xor_sync(0xffffffffu, v[r], stride);
      const bool descending = ((e & size) == 0) != ascending;
      const bool lower = (lane & stride) == 0;
      v[r] = lower == descending ? larger(v[r], other) : smaller(v[r], other);
    }
  } else {
    const int s = stride / 32;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r & s) continue;
      const bool descending = (((r * 32 + lane) & size) == 0) != ascending;
      const unsigned long long hi = larger(v[r], v[r | s]);
      const unsigned long long lo = smaller(v[r], v[r | s]);
      v[r] = descending ? hi : lo;
      v[r | s] = descending ? lo : hi;
    }
  }
}

// log2 of the 32 R entries of a merge.
template <int R>
struct Log2Entries {
  static constexpr int value = R == 1 ? 5 : R == 2 ? 6 : R == 4 ? 7 : 8;
};

// Loops count powers of two by their exponents: a linear count unrolls fully, a shifted one
// may not, and a stride known only at run time would move v out of registers.
template <int R>
__device__ __forceinline__ void bitonic_sort(unsigned long long (&v)[R], bool ascending) {
  static_assert(R == 1 || R == 2 || R == 4 || R == 8, "32, 64, 128 or 256 entries");
#pragma unroll
  for (int log_size = 1; log_size <= Log2Entries<R>::value; ++log_size) {
#pragma unroll
    for (int log_stride = log_size - 1; log_stride >= 0; --log_stride) {
      bitonic_stage<R>(v, 1 << log_size, 1 << log_stride, ascending);
    }
  }
}

// running (descending) absorbs batch: the larger of running[e] and the ascending batch's e-th
// entry are the 32 R largest of both, in a bitonic sequence that one half-cleaner pass per
// stride puts in descending order.
template <int R>
__device__ __forceinline__ void bitonic_absorb(unsigned long long (&running)[R],
                                               unsigned long long (&batch)[R]) {
  bitonic_sort<R>(batch, true);
#pragma unroll
  for (int r = 0; r < R; ++r) running[r] = larger(running[r], batch[r]);
#pragma unroll
  for (int log_stride = Log2Entries<R>::value - 1; log_stride >= 0; --log_stride) {
    bitonic_stage<R>(running, 32 * R, 1 << log_stride, false);
  }
}

// running absorbs the first n entries of the warp's buffer.
template <int R>
__device__ __forceinline__ void absorb_buffer(unsigned long long (&running)[R],
                                              const unsigned long long* buffer, int n) {
  __syncwarp();
  const int lane = threadIdx.x % 32;
  unsigned long long batch[R];
#pragma unroll
  for (int r = 0; r < R; ++r) batch[r] = r * 32 + lane < n ? buffer[r * 32 + lane] : 0ull;
  bitonic_absorb<R>(running, batch);
}

// Where a merge reads a row's candidates: spans of entries, each with a start and a count.
// topk_candidates' slots: one span per segment, float32 values, columns as given.
struct SlotCandidates {
  const float* values;
  const std::int32_t* index;
  const std::int32_t* count;
  int segments;
  int cap;

  __device__ int spans() const { return segments; }
  __device__ std::int64_t start(std::int64_t row, int span) const {
    return (row * segments + span) * cap;
  }
  __device__ int size(std::int64_t row, int span) const {
    return min(count[row * segments + span], cap);
  }
  __device__ std::uint32_t key(std::int64_t j) const { return float_key(values[j]); }
  __device__ std::int32_t column(std::int64_t j) const { return index[j]; }
};

// Compressed rows (the fused GEMM's survivors above a floor): one span a row, bfloat16 or
// float16 values (Value), columns counted from col_offset.
template <class Value>
struct RowCandidates {
  const std::int64_t* row_ptr;
  const std::int32_t* index;
  const Value* values;
  std::int32_t col_offset;

  __device__ int spans() const { return 1; }
  __device__ std::int64_t start(std::int64_t row, int) const { return row_ptr[row]; }
  __device__ int size(std::int64_t row, int) const {
    return static_cast<int>(row_ptr[row + 1] - row_ptr[row]);
  }
  __device__ std::uint32_t key(std::int64_t j) const { return float_key(to_float(values[j])); }
  __device__ std::int32_t column(std::int64_t j) const { return index[j] + col_offset; }
};

// One warp per row. The running top-k (descending, padding last) sits in the warp's registers,
// R = ceil(k / 32) entries a lane. The row's candidates that reach its bar are packed into a
// per-warp buffer in shared memory; each 32 R of them are sorted and absorbed by a bitonic
// merge, so a row costs O(candidates log^2 k) shuffles and no block-wide barriers. Entries below
// the bar cannot be among the k largest: at least k entries reach it.
template <int R, class Source>
__global__ void __launch_bounds__(kMergeWarps * 32)
    TopkMergeKernel(float* __restrict__ top_values, std::int32_t* __restrict__ top_index,
                    const Source source, std::uint32_t* __restrict__ row_bar, SelectParams p) {
  constexpr int kBatch = 32 * R;
  __shared__ unsigned long long s_buffer[kMergeWarps][kBatch + 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (row >= p.rows) return;  // the whole warp: no barrier below spans warps
  unsigned long long* buffer = s_buffer[warp];
  const int k = static_cast<int>(p.k);
  const std::uint32_t bar = row_bar[row];
  float* top_v = top_values + row * p.out_row_stride;
  std::int32_t* top_i = top_index + row * p.out_row_stride;
  const unsigned before_me = (1u << lane) - 1u;

  unsigned long long running[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int e = r * 32 + lane;
    running[r] = 0ull;
    if (e < k && top_i[e] >= 0) running[r] = compose(float_key(top_v[e]), top_i[e]);
  }
  int fill = 0;  // the same in every lane
  for (int span = 0; span < source.spans(); ++span) {
    const std::int64_t start = source.start(row, span);
    const int count = source.size(row, span);
    for (int base = 0; base < count; base += 32) {
      const std::int64_t j = start + base + lane;
      std::uint32_t key = 0;
      if (base + lane < count) key = source.key(j);
      const bool keep = key != 0u && key >= bar;
      const unsigned mask = __ballot_sync(0xffffffffu, keep);
      if (keep) buffer[fill + __popc(mask & before_me)] = compose(key, source.column(j));
      fill += __popc(mask);
      if (fill >= kBatch) {
        absorb_buffer<R>(running, buffer, kBatch);
        const int left = fill - kBatch;  // < 32
        const unsigned long long carry = lane < left ? buffer[kBatch + lane] : 0ull;
        __syncwarp();
        if (lane < left) buffer[lane] = carry;
        __syncwarp();
        fill = left;
      }
    }
  }
  if (fill > 0) absorb_buffer<R>(running, buffer, fill);

  unsigned long long kth = 0;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int e = r * 32 + lane;
    if (e < k) {
      const bool held = running[r] != 0ull;
      top_v[e] = held ? key_float(static_cast<std::uint32_t>(running[r] >> 32))
                      : __int_as_float(0xff800000);  // -inf padding
      top_i[e] = held ? static_cast<std::int32_t>(~static_cast<std::uint32_t>(running[r])) : -1;
    }
    if (r == (k - 1) / 32) kth = running[r];
  }
  kth = __shfl_sync(0xffffffffu, kth, (k - 1) % 32);
  if (lane == 0 && kth != 0ull) row_bar[row] = max(bar, static_cast<std::uint32_t>(kth >> 32));
}

unsigned grid_size(std::int64_t blocks, const char* op) {
  MECHINTERP_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": at most ",
                   std::numeric_limits<int>::max(), " blocks, got ", blocks);
  return static_cast<unsigned>(blocks);
}

// The merge kernel for k (at most 256): R = ceil(k / 32) rounded up to a power of two.
template <class Source>
void launch_merge(float* top_values, std::int32_t* top_index, const Source& source,
                  std::uint32_t* row_bar, const SelectParams& params, cudaStream_t stream) {
  const unsigned blocks = grid_size((params.rows + kMergeWarps - 1) / kMergeWarps, "topk_merge");
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kMergeWarps * 32, 0, stream>>>(top_values, top_index, source, row_bar,
                                                    params);
  };
  if (params.k <= 32) {
    launch(TopkMergeKernel<1, Source>);
  } else if (params.k <= 64) {
    launch(TopkMergeKernel<2, Source>);
  } else if (params.k <= 128) {
    launch(TopkMergeKernel<4, Source>);
  } else {
    launch(TopkMergeKernel<8, Source>);
  }
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_topk_candidates_cuda(const T* values, float* out_values, std::int32_t* out_index,
                                 std::int32_t* out_count, std::uint32_t* row_bar,
                                 const SelectParams& params, cudaStream_t stream) {
  using device_t = cuda_scalar_t<T>;
  const auto* in = reinterpret_cast<const device_t*>(values);
  const unsigned blocks = grid_size(params.rows * params.segments, "topk_candidates");
  const bool vector = can_load_vectors(values, params.row_stride);
  if constexpr (sizeof(T) == 2) {
    if (vector && params.cols % kSegment == 0 && !params.bias && !params.scale) {
      TopkCandidatesPackedKernel<device_t><<<blocks, kThreads, 0, stream>>>(
          in, out_values, out_index, out_count, row_bar, params);
      MECHINTERP_CUDA_LAUNCH_CHECK();
      TopkCandidatesRedoKernel<device_t><<<(blocks + kThreads - 1) / kThreads, kThreads, 0,
                                           stream>>>(in, out_values, out_index, out_count,
                                                     row_bar, params);
      MECHINTERP_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  if (vector) {
    TopkCandidatesKernel<device_t, true><<<blocks, kThreads, 0, stream>>>(
        in, out_values, out_index, out_count, row_bar, params);
  } else {
    TopkCandidatesKernel<device_t, false><<<blocks, kThreads, 0, stream>>>(
        in, out_values, out_index, out_count, row_bar, params);
  }
  MECHINTERP_CUDA_LAUNCH_CHECK();
}

void launch_topk_merge_cuda(float* top_values, std::int32_t* top_index, const float* cand_values,
                            const std::int32_t* cand_index, const std::int32_t* cand_count,
                            std::uint32_t* row_bar, const SelectParams& params,
                            cudaStream_t stream) {
  const SlotCandidates source{cand_values, cand_index, cand_count,
                              static_cast<int>(params.segments), static_cast<int>(params.cap)};
  launch_merge(top_values, top_index, source, row_bar, params, stream);
}

void launch_topk_merge_rows_cuda(float* top_values, std::int32_t* top_index,
                                 const std::int64_t* row_ptr, const std::int32_t* cand_index,
                                 const std::uint16_t* cand_values, bool float16,
                                 std::uint32_t* row_bar, const SelectParams& params,
                                 cudaStream_t stream) {
  const auto col_offset = static_cast<std::int32_t>(params.col_offset);
  if (float16) {
    const RowCandidates<__half> source{row_ptr, cand_index,
                                       reinterpret_cast<const __half*>(cand_values), col_offset};
    launch_merge(top_values, top_index, source, row_bar, params, stream);
  } else {
    const RowCandidates<__nv_bfloat16> source{
        row_ptr, cand_index, reinterpret_cast<const __nv_bfloat16*>(cand_values), col_offset};
    launch_merge(top_values, top_index, source, row_bar, params, stream);
  }
}

template void launch_topk_candidates_cuda<float>(const float*, float*, std::int32_t*,
                                                 std::int32_t*, std::uint32_t*,
                                                 const SelectParams&, cudaStream_t);
template void launch_topk_candidates_cuda<Half>(const Half*, float*, std::int32_t*, std::int32_t*,
                                                std::uint32_t*, const SelectParams&, cudaStream_t);
template void launch_topk_candidates_cuda<BFloat16>(const BFloat16*, float*, std::int32_t*,
                                                    std::int32_t*, std::uint32_t*,
                                                    const SelectParams&, cudaStream_t);

}  // namespace mechinterp::sae
