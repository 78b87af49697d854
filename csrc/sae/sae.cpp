#include "sae/sae.h"

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "common/check.h"
#include "common/device.h"
#include "common/dispatch.h"
#include "sae/checks.h"

namespace mechinterp::sae {

namespace {

// Dispatch over the dtypes a selector reads: the GEMM outputs it follows are never float64 here
// (float64 SAEs take the PyTorch path, whose exact sort keys are 64-bit).
template <typename F>
void dispatch_select(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::Float32: f(TypeTag<float>{}); return;
    case DType::Float16: f(TypeTag<Half>{}); return;
    case DType::BFloat16: f(TypeTag<BFloat16>{}); return;
    default: break;
  }
  detail::throw_user_error(op, ": values must be float32, float16 or bfloat16, got ",
                           dtype_name(dtype));
}

// A [rows, cols] matrix whose columns are adjacent (rows may be strided).
void check_matrix(const TensorView& t, std::int64_t rows, std::int64_t cols, const char* op,
                  const char* name) {
  MECHINTERP_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
                   " must be [", rows, ", ", cols, "], got ", t.shape_string());
  MECHINTERP_CHECK(cols <= 1 || t.stride(1) == 1, op, ": ", name,
                   " must have unit column stride, got strides [", t.stride(0), ", ",
                   t.stride(1), "]");
}

// values [rows, cols] with adjacent columns, whose indices col_offset + c fit int32.
std::pair<std::int64_t, std::int64_t> check_values(const TensorView& values,
                                                   std::int64_t col_offset, const char* op) {
  MECHINTERP_CHECK(values.dim() == 2, op, ": values must be [rows, cols], got ",
                   values.shape_string());
  const std::int64_t rows = values.size(0);
  const std::int64_t cols = values.size(1);
  check_matrix(values, rows, cols, op, "values");
  MECHINTERP_CHECK(col_offset >= 0 && col_offset + cols <= INT32_MAX, op,
                   ": column indices must fit int32, got col_offset ", col_offset, " and ", cols,
                   " columns");
  return {rows, cols};
}

// Sorted top-k output: out_values float32 and out_index int32 [rows, width] sharing a row stride.
void check_topk_outputs(const TensorView& out_values, const TensorView& out_index,
                        std::int64_t rows, std::int64_t width, const TensorView& values,
                        const char* op) {
  check_matrix(out_values, rows, width, op, "out_values");
  check_matrix(out_index, rows, width, op, "out_index");
  MECHINTERP_CHECK(out_values.dtype == DType::Float32, op, ": out_values must be float32, got ",
                   dtype_name(out_values.dtype));
  MECHINTERP_CHECK(out_index.dtype == DType::Int32, op, ": out_index must be int32, got ",
                   dtype_name(out_index.dtype));
  MECHINTERP_CHECK(out_values.stride(0) == out_index.stride(0), op,
                   ": out_values and out_index must share a row stride, got ",
                   out_values.stride(0), " and ", out_index.stride(0));
  check_same_device(out_values, values, op, "out_values");
  check_same_device(out_index, values, op, "out_index");
}

// Slots [rows, segments, cap] of a selector: each row's slots adjacent, rows possibly strided
// (a column slice of a buffer holding every chunk's segments).
void check_slots(const TensorView& t, const char* op, const char* name) {
  MECHINTERP_CHECK(t.dim() == 3 && (t.size(2) == 1 || t.stride(2) == 1) &&
                       (t.size(1) == 1 || t.stride(1) == t.size(2)) &&
                       (t.size(0) <= 1 || t.stride(0) >= t.size(1) * t.size(2)),
                   op, ": ", name, " must hold each row's slots adjacently, got shape ",
                   t.shape_string(), " and strides [", t.stride(0), ", ", t.stride(1), ", ",
                   t.stride(2), "]");
}

const float* column_vector(const std::optional<TensorView>& t, const TensorView& values,
                           std::int64_t cols, const char* op, const char* name) {
  if (!t) return nullptr;
  MECHINTERP_CHECK(t->dtype == DType::Float32, op, ": ", name, " must be float32, got ",
                   dtype_name(t->dtype));
  MECHINTERP_CHECK(t->dim() == 1 && t->size(0) == cols && t->is_contiguous(), op, ": ", name,
                   " must be a contiguous [", cols, "], got ", t->shape_string());
  check_same_device(*t, values, op, name);
  return t->data_as<float>();
}

}  // namespace

std::int64_t topk_segments(std::int64_t cols, bool cuda) {
  if (!cuda || cols <= 0) return 1;
  return (cols + kCudaSegment - 1) / kCudaSegment;
}

void select_topk(const TensorView& values, const std::optional<TensorView>& index,
                 const std::optional<TensorView>& bias, const std::optional<TensorView>& scale,
                 std::int64_t k, std::int64_t col_offset, const TensorView& out_values,
                 const TensorView& out_index, std::uintptr_t stream) {
  constexpr const char* kOp = "select_topk";
  const auto [rows, cols] = check_values(values, col_offset, kOp);
  MECHINTERP_CHECK(k >= 1, kOp, ": k must be >= 1, got ", k);
  MECHINTERP_CHECK(!values.is_cuda() || k <= kCudaMaxK, kOp, ": k must be <= ", kCudaMaxK,
                   " on CUDA, got ", k);
  const std::int64_t segments = topk_segments(cols, values.is_cuda());
  check_topk_outputs(out_values, out_index, rows, segments * k, values, kOp);

  SelectParams p{};
  p.rows = rows;
  p.cols = cols;
  p.row_stride = values.stride(0);
  p.out_row_stride = out_values.stride(0);
  p.segments = segments;
  p.k = k;
  p.col_offset = col_offset;
  if (index) {
    check_matrix(*index, rows, cols, kOp, "index");
    MECHINTERP_CHECK(index->dtype == DType::Int32, kOp, ": index must be int32, got ",
                     dtype_name(index->dtype));
    check_same_device(*index, values, kOp, "index");
    p.index = index->data_as<std::int32_t>();
    p.index_row_stride = index->stride(0);
  }
  p.bias = column_vector(bias, values, cols, kOp, "bias");
  p.scale = column_vector(scale, values, cols, kOp, "scale");
  if (rows == 0 || cols == 0) return;

  if (values.is_cpu()) {
    dispatch_select(values.dtype, kOp, [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      select_topk_cpu<scalar_t>(values.data_as<scalar_t>(), out_values.data_as<float>(),
                                out_index.data_as<std::int32_t>(), p);
    });
    return;
  }
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(values.device.index);
  dispatch_select(values.dtype, kOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_select_topk_cuda<scalar_t>(values.data_as<scalar_t>(), out_values.data_as<float>(),
                                      out_index.data_as<std::int32_t>(), p,
                                      reinterpret_cast<cudaStream_t>(stream));
  });
#else
  (void)stream;
  throw_no_cuda(kOp, values.device);
#endif
}

void select_threshold(const TensorView& values, const std::optional<TensorView>& bias,
                      const std::optional<TensorView>& threshold,
                      const std::optional<TensorView>& mag_scale,
                      const std::optional<TensorView>& mag_bias, std::int64_t col_offset,
                      const TensorView& out_values, const TensorView& out_index,
                      const TensorView& out_count, std::uintptr_t stream) {
  constexpr const char* kOp = "select_threshold";
  const auto [rows, cols] = check_values(values, col_offset, kOp);
  const std::int64_t segments = topk_segments(cols, values.is_cuda());
  MECHINTERP_CHECK(out_values.dim() == 3 && out_values.size(0) == rows &&
                       out_values.size(1) == segments && out_values.size(2) >= 1,
                   kOp, ": out_values must be [", rows, ", ", segments, ", cap >= 1], got ",
                   out_values.shape_string());
  const std::int64_t cap = out_values.size(2);
  check_slots(out_values, kOp, "out_values");
  check_slots(out_index, kOp, "out_index");
  MECHINTERP_CHECK(out_index.dim() == 3 && out_index.size(0) == rows &&
                       out_index.size(1) == segments && out_index.size(2) == cap &&
                       out_index.stride(0) == out_values.stride(0),
                   kOp, ": out_index must be ", out_values.shape_string(),
                   " with out_values's row stride, got ", out_index.shape_string(),
                   " with row stride ", out_index.stride(0));
  MECHINTERP_CHECK(out_count.dim() == 2 && out_count.size(0) == rows &&
                       out_count.size(1) == segments &&
                       (segments == 1 || out_count.stride(1) == 1) &&
                       (rows <= 1 || out_count.stride(0) >= segments),
                   kOp, ": out_count must be [", rows, ", ", segments,
                   "] with adjacent columns, got ", out_count.shape_string());
  MECHINTERP_CHECK(out_values.dtype == DType::Float32, kOp, ": out_values must be float32, got ",
                   dtype_name(out_values.dtype));
  MECHINTERP_CHECK(out_index.dtype == DType::Int32 && out_count.dtype == DType::Int32, kOp,
                   ": out_index and out_count must be int32, got ", dtype_name(out_index.dtype),
                   " and ", dtype_name(out_count.dtype));
  check_same_device(out_values, values, kOp, "out_values");
  check_same_device(out_index, values, kOp, "out_index");
  check_same_device(out_count, values, kOp, "out_count");
  MECHINTERP_CHECK(mag_scale.has_value() == mag_bias.has_value(), kOp,
                   ": mag_scale and mag_bias go together (gated), got only one of them");

  SelectParams p{};
  p.rows = rows;
  p.cols = cols;
  p.row_stride = values.stride(0);
  p.out_row_stride = out_values.stride(0);
  p.count_row_stride = out_count.stride(0);
  p.segments = segments;
  p.cap = cap;
  p.col_offset = col_offset;
  p.bias = column_vector(bias, values, cols, kOp, "bias");
  p.threshold = column_vector(threshold, values, cols, kOp, "threshold");
  p.mag_scale = column_vector(mag_scale, values, cols, kOp, "mag_scale");
  p.mag_bias = column_vector(mag_bias, values, cols, kOp, "mag_bias");
  if (rows == 0) return;

  if (values.is_cpu()) {
    dispatch_select(values.dtype, kOp, [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      select_threshold_cpu<scalar_t>(values.data_as<scalar_t>(), out_values.data_as<float>(),
                                     out_index.data_as<std::int32_t>(),
                                     out_count.data_as<std::int32_t>(), p);
    });
    return;
  }
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(values.device.index);
  dispatch_select(values.dtype, kOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_select_threshold_cuda<scalar_t>(
        values.data_as<scalar_t>(), out_values.data_as<float>(),
        out_index.data_as<std::int32_t>(), out_count.data_as<std::int32_t>(), p,
        reinterpret_cast<cudaStream_t>(stream));
  });
#else
  (void)stream;
  throw_no_cuda(kOp, values.device);
#endif
}

namespace {

// The running top-k's sizes: k within the CUDA limit, and cap slots a segment, room for its
// exact top k and, beside the running top k, within one merge's shared buffer.
void check_running_sizes(std::int64_t k, std::int64_t cap, const char* op) {
  MECHINTERP_CHECK(k >= 1 && k <= kCudaMaxK && k <= cap && cap <= kCudaCandidates - k, op,
                   ": need 1 <= k <= cap <= ", kCudaCandidates, " - k and k <= ", kCudaMaxK,
                   ", got k ", k, " and cap ", cap);
}

void require_cuda(const TensorView& t, const char* op) {
  MECHINTERP_CHECK(t.is_cuda(), op, ": runs on CUDA only (the CPU encode ranks each row in one ",
                   "pass), got ", device_name(t.device));
}

// A running top k on CUDA: top_values float32 / top_index int32 [rows, k] and row_bar int32
// [rows], as the merges take it.
void check_running_top(const TensorView& top_values, const TensorView& top_index,
                       const TensorView& row_bar, const char* op) {
  MECHINTERP_CHECK(top_values.dim() == 2, op, ": top_values must be [rows, k], got ",
                   top_values.shape_string());
  require_cuda(top_values, op);
  const std::int64_t rows = top_values.size(0);
  const std::int64_t k = top_values.size(1);
  check_block(top_values, {rows, k}, DType::Float32, top_values, op, "top_values");
  check_block(top_index, {rows, k}, DType::Int32, top_values, op, "top_index");
  check_block(row_bar, {rows}, DType::Int32, top_values, op, "row_bar");
}

}  // namespace

void compact_slots(const TensorView& kept, const TensorView& index, const TensorView& count,
                   const TensorView& row_start, const TensorView& out_values,
                   const TensorView& out_index, std::uintptr_t stream) {
  constexpr const char* kOp = "compact_slots";
  MECHINTERP_CHECK(kept.dim() == 3 && kept.is_contiguous() && kept.dtype == DType::Float32, kOp,
                   ": kept must be a contiguous float32 [rows, segments, cap], got ",
                   dtype_name(kept.dtype), " ", kept.shape_string());
  const std::int64_t rows = kept.size(0);
  const std::int64_t segments = kept.size(1);
  MECHINTERP_CHECK(index.dim() == 3 && index.size(0) == rows && index.size(1) == segments &&
                       index.size(2) == kept.size(2) && index.is_contiguous() &&
                       index.dtype == DType::Int32,
                   kOp, ": index must be a contiguous int32 ", kept.shape_string(), ", got ",
                   dtype_name(index.dtype), " ", index.shape_string());
  MECHINTERP_CHECK(count.dim() == 2 && count.size(0) == rows && count.size(1) == segments &&
                       count.is_contiguous() && count.dtype == DType::Int32,
                   kOp, ": count must be a contiguous int32 [", rows, ", ", segments, "], got ",
                   dtype_name(count.dtype), " ", count.shape_string());
  MECHINTERP_CHECK(row_start.dim() == 1 && row_start.size(0) == rows &&
                       row_start.is_contiguous() && row_start.dtype == DType::Int64,
                   kOp, ": row_start must be a contiguous int64 [", rows, "], got ",
                   dtype_name(row_start.dtype), " ", row_start.shape_string());
  MECHINTERP_CHECK(out_values.dim() == 1 && out_values.is_contiguous(), kOp,
                   ": out_values must be a contiguous [nnz], got ", out_values.shape_string());
  MECHINTERP_CHECK(out_values.dtype == DType::Float32 || out_values.dtype == DType::Float16 ||
                       out_values.dtype == DType::BFloat16,
                   kOp, ": out_values must be float32, float16 or bfloat16, got ",
                   dtype_name(out_values.dtype));
  const std::int64_t nnz = out_values.size(0);
  MECHINTERP_CHECK(out_index.dim() == 1 && out_index.size(0) == nnz &&
                       out_index.is_contiguous() && out_index.dtype == DType::Int64,
                   kOp, ": out_index must be a contiguous int64 [", nnz, "], got ",
                   dtype_name(out_index.dtype), " ", out_index.shape_string());
  check_same_device(index, kept, kOp, "index");
  check_same_device(count, kept, kOp, "count");
  check_same_device(row_start, kept, kOp, "row_start");
  check_same_device(out_values, kept, kOp, "out_values");
  check_same_device(out_index, kept, kOp, "out_index");

  CompactParams p{};
  p.rows = rows;
  p.segments = segments;
  p.cap = kept.size(2);
  p.nnz = nnz;
  p.row_start = row_start.data_as<std::int64_t>();
  if (rows == 0 || segments == 0 || nnz == 0) return;

  if (kept.is_cpu()) {
    dispatch_select(out_values.dtype, kOp, [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      compact_slots_cpu<scalar_t>(kept.data_as<float>(), index.data_as<std::int32_t>(),
                                  count.data_as<std::int32_t>(), out_values.data_as<scalar_t>(),
                                  out_index.data_as<std::int64_t>(), p);
    });
    return;
  }
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(kept.device.index);
  dispatch_select(out_values.dtype, kOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_compact_slots_cuda<scalar_t>(
        kept.data_as<float>(), index.data_as<std::int32_t>(), count.data_as<std::int32_t>(),
        out_values.data_as<scalar_t>(), out_index.data_as<std::int64_t>(), p,
        reinterpret_cast<cudaStream_t>(stream));
  });
#else
  (void)stream;
  throw_no_cuda(kOp, kept.device);
#endif
}

void topk_candidates(const TensorView& values, const std::optional<TensorView>& bias,
                     const std::optional<TensorView>& scale, std::int64_t k,
                     std::int64_t col_offset, const TensorView& out_values,
                     const TensorView& out_index, const TensorView& out_count,
                     const TensorView& row_bar, std::uintptr_t stream) {
  constexpr const char* kOp = "topk_candidates";
  const auto [rows, cols] = check_values(values, col_offset, kOp);
  require_cuda(values, kOp);
  MECHINTERP_CHECK(cols >= 1, kOp, ": values must have at least one column");
  const std::int64_t segments = topk_segments(cols, true);
  MECHINTERP_CHECK(out_values.dim() == 3, kOp, ": out_values must be [", rows, ", ", segments,
                   ", cap], got ", out_values.shape_string());
  const std::int64_t cap = out_values.size(2);
  check_running_sizes(k, cap, kOp);
  check_block(out_values, {rows, segments, cap}, DType::Float32, values, kOp, "out_values");
  check_block(out_index, {rows, segments, cap}, DType::Int32, values, kOp, "out_index");
  check_block(out_count, {rows, segments}, DType::Int32, values, kOp, "out_count");
  check_block(row_bar, {rows}, DType::Int32, values, kOp, "row_bar");

  SelectParams p{};
  p.rows = rows;
  p.cols = cols;
  p.row_stride = values.stride(0);
  p.out_row_stride = segments * cap;
  p.segments = segments;
  p.k = k;
  p.cap = cap;
  p.col_offset = col_offset;
  p.bias = column_vector(bias, values, cols, kOp, "bias");
  p.scale = column_vector(scale, values, cols, kOp, "scale");
  if (rows == 0) return;
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(values.device.index);
  dispatch_select(values.dtype, kOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_topk_candidates_cuda<scalar_t>(
        values.data_as<scalar_t>(), out_values.data_as<float>(),
        out_index.data_as<std::int32_t>(), out_count.data_as<std::int32_t>(),
        reinterpret_cast<std::uint32_t*>(row_bar.data_as<std::int32_t>()), p,
        reinterpret_cast<cudaStream_t>(stream));
  });
#else
  (void)stream;
  throw_no_cuda(kOp, values.device);
#endif
}

void topk_merge(const TensorView& top_values, const TensorView& top_index,
                const TensorView& cand_values, const TensorView& cand_index,
                const TensorView& cand_count, const TensorView& row_bar, std::uintptr_t stream) {
  constexpr const char* kOp = "topk_merge";
  check_running_top(top_values, top_index, row_bar, kOp);
  const std::int64_t rows = top_values.size(0);
  const std::int64_t k = top_values.size(1);
  MECHINTERP_CHECK(cand_values.dim() == 3 && cand_values.size(0) == rows, kOp,
                   ": cand_values must be [", rows, ", segments, cap], got ",
                   cand_values.shape_string());
  const std::int64_t segments = cand_values.size(1);
  const std::int64_t cap = cand_values.size(2);
  check_running_sizes(k, cap, kOp);
  MECHINTERP_CHECK(segments >= 1 && segments <= INT32_MAX / cap, kOp,
                   ": need at least one segment and segments x cap within int32, got ", segments,
                   " segments of ", cap);
  check_block(cand_values, {rows, segments, cap}, DType::Float32, top_values, kOp, "cand_values");
  check_block(cand_index, {rows, segments, cap}, DType::Int32, top_values, kOp, "cand_index");
  check_block(cand_count, {rows, segments}, DType::Int32, top_values, kOp, "cand_count");
  SelectParams p{};
  p.rows = rows;
  p.segments = segments;
  p.k = k;
  p.cap = cap;
  p.out_row_stride = k;
  if (rows == 0) return;
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(top_values.device.index);
  launch_topk_merge_cuda(top_values.data_as<float>(), top_index.data_as<std::int32_t>(),
                         cand_values.data_as<float>(), cand_index.data_as<std::int32_t>(),
                         cand_count.data_as<std::int32_t>(),
                         reinterpret_cast<std::uint32_t*>(row_bar.data_as<std::int32_t>()), p,
                         reinterpret_cast<cudaStream_t>(stream));
#else
  (void)stream;
  throw_no_cuda(kOp, top_values.device);
#endif
}

void topk_merge_rows(const TensorView& top_values, const TensorView& top_index,
                     const TensorView& row_ptr, const TensorView& cand_index,
                     const TensorView& cand_values, std::int64_t col_offset,
                     const TensorView& row_bar, std::uintptr_t stream) {
  constexpr const char* kOp = "topk_merge_rows";
  check_running_top(top_values, top_index, row_bar, kOp);
  const std::int64_t rows = top_values.size(0);
  const std::int64_t k = top_values.size(1);
  MECHINTERP_CHECK(k >= 1 && k <= kCudaMaxK, kOp, ": k must lie in [1, ", kCudaMaxK, "], got ", k);
  MECHINTERP_CHECK(cand_index.dim() == 1, kOp, ": cand_index must be [nnz], got ",
                   cand_index.shape_string());
  const std::int64_t nnz = cand_index.size(0);
  MECHINTERP_CHECK(col_offset >= 0 && col_offset <= INT32_MAX, kOp,
                   ": col_offset must lie in [0, 2^31), got ", col_offset);
  check_block(row_ptr, {rows + 1}, DType::Int64, top_values, kOp, "row_ptr");
  check_block(cand_index, {nnz}, DType::Int32, top_values, kOp, "cand_index");
  check_half_values(cand_values, kOp, "cand_values");
  check_block(cand_values, {nnz}, cand_values.dtype, top_values, kOp, "cand_values");
  SelectParams p{};
  p.rows = rows;
  p.k = k;
  p.col_offset = col_offset;
  p.out_row_stride = k;
  if (rows == 0) return;
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(top_values.device.index);
  launch_topk_merge_rows_cuda(top_values.data_as<float>(), top_index.data_as<std::int32_t>(),
                              row_ptr.data_as<std::int64_t>(), cand_index.data_as<std::int32_t>(),
                              cand_values.data_as<std::uint16_t>(),
                              cand_values.dtype == DType::Float16,
                              reinterpret_cast<std::uint32_t*>(row_bar.data_as<std::int32_t>()), p,
                              reinterpret_cast<cudaStream_t>(stream));
#else
  (void)stream;
  throw_no_cuda(kOp, top_values.device);
#endif
}

std::int64_t screened_topk(const TensorView& screen, const TensorView& x, const TensorView& w_t,
                           const TensorView& norms, const std::optional<TensorView>& bias,
                           const std::optional<TensorView>& scale, std::int64_t k,
                           const TensorView& out_values, const TensorView& out_index) {
  constexpr const char* kOp = "screened_topk";
  MECHINTERP_CHECK(screen.dim() == 2, kOp, ": screen must be [rows, d_sae], got ",
                   screen.shape_string());
  MECHINTERP_CHECK(screen.is_cpu(), kOp, ": runs on the CPU only, got ",
                   device_name(screen.device));
  MECHINTERP_CHECK(screen.dtype == DType::BFloat16, kOp, ": screen must be bfloat16, got ",
                   dtype_name(screen.dtype));
  const std::int64_t rows = screen.size(0);
  const std::int64_t d_sae = screen.size(1);
  check_matrix(screen, rows, d_sae, kOp, "screen");
  MECHINTERP_CHECK(w_t.dim() == 2 && w_t.size(0) == d_sae, kOp, ": w_t must be [", d_sae,
                   ", d_in], got ", w_t.shape_string());
  const std::int64_t d_in = w_t.size(1);
  check_block(w_t, {d_sae, d_in}, DType::Float32, screen, kOp, "w_t");
  check_matrix(x, rows, d_in, kOp, "x");
  MECHINTERP_CHECK(x.dtype == DType::Float32, kOp, ": x must be float32, got ",
                   dtype_name(x.dtype));
  check_same_device(x, screen, kOp, "x");
  check_block(norms, {2, d_sae}, DType::Float64, screen, kOp, "norms");
  MECHINTERP_CHECK(k >= 1, kOp, ": k must be >= 1, got ", k);
  MECHINTERP_CHECK(d_sae <= INT32_MAX, kOp, ": latent indices must fit int32, got d_sae ", d_sae);
  check_topk_outputs(out_values, out_index, rows, k, screen, kOp);

  ScreenParams p{};
  p.rows = rows;
  p.d_in = d_in;
  p.d_sae = d_sae;
  p.k = k;
  p.screen_row_stride = screen.stride(0);
  p.x_row_stride = x.stride(0);
  p.out_row_stride = out_values.stride(0);
  p.w_t = w_t.data_as<float>();
  p.norms = norms.data_as<double>();
  p.bias = column_vector(bias, screen, d_sae, kOp, "bias");
  p.scale = column_vector(scale, screen, d_sae, kOp, "scale");
  if (rows == 0) return 0;
  return screened_topk_cpu(screen.data_as<BFloat16>(), x.data_as<float>(),
                           out_values.data_as<float>(), out_index.data_as<std::int32_t>(), p);
}

void sparse_decode(const TensorView& index, const TensorView& values,
                   const std::optional<TensorView>& row_ptr, const TensorView& weight,
                   const std::optional<TensorView>& bias, const TensorView& out, bool accumulate,
                   std::uintptr_t stream) {
  constexpr const char* kOp = "sparse_decode";
  MECHINTERP_CHECK(weight.dim() == 2 && weight.is_contiguous(), kOp,
                   ": weight must be a contiguous [d_sae, d_out], got ", weight.shape_string());
  MECHINTERP_CHECK(is_floating(weight.dtype), kOp, ": weight must be floating, got ",
                   dtype_name(weight.dtype));
  const std::int64_t d_sae = weight.size(0);
  const std::int64_t d_out = weight.size(1);
  MECHINTERP_CHECK(out.dim() == 2 && out.size(1) == d_out && (d_out <= 1 || out.stride(1) == 1),
                   kOp, ": out must be [rows, ", d_out, "] with unit column stride, got ",
                   out.shape_string());
  MECHINTERP_CHECK(out.dtype == weight.dtype, kOp, ": out must have weight's dtype ",
                   dtype_name(weight.dtype), ", got ", dtype_name(out.dtype));
  const std::int64_t rows = out.size(0);
  MECHINTERP_CHECK(index.dtype == DType::Int32 || index.dtype == DType::Int64, kOp,
                   ": index must be int32 or int64, got ", dtype_name(index.dtype));
  const DType want_values = acc_dtype(weight.dtype);
  MECHINTERP_CHECK(values.dtype == want_values, kOp, ": values must be ", dtype_name(want_values),
                   " for ", dtype_name(weight.dtype), " weight, got ", dtype_name(values.dtype));
  MECHINTERP_CHECK(index.is_contiguous() && values.is_contiguous(), kOp,
                   ": index and values must be contiguous");
  DecodeParams p{};
  p.rows = rows;
  p.d_out = d_out;
  p.d_sae = d_sae;
  p.out_row_stride = out.stride(0);
  p.accumulate = accumulate;
  if (row_ptr) {
    MECHINTERP_CHECK(row_ptr->dtype == DType::Int64 && row_ptr->dim() == 1 &&
                         row_ptr->size(0) == rows + 1 && row_ptr->is_contiguous(),
                     kOp, ": row_ptr must be a contiguous int64 [", rows + 1, "], got ",
                     dtype_name(row_ptr->dtype), " ", row_ptr->shape_string());
    MECHINTERP_CHECK(index.dim() == 1 && values.dim() == 1 && index.size(0) == values.size(0),
                     kOp, ": with row_ptr, index and values must be [nnz], got ",
                     index.shape_string(), " and ", values.shape_string());
    check_same_device(*row_ptr, out, kOp, "row_ptr");
    p.row_ptr = row_ptr->data_as<std::int64_t>();
  } else {
    MECHINTERP_CHECK(index.dim() == 2 && index.size(0) == rows && values.dim() == 2 &&
                         values.size(0) == rows && values.size(1) == index.size(1),
                     kOp, ": index and values must be [", rows, ", k], got ",
                     index.shape_string(), " and ", values.shape_string());
    p.per_row = index.size(1);
  }
  if (bias) {
    MECHINTERP_CHECK(bias->dtype == weight.dtype && bias->dim() == 1 && bias->size(0) == d_out &&
                         bias->is_contiguous(),
                     kOp, ": bias must be a contiguous ", dtype_name(weight.dtype), " [", d_out,
                     "], got ", dtype_name(bias->dtype), " ", bias->shape_string());
    check_same_device(*bias, out, kOp, "bias");
  }
  check_same_device(index, out, kOp, "index");
  check_same_device(values, out, kOp, "values");
  check_same_device(weight, out, kOp, "weight");
  if (rows == 0 || d_out == 0) return;

  auto run = [&](auto weight_tag, auto index_tag) {
    using W = typename decltype(weight_tag)::type;
    using I = typename decltype(index_tag)::type;
    const W* bias_ptr = bias ? bias->data_as<W>() : nullptr;
    if (out.is_cpu()) {
      sparse_decode_cpu<W, I>(index.data_as<I>(), values.data_as<acc_t<W>>(),
                              weight.data_as<W>(), bias_ptr, out.data_as<W>(), p);
      return;
    }
#if defined(MECHINTERP_WITH_CUDA)
    const CudaDeviceGuard guard(out.device.index);
    launch_sparse_decode_cuda<W, I>(index.data_as<I>(), values.data_as<acc_t<W>>(),
                                    weight.data_as<W>(), bias_ptr, out.data_as<W>(), p,
                                    reinterpret_cast<cudaStream_t>(stream));
#else
    (void)stream;
    throw_no_cuda(kOp, out.device);
#endif
  };
  dispatch_floating(weight.dtype, kOp, "weight", [&](auto weight_tag) {
    if (index.dtype == DType::Int32) {
      run(weight_tag, TypeTag<std::int32_t>{});
    } else {
      run(weight_tag, TypeTag<std::int64_t>{});
    }
  });
}

}  // namespace mechinterp::sae
