// Measurement of a JumpReLU / ReLU SAE encode fused into a CUTLASS Hopper GEMM's epilogue
// (sm_90a, bf16): the dense tokens x latents matrix is never written. Each surviving
// pre-activation (acc + bias rounded to bf16, greater than the threshold rounded down to bf16,
// ReLU folded in) becomes a 32-bit record (row in tile, column in tile, bf16 value) in a fixed
// region per (tile, consumer warp); two small kernels turn the records into compressed rows with
// columns in ascending order. Built and run by run.sh next to this file; not part of the package.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdint>
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace fused {

// Epilogue sink. Slots within a warp's region come from a warp scan, so the epilogue never waits
// on a global atomic's reply (a returning atomic per survivor stalled the whole CTA at the
// epilogue's per-subtile barriers and cost more than the GEMM). Rows' totals are counted with
// atomics whose result is unused. end() stores each warp's count, which may exceed cap (the
// caller then re-encodes those rows another way).
constexpr int kWarpsPerTile = 8;  // two consumer warpgroups of the cooperative kernel
template <class ElementCompute = float>
struct Sm90ThresholdRecordSink {
  using ElementAux = cutlass::bfloat16_t;
  struct SharedStorage {};
  struct Arguments {
    uint32_t* records = nullptr;   // [tiles_m, tiles_n, 8, cap]
    int* warp_count = nullptr;     // [tiles_m, tiles_n, 8]
    int cap = 0;
    int* row_count = nullptr;      // [M], survivors per row (fire-and-forget atomics)
    int tiles_n = 0;
  };
  using Params = Arguments;
  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& a, void*) { return a; }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) { return true; }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }
  CUTLASS_HOST_DEVICE Sm90ThresholdRecordSink() {}
  CUTLASS_HOST_DEVICE Sm90ThresholdRecordSink(Params const& p, SharedStorage const&) : params(p) {}
  Params params;

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CTensor, class ThrResidue>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor tCcD, ThrResidue residue, int row0, int col0,
                                          uint32_t* region, int* count_at, int cap, int* tile_row_count)
      : tCcD(tCcD), residue_tCcD(residue), row0(row0), col0(col0), region(region), count_at(count_at), cap(cap),
        tile_row_count(tile_row_count) {}
    CTensor tCcD;
    ThrResidue residue_tCcD;
    int row0, col0;      // this thread's first element, relative to the tile
    uint32_t* region;    // this warp's records
    int* count_at;
    int cap;
    int* tile_row_count; // survivors per row, from this tile's first row
    int filled = 0;      // warp-uniform

    // The rare path kept small: survivors as a bit set, one warp scan for the slots, and loops
    // over set bits that are not unrolled, so that the unrolled epilogue stays compact.
    template <int FragmentSize>
    CUTLASS_DEVICE int append_compact(const unsigned* masks, const __nv_bfloat162* v2, int epi_v, int epi_m,
                                      int epi_n, int filled) {
      static_assert(FragmentSize <= 64, "one bit set");
      uint64_t bits = 0;
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < FragmentSize / 2; ++q) {
        bits |= (uint64_t(masks[q] & 1u) << (2 * q)) | (uint64_t((masks[q] >> 16) & 1u) << (2 * q + 1));
      }
      Tensor tCcD_mn = tCcD(_,_,_,epi_m,epi_n);
      uint64_t inside = 0;
      #pragma unroll 1
      for (uint64_t b = bits; b != 0; b &= b - 1) {
        const int i = __ffsll(b) - 1;
        if (elem_less(tCcD_mn(epi_v * FragmentSize + i), residue_tCcD)) inside |= 1ull << i;
      }
      const int lane = threadIdx.x % 32;
      const int mine = __popcll(inside);
      int upto = mine;
      CUTLASS_PRAGMA_UNROLL
      for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, upto, d);
        if (lane >= d) upto += up;
      }
      const int total = __shfl_sync(0xffffffffu, upto, 31);
      int slot = filled + upto - mine;
      // A local copy made only on this rare path: indexing v2 itself by a run-time index put it in
      // local memory on the hot path as well.
      uint32_t staged[FragmentSize / 2];
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < FragmentSize / 2; ++q) staged[q] = reinterpret_cast<const uint32_t&>(v2[q]);
      #pragma unroll 1
      for (uint64_t b = inside; b != 0; b &= b - 1, ++slot) {
        const int i = __ffsll(b) - 1;
        auto c = tCcD_mn(epi_v * FragmentSize + i);
        const uint32_t row = uint32_t(row0 + int(get<0>(c)));
        atomicAdd(tile_row_count + row, 1);
        if (slot >= cap) continue;
        const uint32_t pair = staged[i / 2];
        const uint32_t value = (i % 2) ? (pair >> 16) : (pair & 0xffffu);
        const uint32_t col = uint32_t(col0 + int(get<1>(c)));
        region[slot] = (row << 24) | (col << 16) | value;
      }
      return filled + total;
    }

    template <class ElementAccumulator, class ElementPre, class ElementThr, int FragmentSize>
    CUTLASS_DEVICE auto
    visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
          cutlass::Array<ElementPre, FragmentSize> const& frg_pre,
          cutlass::Array<ElementThr, FragmentSize> const& frg_thr) {
      static_assert(FragmentSize % 2 == 0, "pairs");
#ifdef FUSED_NOP
      if (true) return frg_pre;  // the GEMM's floor: no epilogue work at all
#endif
      __nv_bfloat162 v2[FragmentSize / 2];
      unsigned masks[FragmentSize / 2];
      unsigned any = 0;
      const __nv_bfloat162* thr2 = reinterpret_cast<const __nv_bfloat162*>(frg_thr.data());
      CUTLASS_PRAGMA_UNROLL
      for (int q = 0; q < FragmentSize / 2; ++q) {
        v2[q] = __floats2bfloat162_rn(static_cast<float>(frg_pre[2 * q]), static_cast<float>(frg_pre[2 * q + 1]));
        masks[q] = __hgt2_mask(v2[q], thr2[q]);
        any |= masks[q];
      }
      if (__any_sync(0xffffffffu, any != 0)) {
        filled = append_compact<FragmentSize>(masks, v2, epi_v, epi_m, epi_n, filled);
      }
      return frg_pre;
    }

    CUTLASS_DEVICE void end() {
      if (threadIdx.x % 32 == 0) *count_at = filled;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto
  get_consumer_store_callbacks(cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [tm, tn, tk, tl] = args.tile_coord_mnkl;
    auto [TM, TN, TK] = args.tile_shape_mnk;
    const int row0 = int(M) - int(get<0>(args.residue_tCcD)) - int(tm) * int(TM);
    const int col0 = int(N) - int(get<1>(args.residue_tCcD)) - int(tn) * int(TN);
    const int warp = args.thread_idx / 32;
    const long slot_base = (long(tm) * params.tiles_n + long(tn)) * kWarpsPerTile + warp;
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(args.residue_tCcD)>(
        args.tCcD, args.residue_tCcD, row0, col0, params.records + slot_base * params.cap,
        params.warp_count + slot_base, params.cap, params.row_count + long(tm) * int(TM));
  }
};

// ---------------------------------------------------------------------------
// GEMM type: A row-major [M,K], B row-major [K,N] (N-major, fine for 16-bit wgmma)
// ---------------------------------------------------------------------------
using ElementA = cutlass::bfloat16_t;
using ElementB = cutlass::bfloat16_t;
using ElementAcc = float;
using ElementCompute = float;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::RowMajor;
using LayoutD = cutlass::layout::RowMajor;  // only for stride type; D is void
constexpr int AlignA = 8, AlignB = 8;

#ifndef FUSED_CLUSTER_M
#define FUSED_CLUSTER_M 1
#endif
#ifndef FUSED_CLUSTER_N
#define FUSED_CLUSTER_N 2
#endif
#ifndef FUSED_EPI_N
#define FUSED_EPI_N 128
#endif
constexpr int kTileM = 128, kTileN = 256;  // records hold the row and column in a tile in 8 bits each
using TileShape = Shape<Int<kTileM>, Int<kTileN>, _64>;
using EpiTile = Shape<_128, Int<FUSED_EPI_N>>;
using ClusterShape = Shape<Int<FUSED_CLUSTER_M>, Int<FUSED_CLUSTER_N>, _1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;

namespace fu = cutlass::epilogue::fusion;
using Bias = fu::Sm90RowBroadcast<0, TileShape, float, ElementCompute>;        // bias[N] fp32
using Thr  = fu::Sm90RowBroadcast<0, TileShape, cutlass::bfloat16_t, cutlass::bfloat16_t>;  // bf16 bounds
using PreAct = fu::Sm90EVT<fu::Sm90Compute<cutlass::plus, ElementCompute, ElementCompute, Round>,
                           fu::Sm90AccFetch, Bias>;
using EVT = fu::Sm90EVT<Sm90ThresholdRecordSink<ElementCompute>, PreAct, Thr>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    TileShape, ClusterShape, EpiTile,
    ElementAcc, ElementCompute,
    void, LayoutD, 8,   // C: void -> no source load
    void, LayoutD, 8,   // D: void -> no TMA store
    EpiSchedule, EVT>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementA, LayoutA, AlignA, ElementB, LayoutB, AlignB, ElementAcc,
    TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    KernelSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<
    Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

}  // namespace fused

// The fused GEMM. row_count must be zeroed before; bias is float32, threshold the bf16 bounds.
extern "C" int sae_encode_launch(const void* A, const void* B, const float* bias, const void* threshold,
                                 uint32_t* records, int* warp_count, int cap, int* row_count, int M, int N, int K,
                                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using namespace fused;
  using StrideA = typename GemmKernel::StrideA;
  using StrideB = typename GemmKernel::StrideB;
  using StrideC = typename GemmKernel::StrideC;
  using StrideD = typename GemmKernel::StrideD;
  StrideA sA = cutlass::make_cute_packed_stride(StrideA{}, make_shape(M, K, 1));
  StrideB sB = cutlass::make_cute_packed_stride(StrideB{}, make_shape(N, K, 1));
  StrideC sC = cutlass::make_cute_packed_stride(StrideC{}, make_shape(M, N, 1));
  StrideD sD = cutlass::make_cute_packed_stride(StrideD{}, make_shape(M, N, 1));
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw.device_id);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1},
      {static_cast<ElementA const*>(A), sA, static_cast<ElementB const*>(B), sB},
      {{}, nullptr, sC, nullptr, sD}, hw};
  const int tiles_n = (N + kTileN - 1) / kTileN;
  args.epilogue.thread = {{{}, {bias}, {}}, {static_cast<cutlass::bfloat16_t const*>(threshold)},
                          {records, warp_count, cap, row_count, tiles_n}};
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 4;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 5;
  return 0;
}

// Compaction, 1: every survivor to the next free slot of its row (one block per tile).
__global__ void records_place_kernel(const uint32_t* records, const int* warp_count, int cap, int M, int tiles_n,
                                     const long* row_ptr, int* cursor, int* tmp_index, __nv_bfloat16* tmp_value) {
  const int tn = blockIdx.x, tm = blockIdx.y;
  const long tile = long(tm) * tiles_n + tn;
  for (int w = 0; w < fused::kWarpsPerTile; ++w) {
    const int n = min(warp_count[tile * fused::kWarpsPerTile + w], cap);
    const uint32_t* r = records + (tile * fused::kWarpsPerTile + w) * cap;
    for (int s = threadIdx.x; s < n; s += blockDim.x) {
      const uint32_t rec = r[s];
      const long m = long(tm) * fused::kTileM + (rec >> 24);
      const long at = row_ptr[m] + atomicAdd(cursor + m, 1);
      tmp_index[at] = tn * fused::kTileN + int((rec >> 16) & 0xffu);
      tmp_value[at] = __ushort_as_bfloat16(static_cast<unsigned short>(rec & 0xffffu));
    }
  }
}

// Compaction, 2: one warp per row puts every entry at its rank among the row's columns.
__global__ void rows_order_kernel(int M, const long* row_ptr, const int* tmp_index, const __nv_bfloat16* tmp_value,
                                  long* out_index, __nv_bfloat16* out_value) {
  const long m = (long(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (m >= M) return;
  const long base = row_ptr[m];
  const int n = int(row_ptr[m + 1] - base);
  for (int i = lane; i < n; i += 32) {
    const int key = tmp_index[base + i];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += tmp_index[base + j] < key;
    out_index[base + rank] = key;
    out_value[base + rank] = tmp_value[base + i];
  }
}

// Records to compressed rows (row_ptr from the fused GEMM's row counts, cursor zeroed). The rows of
// a warp whose count exceeded cap come out incomplete: the caller encodes those rows again.
extern "C" int records_to_rows(const uint32_t* records, const int* warp_count, int cap, int M, int N,
                               const long* row_ptr, int* cursor, int* tmp_index, void* tmp_value,
                               long* out_index, void* out_value, cudaStream_t stream) {
  const int tiles_n = (N + fused::kTileN - 1) / fused::kTileN, tiles_m = (M + fused::kTileM - 1) / fused::kTileM;
  records_place_kernel<<<dim3(tiles_n, tiles_m), 64, 0, stream>>>(records, warp_count, cap, M, tiles_n, row_ptr, cursor,
                                                                 tmp_index, static_cast<__nv_bfloat16*>(tmp_value));
  rows_order_kernel<<<(M + 7) / 8, 256, 0, stream>>>(M, row_ptr, tmp_index, static_cast<const __nv_bfloat16*>(tmp_value),
                                                     out_index, static_cast<__nv_bfloat16*>(out_value));
  return int(cudaGetLastError());
}
