// Sparse-autoencoder kernels: the activation epilogue of an encode, as sparse output, and the
// sparse decode.
//
// The encoder GEMM itself is not here: callers run it (cuBLAS through torch) on a chunk of
// latents and hand the chunk's pre-activations to one of the selectors, which keep only what
// survives the activation. The [tokens, d_sae] matrix therefore never exists whole.
//
// select_topk: values [rows, cols] (float32 / float16 / bfloat16, unit column stride) ->
//   per row and per segment of cols, the k largest of (values + bias[c]) * scale[c] (bias and
//   scale float32 [cols], each optional), sorted in descending order, ties to the lower index.
//   Indices are col_offset + c, or index[r, c] when index (int32 [rows, cols]) is given, which
//   is how a second call merges the candidates of a first. A segment with fewer than k columns
//   pads with (-inf, -1). out_values float32 and out_index int32 are [rows, segments * k].
//   Segments: topk_segments(cols, device): one per kCudaSegment columns on CUDA, one on the CPU.
//
// select_threshold: the rows' columns c whose pre-activation passes a threshold, in column
//   order, per row and segment, into slots of capacity cap:
//     v = values + bias[c];  kept iff v > threshold[c] (0 without threshold);
//     value = v, or relu(values * mag_scale[c] + mag_bias[c]) when mag_scale is given (gated:
//     bias is then the gate bias), and kept only if value > 0.
//   out_values float32 / out_index int32 [rows, segments, cap], out_count int32 [rows,
//   segments] holds the true count, which may exceed cap (the caller then retries wider). The
//   outputs' rows may be strided (column slices of buffers that hold every chunk's segments).
//
// compact_slots: select_threshold's filled slots as compressed rows. Row r's entries, the first
//   min(count, cap) slots of each of its segments in segment order, go to out_values / out_index
//   from row_start[r] (int64 [rows]) on: out_values float32 / float16 / bfloat16 [nnz]
//   (rounded to nearest), out_index int64 [nnz]. Entries that would land past nnz are dropped,
//   so row_start inconsistent with count cannot write out of bounds.
//
// topk_candidates (CUDA): one chunk of a running top-k. Per row and segment of values [rows,
//   cols], every column whose (values + bias[c]) * scale[c] reaches a lower bound of the row's
//   k-th largest, unordered, into slots out_values float32 / out_index int32 (col_offset + c)
//   [rows, segments, cap], with out_count int32 [rows, segments]; a segment with more than cap
//   such columns (heavy ties) keeps its exact k largest instead, ties to the lower index. The
//   bound is the larger of row_bar[r] and the segment's own; row_bar (int32 [rows], holding
//   order keys as unsigned bits, 0 for none) is raised to the segment's own. k <= cap <=
//   kCudaCandidates - k.
//
// topk_merge (CUDA): per row, the k largest, by descending value then ascending index, of the
//   running top-k top_values float32 / top_index int32 [rows, k] (sorted; index -1 and -inf
//   pad it) and the candidates of one topk_candidates call, written back in order; row_bar
//   becomes the key of the k-th once the row holds k values. Starting from padding and a zero
//   row_bar, candidates and merges over the chunks of a row's columns give its exact top-k.
//
// topk_merge_rows (CUDA): topk_merge with candidates as compressed rows: row r's are
//   [row_ptr[r], row_ptr[r + 1]) of cand_index int32 (columns from col_offset) and cand_values
//   bfloat16 or float16 (the fused GEMM's survivors above a floor, in any order).
//
// screened_topk (CPU): the exact float32 top-k of rows of (x W + bias) * scale, from screen
//   bfloat16 [rows, d_sae] = bf16(x) bf16(W) (any GEMM with float32 sums), x float32 [rows,
//   d_in], w_t float32 [d_sae, d_in] (W transposed, contiguous), norms float64 [2, d_sae] (the
//   norms of bf16(W)'s columns and of W - bf16(W)'s, not rounded down) and bias / scale
//   float32 [d_sae] (optional): only
//   latents whose proven interval around the screen can reach the k-th are computed again, in
//   double, and rounded once. Output as select_topk's, [rows, k]. Returns how many latents were
//   recomputed (all of a row's when its bounds are not finite: an inf or NaN in x, W or screen).
//
// sparse_decode: out[r] = (accumulate ? out[r] : bias or 0) + sum_j values[j] W[index[j]] over
//   j in row r's range: [row_ptr[r], row_ptr[r + 1]) when row_ptr (int64 [rows + 1]) is given,
//   else [r k, r k + k) with index and values [rows, k]. index int32 or int64 (-1 entries are
//   skipped); W [d_sae, d_out], bias [d_out] and out [rows, d_out] share a floating dtype;
//   values are float32 (float64 for float64 W), the type the sums run in before one rounding.
#pragma once

#include <cstdint>
#include <optional>

#include "common/dispatch.h"
#include "common/tensor_view.h"

#if defined(MECHINTERP_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mechinterp::sae {

// CUDA blocks see a segment of kCudaSegment columns: 256 threads x 32 values in registers (64
// measured slower for TopK on an H200: fewer resident blocks per SM).
constexpr std::int64_t kCudaThreads = 256;
constexpr std::int64_t kCudaItems = 32;
constexpr std::int64_t kCudaSegment = kCudaThreads * kCudaItems;
// The CUDA selector's fast path bounds the k-th largest by the k-th largest thread maximum.
constexpr std::int64_t kCudaMaxK = kCudaThreads;
// Candidates a CUDA block sorts in shared memory.
constexpr std::int64_t kCudaCandidates = 2048;

std::int64_t topk_segments(std::int64_t cols, bool cuda);

void select_topk(const TensorView& values, const std::optional<TensorView>& index,
                 const std::optional<TensorView>& bias, const std::optional<TensorView>& scale,
                 std::int64_t k, std::int64_t col_offset, const TensorView& out_values,
                 const TensorView& out_index, std::uintptr_t stream);

void select_threshold(const TensorView& values, const std::optional<TensorView>& bias,
                      const std::optional<TensorView>& threshold,
                      const std::optional<TensorView>& mag_scale,
                      const std::optional<TensorView>& mag_bias, std::int64_t col_offset,
                      const TensorView& out_values, const TensorView& out_index,
                      const TensorView& out_count, std::uintptr_t stream);

void compact_slots(const TensorView& kept, const TensorView& index, const TensorView& count,
                   const TensorView& row_start, const TensorView& out_values,
                   const TensorView& out_index, std::uintptr_t stream);

void topk_candidates(const TensorView& values, const std::optional<TensorView>& bias,
                     const std::optional<TensorView>& scale, std::int64_t k,
                     std::int64_t col_offset, const TensorView& out_values,
                     const TensorView& out_index, const TensorView& out_count,
                     const TensorView& row_bar, std::uintptr_t stream);

void topk_merge(const TensorView& top_values, const TensorView& top_index,
                const TensorView& cand_values, const TensorView& cand_index,
                const TensorView& cand_count, const TensorView& row_bar, std::uintptr_t stream);

void topk_merge_rows(const TensorView& top_values, const TensorView& top_index,
                     const TensorView& row_ptr, const TensorView& cand_index,
                     const TensorView& cand_values, std::int64_t col_offset,
                     const TensorView& row_bar, std::uintptr_t stream);

std::int64_t screened_topk(const TensorView& screen, const TensorView& x, const TensorView& w_t,
                           const TensorView& norms, const std::optional<TensorView>& bias,
                           const std::optional<TensorView>& scale, std::int64_t k,
                           const TensorView& out_values, const TensorView& out_index);

void sparse_decode(const TensorView& index, const TensorView& values,
                   const std::optional<TensorView>& row_ptr, const TensorView& weight,
                   const std::optional<TensorView>& bias, const TensorView& out, bool accumulate,
                   std::uintptr_t stream);

// ---- launch parameters (shared by the CPU and CUDA implementations) ----

struct SelectParams {
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t row_stride;        // of values, in elements
  std::int64_t index_row_stride;  // of the optional index
  std::int64_t out_row_stride;    // of out_values / out_index
  std::int64_t count_row_stride;  // of out_count (select_threshold)
  std::int64_t segments;
  std::int64_t k;                 // select_topk, topk_candidates / topk_merge
  std::int64_t cap;               // select_threshold, topk_candidates / topk_merge
  std::int64_t col_offset;
  const std::int32_t* index;      // nullptr: col_offset + c
  const float* bias;              // nullptr: 0
  const float* scale;             // nullptr: 1 (select_topk)
  const float* threshold;         // nullptr: 0 (select_threshold)
  const float* mag_scale;         // nullptr: not gated
  const float* mag_bias;
};

struct CompactParams {
  std::int64_t rows;
  std::int64_t segments;
  std::int64_t cap;
  std::int64_t nnz;
  const std::int64_t* row_start;
};

struct ScreenParams {
  std::int64_t rows;
  std::int64_t d_in;
  std::int64_t d_sae;
  std::int64_t k;
  std::int64_t screen_row_stride;
  std::int64_t x_row_stride;
  std::int64_t out_row_stride;
  const float* w_t;         // [d_sae, d_in], contiguous
  const double* norms;      // [2, d_sae]: ||bf16(w_j)||, ||w_j - bf16(w_j)||
  const float* bias;        // nullptr: 0
  const float* scale;       // nullptr: 1
};

struct DecodeParams {
  std::int64_t rows;
  std::int64_t per_row;  // values per row when row_ptr is null
  std::int64_t d_out;
  std::int64_t d_sae;
  std::int64_t out_row_stride;
  const std::int64_t* row_ptr;
  bool accumulate;
};

// Order-preserving map of a float to an unsigned key: larger floats get larger keys, -0 < +0.
inline std::uint32_t float_key_host(float f) {
  const std::uint32_t bits = float_to_bits(f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float key_float_host(std::uint32_t key) {
  return bits_to_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

template <typename T>
void select_topk_cpu(const T* values, float* out_values, std::int32_t* out_index,
                     const SelectParams& params);

template <typename T>
void select_threshold_cpu(const T* values, float* out_values, std::int32_t* out_index,
                          std::int32_t* out_count, const SelectParams& params);

template <typename T>
void compact_slots_cpu(const float* kept, const std::int32_t* index, const std::int32_t* count,
                       T* out_values, std::int64_t* out_index, const CompactParams& params);

std::int64_t screened_topk_cpu(const BFloat16* screen, const float* x, float* out_values,
                               std::int32_t* out_index, const ScreenParams& params);

template <typename W, typename I>
void sparse_decode_cpu(const I* index, const acc_t<W>* values, const W* weight, const W* bias, W* out,
                       const DecodeParams& params);

#if defined(MECHINTERP_WITH_CUDA)
template <typename T>
void launch_select_topk_cuda(const T* values, float* out_values, std::int32_t* out_index,
                             const SelectParams& params, cudaStream_t stream);

template <typename T>
void launch_select_threshold_cuda(const T* values, float* out_values, std::int32_t* out_index,
                                  std::int32_t* out_count, const SelectParams& params,
                                  cudaStream_t stream);

template <typename T>
void launch_compact_slots_cuda(const float* kept, const std::int32_t* index,
                               const std::int32_t* count, T* out_values, std::int64_t* out_index,
                               const CompactParams& params, cudaStream_t stream);

template <typename T>
void launch_topk_candidates_cuda(const T* values, float* out_values, std::int32_t* out_index,
                                 std::int32_t* out_count, std::uint32_t* row_bar,
                                 const SelectParams& params, cudaStream_t stream);

void launch_topk_merge_cuda(float* top_values, std::int32_t* top_index, const float* cand_values,
                            const std::int32_t* cand_index, const std::int32_t* cand_count,
                            std::uint32_t* row_bar, const SelectParams& params,
                            cudaStream_t stream);

void launch_topk_merge_rows_cuda(float* top_values, std::int32_t* top_index,
                                 const std::int64_t* row_ptr, const std::int32_t* cand_index,
                                 const std::uint16_t* cand_values, bool float16,
                                 std::uint32_t* row_bar, const SelectParams& params,
                                 cudaStream_t stream);

template <typename W, typename I>
void launch_sparse_decode_cuda(const I* index, const acc_t<W>* values, const W* weight, const W* bias,
                               W* out, const DecodeParams& params, cudaStream_t stream);
#endif

}  // namespace mechinterp::sae
