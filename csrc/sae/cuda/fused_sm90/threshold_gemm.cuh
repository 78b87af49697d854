// The threshold encode of a bfloat16 or float16 SAE fused into a CUTLASS Hopper GEMM (sm_90a):
// the epilogue turns each tile's accumulators into survivors and never writes the [tokens,
// d_sae] matrix. Included by one translation unit per kernel and element type (they compile in
// parallel, and each costs about 4 GB of compiler memory).
//
// A survivor is a column c of row r with v = E(acc + bias[c]) > bound[c] (E the element type),
// where bound is the threshold rounded down to E with the ReLU folded in (bound >= 0), so the
// packed 16-bit compare is exact; or, with a floor per row (a TopK encode's lower bound of each
// row's k-th largest), v >= floor[r] or v NaN (which ranks by its bits). Each becomes a 32-bit
// record (row in tile << 24 | column in tile << 16 | v's bits) in a fixed region of `cap` records
// per (tile, consumer warp); records_cuda.cu turns the records into compressed rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"
#include "sae/fused_threshold.h"

namespace mechinterp::sae::fused_sm90 {

using namespace cute;

// An element type's packed pair, and two floats rounded into one (the compares below are
// overloaded on the pair type).
template <class Element>
struct PairOf;
template <>
struct PairOf<cutlass::bfloat16_t> {
  using type = __nv_bfloat162;
  static CUTLASS_DEVICE type round(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <>
struct PairOf<cutlass::half_t> {
  using type = __half2;
  static CUTLASS_DEVICE type round(float a, float b) { return __floats2half2_rn(a, b); }
};

// The epilogue's sink: consumes the pre-activation and bound fragments, writes records.
//
// Slots within a warp's region come from a warp scan, so the epilogue never waits on a global
// atomic's reply: CUTLASS's sm90 epilogue passes two named barriers per subtile, and a warp
// waiting on a returning atomic held up the whole CTA (it cost more than the GEMM, measured on
// an H100). Row totals are counted with atomics whose result is unused. end() stores the warp's
// count, which exceeds cap when records were dropped, and then flags the tile row (the caller
// encodes its rows again); it also adds the count to its tile row's total, from which the
// compaction's blocks work out where each tile row's entries begin.
//
// Records are laid out by record tiles of kFusedTileM x kFusedTileN with kFusedWarps regions
// each, whatever the GEMM's tile: a kernel whose tiles are TileM = kFusedTileM / 2 rows tall
// (ping-pong, one warpgroup of 4 warps a tile) fills the upper or lower half of a record tile's
// regions, so the compaction reads every kernel's records alike.
template <int TileM, int WarpsPerTile, bool RowFloor, class Element>
struct RecordSink {
  using Pair = typename PairOf<Element>::type;
  static_assert(kFusedTileM % TileM == 0 && WarpsPerTile * (kFusedTileM / TileM) == kFusedWarps,
                "GEMM tiles must split a record tile's rows and regions evenly");
  // With a void D, CUTLASS's epilogue builder sizes its (unused) store types from the fusion's
  // ElementAux; any 16-bit type keeps the shared-memory carve-out at what the layouts need.
  using ElementAux = cutlass::bfloat16_t;
  struct SharedStorage {};
  struct Arguments {
    std::uint32_t* records = nullptr;  // [tiles_m, tiles_n, kFusedWarps, cap]
    std::int32_t* warp_count = nullptr;  // [tiles_m, tiles_n, kFusedWarps]
    std::int32_t* row_count = nullptr;   // [rows], zeroed by the caller
    std::int32_t* tile_overflow = nullptr;  // [tiles_m], zeroed by the caller
    std::int32_t* tile_total = nullptr;     // [tiles_m], zeroed by the caller
    int cap = 0;
    int tiles_n = 0;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.records != nullptr && args.warp_count != nullptr && args.row_count != nullptr &&
           args.tile_overflow != nullptr && args.tile_total != nullptr && args.cap > 0;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE RecordSink() {}
  CUTLASS_HOST_DEVICE RecordSink(Params const& params, SharedStorage const&) : params(params) {}
  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(
      cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CoordTensor, class Residue>
  struct Callbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE Callbacks(CoordTensor coords, Residue residue, int row0, int col0,
                             std::uint32_t* region, std::int32_t* count_at,
                             std::int32_t* overflow_at, std::int32_t* total_at, int cap,
                             std::int32_t* tile_row_count)
        : coords(coords), residue(residue), row0(row0), col0(col0), region(region),
          count_at(count_at), overflow_at(overflow_at), total_at(total_at), cap(cap),
          tile_row_count(tile_row_count) {}

    CoordTensor coords;  // (row, column) of this thread's elements from its first one
    Residue residue;     // rows and columns of the problem left from the thread's first element
    int row0, col0;      // the thread's first element, from the tile's corner
    std::uint32_t* region;  // this warp's records
    std::int32_t* count_at;  // null for a tile wholly outside the problem
    std::int32_t* overflow_at;  // the tile row's flag
    std::int32_t* total_at;     // the tile row's survivors
    int cap;
    std::int32_t* tile_row_count;  // survivors per row, from the tile's first row
    int filled = 0;                // records this warp produced so far (warp-uniform)

    // The rare path, kept small so that the unrolled epilogue stays compact (unrolled, it grew
    // the kernel threefold and slowed it): survivors as a bit set, one warp scan for the slots,
    // loops over set bits that are not unrolled.
    template <int Size>
    CUTLASS_DEVICE int append(const unsigned* masks, const Pair* pairs, int epi_v,
                              int epi_m, int epi_n, int filled_before) {
      static_assert(Size <= 64, "a fragment's survivors fit one 64-bit set");
      std::uint64_t bits = 0;
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < Size / 2; ++q) {
        bits |= (std::uint64_t(masks[q] & 1u) << (2 * q)) |
                (std::uint64_t((masks[q] >> 16) & 1u) << (2 * q + 1));
      }
      Tensor subtile = coords(_, _, _, epi_m, epi_n);
      std::uint64_t inside = 0;  // partial tiles: drop what lies past the problem's edge
#pragma unroll 1
      for (std::uint64_t b = bits; b != 0; b &= b - 1) {
        const int i = __ffsll(static_cast<long long>(b)) - 1;
        if (elem_less(subtile(epi_v * Size + i), residue)) inside |= std::uint64_t(1) << i;
      }
      const int lane = static_cast<int>(threadIdx.x % 32);
      const int mine = __popcll(inside);
      int upto = mine;  // inclusive scan of survivors over the warp's lanes
      CUTLASS_PRAGMA_UNROLL
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, upto, d);
        if (lane >= d) upto += up;
      }
      const int total = __shfl_sync(0xffffffffu, upto, 31);
      int slot = filled_before + upto - mine;
      // A copy made only here: indexing `pairs` by a run-time index put the whole fragment in
      // local memory on the hot path too.
      std::uint32_t staged[Size / 2];
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < Size / 2; ++q) staged[q] = reinterpret_cast<const std::uint32_t&>(pairs[q]);
#pragma unroll 1
      for (std::uint64_t b = inside; b != 0; b &= b - 1, ++slot) {
        const int i = __ffsll(static_cast<long long>(b)) - 1;
        const auto coord = subtile(epi_v * Size + i);
        const auto row = static_cast<std::uint32_t>(row0 + int(get<0>(coord)));
        atomicAdd(tile_row_count + row, 1);
        if (slot >= cap) continue;
        const std::uint32_t pair = staged[i / 2];
        const std::uint32_t bits16 = (i % 2) ? (pair >> 16) : (pair & 0xffffu);
        const auto col = static_cast<std::uint32_t>(col0 + int(get<1>(coord)));
        region[slot] = (row << 24) | (col << 16) | bits16;
      }
      return filled_before + total;
    }

    template <class Acc, class Pre, class Bound, int Size>
    CUTLASS_DEVICE auto visit(cutlass::Array<Acc, Size> const&, int epi_v, int epi_m, int epi_n,
                              cutlass::Array<Pre, Size> const& pre,
                              cutlass::Array<Bound, Size> const& bound) {
      static_assert(Size % 2 == 0, "the compare runs on pairs");
      Pair pairs[Size / 2];
      unsigned masks[Size / 2];
      unsigned any = 0;
      const auto* bound2 = reinterpret_cast<const Pair*>(bound.data());
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < Size / 2; ++q) {
        pairs[q] = PairOf<Element>::round(static_cast<float>(pre[2 * q]),
                                          static_cast<float>(pre[2 * q + 1]));
        if constexpr (RowFloor) {
          masks[q] = __hge2_mask(pairs[q], bound2[q]) | __hneu2_mask(pairs[q], pairs[q]);
        } else {
          masks[q] = __hgt2_mask(pairs[q], bound2[q]);
        }
        any |= masks[q];
      }
      if (__any_sync(0xffffffffu, any != 0)) {
        filled = append<Size>(masks, pairs, epi_v, epi_m, epi_n, filled);
      }
      return pre;
    }

    CUTLASS_DEVICE void end() {
      if (count_at == nullptr || threadIdx.x % 32 != 0) return;
      *count_at = filled;
      // The compaction's running sums start from these (an overflowed tile row's is unused).
      if (filled > 0) atomicAdd(total_at, filled);
      if (filled > cap) *overflow_at = 1;  // racing stores of one value
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [m, n, k, l] = args.problem_shape_mnkl;
    auto [tm, tn, tk, tl] = args.tile_coord_mnkl;
    // The record tile holding this GEMM tile, and the GEMM tile's half of it (0 when they match).
    const int record_tm = int(tm) * TileM / kFusedTileM;
    const int part = int(tm) % (kFusedTileM / TileM);
    // The residue counts from the thread's first element; rows count from the record tile's.
    const int row0 = int(m) - int(get<0>(args.residue_tCcD)) - record_tm * kFusedTileM;
    const int col0 = int(n) - int(get<1>(args.residue_tCcD)) - int(tn) * kFusedTileN;
    // thread_idx counts the tile's consumer threads (both warpgroups of a cooperative kernel).
    const int warp = part * WarpsPerTile + args.thread_idx / 32;
    const std::int64_t slot =
        (std::int64_t(record_tm) * params.tiles_n + std::int64_t(tn)) * kFusedWarps + warp;
    // The grid is rounded up to whole clusters, so a tile may lie wholly past the problem's
    // edge; it has no survivors, and its count would land on another tile's (or past the end).
    const bool inside = int(tm) * TileM < int(m) && int(tn) * kFusedTileN < int(n);
    return Callbacks<decltype(args.tCcD), decltype(args.residue_tCcD)>(
        args.tCcD, args.residue_tCcD, row0, col0, params.records + slot * params.cap,
        inside ? params.warp_count + slot : nullptr, params.tile_overflow + record_tm,
        params.tile_total + record_tm, params.cap,
        params.row_count + std::int64_t(record_tm) * kFusedTileM);
  }
};

// x [rows, d_in] row-major times W [d_in, d_sae] row-major (16-bit wgmma reads either
// layout), fp32 accumulators, the bias added in fp32 before one rounding to the element type
// (as cuBLAS's addmm does), and the sink. C and D are void: nothing is loaded or stored besides
// records.
//
// Cooperative kernels split each 128 x 256 tile between two consumer warpgroups, which run the
// epilogue together while the tensor cores idle. Ping-pong kernels give each warpgroup its own
// 64 x 256 tile and alternate them, so one warpgroup's epilogue overlaps the other's main loop:
// the epilogue's share is largest where d_in (the main loop) is short.
//
// RowFloor swaps the bound per latent for a floor per row (a column vector broadcast along the
// tile), and the weight may be a block of columns of a wider matrix (its row stride
// weight_ld), so that a TopK encode can run on the latents past the ones it sampled.
//
// Element is cutlass::bfloat16_t or cutlass::half_t: x, the weight, the bias and the bound.
template <int ClusterM, int ClusterN, bool PingPong, bool RowFloor, class Element>
struct ThresholdGemm {
  using Layout = cutlass::layout::RowMajor;
  static constexpr int kTileM = PingPong ? kFusedTileM / 2 : kFusedTileM;
  using TileShape = Shape<Int<kTileM>, Int<kFusedTileN>, _64>;
  // Subtiles of 64 elements a thread: fewer epilogue barriers per tile than the automatic choice
  // (128 x 128 cooperative: 1.14-1.20x the GEMM against 1.28x at d_in 768, H100).
  using EpilogueTile = Shape<Int<kTileM>, _128>;
  using ClusterShape = Shape<Int<ClusterM>, Int<ClusterN>, _1>;
  using MainloopSchedule = std::conditional_t<
      PingPong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<
      PingPong, cutlass::epilogue::TmaWarpSpecialized,
      cutlass::epilogue::TmaWarpSpecializedCooperative>;

  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, float>;
  using Bound = std::conditional_t<
      RowFloor, cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, Element, Element>,
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, Element>>;
  using PreActivation = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch, Bias>;
  using Sink = RecordSink<kTileM, PingPong ? kFusedWarps / 2 : kFusedWarps, RowFloor, Element>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<Sink, PreActivation, Bound>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      EpilogueTile, float, float, void, Layout, 8, void, Layout, 8,
      EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, Layout, 8, Element, Layout,
      8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop,
                                                      Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const FusedGemmParams& p) {
    const int m = static_cast<int>(p.rows), n = static_cast<int>(p.d_sae),
              k = static_cast<int>(p.d_in);
    auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(m, k, 1));
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(n, k, 1));
    get<1>(stride_b) = p.weight_ld;  // a block of columns steps by the whole matrix's rows
    auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(m, n, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(m, n, 1));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = p.device;
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const Element*>(p.x), stride_a, static_cast<const Element*>(p.weight),
         stride_b},
        {{}, nullptr, stride_c, nullptr, stride_d},
        hw};
    using RasterOptions = typename Kernel::TileScheduler::RasterOrderOptions;
    args.scheduler.raster_order = static_cast<RasterOptions>(p.raster);
    args.scheduler.max_swizzle_size = p.swizzle;
    args.epilogue.thread = {{{}, {static_cast<const Element*>(p.bias)}, {}},
                            {static_cast<const Element*>(p.bound)},
                            {p.records, p.warp_count, p.row_count, p.tile_overflow,
                             p.tile_total,
                             static_cast<int>(p.cap),
                             static_cast<int>(fused_tiles(p.d_sae, kFusedTileN))}};
    return args;
  }

  static std::size_t workspace_bytes(const FusedGemmParams& p) {
    return Gemm::get_workspace_size(arguments(p));
  }

  // CUTLASS's adapter sets the kernel's shared-memory size and cluster attributes on every
  // launch; they hold for the process, so they are set once a device (each call into the
  // driver costs the host microseconds while the GPU waits for this GEMM). Devices past the
  // mask's 64 bits set them every time.
  static bool attributes_set(int device) {
    static std::atomic<std::uint64_t> ready{0};
    const std::uint64_t bit = device < 64 ? std::uint64_t{1} << device : 0;
    if (bit != 0 && (ready.load(std::memory_order_acquire) & bit) != 0) return true;
    const void* kernel = reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>);
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(Kernel::SharedStorageSize)) != cudaSuccess) {
      (void)cudaGetLastError();  // reported as CUTLASS's setup failing
      return false;
    }
    ready.fetch_or(bit, std::memory_order_acq_rel);
    return true;
  }

  // An empty string, or what CUTLASS refused. The launch is CUTLASS's adapter's (grid, block,
  // shared memory, cluster shape) without its per-call attribute calls.
  static const char* run(const FusedGemmParams& p, void* workspace, cudaStream_t stream) {
    const auto args = arguments(p);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) {
      return "CUTLASS cannot run this problem (pointers and row strides must be 16-byte aligned)";
    }
    if (Gemm::get_workspace_size(args) > p.workspace_bytes) return "the workspace is too small";
    if (Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess ||
        !attributes_set(p.device)) {
      return "CUTLASS could not set the kernel up (shared memory or workspace)";
    }
    auto params = Kernel::to_underlying_arguments(args, workspace);
    cudaLaunchConfig_t config{};
    config.gridDim = Gemm::get_grid_shape(params);
    config.blockDim = Kernel::get_block_shape();
    config.dynamicSmemBytes = Kernel::SharedStorageSize;
    config.stream = stream;
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = ClusterM;
    cluster.val.clusterDim.y = ClusterN;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    void* kernel_params[] = {&params};
    const void* kernel = reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>);
    if (cudaLaunchKernelExC(&config, kernel, kernel_params) != cudaSuccess) {
      (void)cudaGetLastError();  // reported by the caller
      return "the kernel launch failed";
    }
    return "";
  }

  static FusedGemmEntry entry() { return {&run, &workspace_bytes}; }
};

}  // namespace mechinterp::sae::fused_sm90
