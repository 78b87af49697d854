// The threshold encode (ReLU, JumpReLU, BatchTopK at inference) of a bfloat16 or float16 SAE
// fused into a CUTLASS GEMM on Hopper (sm_90): survivors leave the GEMM's epilogue as records,
// and the [tokens, d_sae] pre-activations are never written. Built when the CUDA architectures
// include 90 and CUTLASS's headers are found (csrc/sae/cuda/fused_sm90/); elsewhere
// fused_threshold_available answers false and the chunked encode (sae.h) does the work.
//
// Every 16-bit argument below (x, weight, bias, bound, values) has one element type, bfloat16 or
// float16 (call it E): x's.
//
// fused_threshold_gemm: x E [rows, d_in] (contiguous) times W E [d_in, d_sae] (contiguous),
//   bias E [d_sae] added to the float32 sums before one rounding to E (v), bound E [d_sae]:
//   column c of row r survives iff v > bound[c]. The bound must be >= 0 or NaN (the caller
//   folds the ReLU in and rounds thresholds down to E, which keeps the compare exact). Each
//   survivor adds 1 to row_count[r] (int32 [rows], zeroed by the caller) and becomes a record
//   (row in tile << 24 | column in tile << 16 | v's bits) in records int32 [tiles_m, tiles_n,
//   kFusedWarps, cap], tiles of kFusedTileM x kFusedTileN; warp_count int32 [tiles_m, tiles_n,
//   kFusedWarps] gets each region's count, which exceeds cap when records were dropped: every
//   row of that tile row is then incomplete, and tile_overflow int32 [tiles_m] gets 1 for it;
//   tile_total int32 [tiles_m] gets the survivors of each tile row (meaningless where it
//   overflowed). The caller zeroes all the counts and flags. d_in and d_sae must be multiples
//   of 8 (16-byte rows for TMA). `kernel` picks the GEMM's cluster shape (FusedKernel), `raster`
//   and `swizzle` the order the persistent kernel walks its tiles in (FusedRaster; swizzle 1, 2,
//   4 or 8); they differ in speed only.
//   With row_floor (a TopK encode; the 2 x 1 kernels), bound is a floor per row, E [rows]:
//   column c of row r survives iff v >= bound[r] or v is NaN. The weight may then be a block of
//   columns of a wider matrix (unit column stride, a row stride that is a multiple of 8 and at
//   least d_sae); threshold encodes take it contiguous.
//
// fused_encode_pass: the encode's launches up to its compaction, in one call: zeroes summary
//   and the counts (laid back to back: one memset; with center, the centring kernel zeroes
//   them) and runs fused_threshold_gemm. Every Python-side launch costs the host about 10 us,
//   and before the GEMM the GPU has nothing else to do. With center (E [d_in]; null: none), x
//   (contiguous) is centred first: centered E [rows, d_in] (16-byte aligned) gets E(x - center)
//   as torch's subtraction rounds it, and the GEMM reads centered.
// fused_summary: copies a compaction's summary int64 [3] to the host once the stream reaches it
//   (waiting for it) and returns it: (entries, overflowed tile rows, widest row).
//
// fused_records_to_rows: the records as compressed rows, one block a tile row. Each block
//   starts from the tile totals of the tile rows before its own (an overflowed tile row counts
//   as empty, and so do its rows) and the row counts of its own, and writes its rows' running
//   sums to row_ptr int64 [rows + 1]; summary int64 [3] (zeroed by the caller) gets the
//   entries, the overflowed tile rows and the widest row. Row r's entries land in scratch_index
//   int32 / scratch_values E [nnz] and out_index int64 / out_values E [nnz] (the records'
//   element type: their 16 bits are copied as they are) at [row_ptr[r], row_ptr[r + 1]);
//   entries at or past nnz are dropped (a caller that sized the arrays before it knew the count
//   compacts again when they were too short; nnz 0 makes row_ptr and summary alone). With
//   order, each row's entries come out in ascending column order (one warp ranks a row's
//   entries, O(l0^2 / 32) per row), but for rows of more than order_max entries and rows that
//   end past nnz, which are not written (the caller sorts wide rows); without it they stay in
//   scratch_index / scratch_values in arrival order and out_* are neither checked nor written.
// fused_gated_magnitudes: a gated SAE's survivors (from the GEMM run without a bias against its
//   bounds) turned into activations in place: values E [n] become
//   E(relu(v * scale[index] + bias[index])) in float32, the multiply rounded before the add.
//   index int64 [n] in [0, d_sae) (the compaction's columns; not checked on the device), scale
//   and bias float32 [d_sae]. One launch where torch takes seven.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "common/tensor_view.h"

#if defined(MECHINTERP_WITH_SM90_FUSED)
#include <cuda_runtime_api.h>
#endif

namespace mechinterp::sae {

// Records keep a survivor's row and column in the tile in 8 bits each.
constexpr int kFusedTileM = 128;
constexpr int kFusedTileN = 256;
// Consumer warps of the cooperative kernel (two warpgroups); each owns one record region a tile.
constexpr int kFusedWarps = 8;

// The GEMM's kernels, by the shape of their thread-block clusters (tiles along rows x along
// latents): 2 x 1 shares each weight tile between two CTAs, 1 x 2 each input tile. The cluster_*
// kernels are cooperative (two warpgroups on a 128 x 256 tile); the pingpong kernel gives each
// warpgroup a 64 x 256 tile of its own, so that one's epilogue overlaps the other's main loop
// (with 1 x 2 clusters it was 1.37-2.6x cuBLAS's GEMM on an H100, so it is not built).
enum class FusedKernel : int {
  kCluster2x1 = 0,
  kCluster1x2 = 1,
  kPingPong2x1 = 2,
};
constexpr int kFusedKernelCount = 3;
// Whether `kernel` has a variant with a floor per row (fused_threshold_gemm's row_floor).
bool fused_kernel_has_row_floor(int kernel);
// "cluster_2x1", ...; the index is the enum's value.
const char* fused_kernel_name(int kernel);

// The order of the tiles the persistent kernel walks: CUTLASS's heuristic (along the shorter of
// the two tile counts), down the rows first (the CTAs of a wave share weight tiles) or along the
// latents first (they share input tiles). A swizzle of s walks bands s tiles wide instead, so
// that a wave's inputs and weights stay in L2 when one operand alone would not fit.
enum class FusedRaster : int {
  kHeuristic = 0,
  kAlongM = 1,
  kAlongN = 2,
};
constexpr int kFusedRasterCount = 3;
// "heuristic", "along_m", "along_n"; the index is the enum's value.
const char* fused_raster_name(int raster);

constexpr std::int64_t fused_tiles(std::int64_t extent, std::int64_t tile) {
  return (extent + tile - 1) / tile;
}

// Whether this build has the fused encode and device_index is an sm_90 GPU.
bool fused_threshold_available(int device_index);

// Workspace bytes the GEMM needs for this problem on that device (float16: E is float16).
std::int64_t fused_threshold_workspace(std::int64_t rows, std::int64_t d_in, std::int64_t d_sae,
                                       int device_index, int kernel, int raster, int swizzle,
                                       bool row_floor, bool float16);

void fused_threshold_gemm(const TensorView& x, const TensorView& weight, const TensorView& bias,
                          const TensorView& bound, const TensorView& records,
                          const TensorView& warp_count, const TensorView& row_count,
                          const TensorView& tile_overflow, const TensorView& tile_total,
                          const TensorView& workspace, int kernel, int raster, int swizzle,
                          bool row_floor, std::uintptr_t stream);

void fused_encode_pass(
    const TensorView& x, const TensorView* center, const TensorView* centered,
    const TensorView& weight, const TensorView& bias, const TensorView& bound,
    const TensorView& records, const TensorView& summary, const TensorView& warp_count,
    const TensorView& tile_overflow, const TensorView& tile_total, const TensorView& row_count,
    const TensorView& workspace, int kernel, int raster, int swizzle, bool row_floor,
    std::uintptr_t stream);

std::array<std::int64_t, 3> fused_summary(const TensorView& summary, std::uintptr_t stream);

void fused_records_to_rows(const TensorView& records, const TensorView& warp_count,
                           const TensorView& row_count, const TensorView& tile_overflow,
                           const TensorView& tile_total, const TensorView& row_ptr,
                           const TensorView& summary, const TensorView& scratch_index,
                           const TensorView& scratch_values, const TensorView& out_index,
                           const TensorView& out_values, bool order, std::int64_t order_max,
                           std::uintptr_t stream);

void fused_gated_magnitudes(const TensorView& index, const TensorView& values,
                            const TensorView& scale, const TensorView& bias,
                            std::uintptr_t stream);

// ---- launch parameters ----

struct FusedGemmParams {
  std::int64_t rows;
  std::int64_t d_in;
  std::int64_t d_sae;
  std::int64_t cap;
  int device;
  int sm_count;
  int raster;   // FusedRaster
  int swizzle;  // 1, 2, 4 or 8
  const void* x;
  const void* weight;
  std::int64_t weight_ld;  // elements from one row of the weight to the next
  const void* bias;
  const void* bound;
  std::uint32_t* records;
  std::int32_t* warp_count;
  std::int32_t* row_count;
  std::int32_t* tile_overflow;
  std::int32_t* tile_total;
  std::size_t workspace_bytes;
};


struct FusedRowsParams {
  std::int64_t rows;
  std::int64_t tiles_m;
  std::int64_t tiles_n;
  std::int64_t cap;
  std::int64_t nnz;
  std::int64_t order_max;
  bool order;
};

#if defined(MECHINTERP_WITH_SM90_FUSED)
// One kernel: run returns an empty string or what CUTLASS refused.
struct FusedGemmEntry {
  const char* (*run)(const FusedGemmParams& params, void* workspace, cudaStream_t stream);
  std::size_t (*workspace_bytes)(const FusedGemmParams& params);
};
// One translation unit each (fused_sm90/*_gemm_*.cu), so that they compile in parallel; *_f16
// take float16, the others bfloat16.
FusedGemmEntry cluster_2x1_gemm();
FusedGemmEntry cluster_1x2_gemm();
FusedGemmEntry pingpong_2x1_gemm();
FusedGemmEntry cluster_2x1_floor_gemm();
FusedGemmEntry pingpong_2x1_floor_gemm();
FusedGemmEntry cluster_2x1_gemm_f16();
FusedGemmEntry cluster_1x2_gemm_f16();
FusedGemmEntry pingpong_2x1_gemm_f16();
FusedGemmEntry cluster_2x1_floor_gemm_f16();
FusedGemmEntry pingpong_2x1_floor_gemm_f16();


// The counts the GEMM left, read by the compaction.
struct FusedCounts {
  const std::int32_t* warp_count;
  const std::int32_t* row_count;
  const std::int32_t* tile_overflow;
  const std::int32_t* tile_total;
};
void launch_fused_records_to_rows(const std::uint32_t* records, const FusedCounts& counts,
                                  std::int64_t* row_ptr, std::int64_t* summary,
                                  std::int32_t* scratch_index, std::uint16_t* scratch_values,
                                  std::int64_t* out_index, std::uint16_t* out_values,
                                  const FusedRowsParams& params, cudaStream_t stream);

// E(x - center) of contiguous x E [rows, d_in] into centered (16-byte aligned); x_aligned:
// x starts on a 16-byte boundary too (then 8 elements a load). E is float16 or bfloat16. The
// same launch zeroes `zero_words` 32-bit words at `zero` (the pass's counts: a memset of its
// own would cost the host one more launch before the GEMM's).
void launch_center_rows(const std::uint16_t* x, const std::uint16_t* center,
                        std::uint16_t* centered, std::int64_t rows, std::int64_t d_in,
                        bool float16, bool x_aligned, std::int32_t* zero,
                        std::int64_t zero_words, int sm_count, cudaStream_t stream);

void launch_gated_magnitudes(const std::int64_t* index, std::uint16_t* values, const float* scale,
                             const float* bias, std::int64_t n, bool float16,
                             cudaStream_t stream);
#endif

}  // namespace mechinterp::sae
