#include "patching/patching.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/device.h"
#include "common/dispatch.h"

namespace mechinterp::patching {

namespace {

void check_memory(const char* op, const TensorView& view, const char* name) {
  MECHINTERP_CHECK(view.numel() == 0 || view.data != nullptr, op, ": ", name, " has ",
                   view.numel(), " elements but a null data pointer");
}

void check_same_device(const char* op, const TensorView& a, const char* a_name,
                       const TensorView& b, const char* b_name) {
  MECHINTERP_CHECK(a.device == b.device, op, ": ", a_name, " and ", b_name,
                   " must be on the same device, got ", device_name(a.device), " and ",
                   device_name(b.device));
}

// The host copy is what gets validated; the device copy must describe the same values.
void check_index_pair(const char* op, const TensorView& host, const TensorView& on_device,
                      const char* name, DType dtype, std::int64_t rows, std::int64_t cols,
                      const TensorView& data) {
  MECHINTERP_CHECK(host.is_cpu(), op, ": the host copy of ", name, " must be on the cpu, got ",
                   device_name(host.device));
  for (const TensorView* view : {&host, &on_device}) {
    MECHINTERP_CHECK(view->dtype == dtype, op, ": ", name, " must be ", dtype_name(dtype),
                     ", got ", dtype_name(view->dtype));
    const bool shape_ok = cols == 0 ? (view->dim() == 1 && view->size(0) == rows)
                                    : (view->dim() == 2 && view->size(0) == rows &&
                                       view->size(1) == cols);
    const std::string expected = cols == 0
        ? "[" + std::to_string(rows) + "]"
        : "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
    MECHINTERP_CHECK(shape_ok, op, ": ", name, " must have shape ", expected, ", got ",
                     view->shape_string());
    MECHINTERP_CHECK(view->is_contiguous(), op, ": ", name, " must be contiguous");
    check_memory(op, *view, name);
  }
  check_same_device(op, on_device, name, data, "the data");
}

void check_boxes(const TensorView& boxes_host, const TensorView& alpha_host, std::int64_t rows,
                 std::int64_t sources, std::int64_t extent_a, std::int64_t extent_f,
                 std::int64_t* max_box) {
  constexpr const char* kOp = "patch_boxes";
  const auto* boxes = boxes_host.data_as<const Box>();
  const auto* alpha = alpha_host.data_as<const double>();
  const std::int64_t n = boxes_host.size(0);
  *max_box = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const Box& b = boxes[i];
    MECHINTERP_CHECK(b.row >= 0 && b.row < rows, kOp, ": box ", i, " has row ", b.row,
                     ", outside [0, ", rows, ")");
    MECHINTERP_CHECK(b.source >= 0 && b.source < sources, kOp, ": box ", i, " has source row ",
                     b.source, ", outside [0, ", sources, ")");
    MECHINTERP_CHECK(0 <= b.a_begin && b.a_begin <= b.a_end && b.a_end <= extent_a, kOp,
                     ": box ", i, " spans [", b.a_begin, ", ", b.a_end, ") on axis 1, which must "
                     "lie in [0, ", extent_a, "]");
    MECHINTERP_CHECK(0 <= b.f_begin && b.f_begin <= b.f_end && b.f_end <= extent_f, kOp,
                     ": box ", i, " spans [", b.f_begin, ", ", b.f_end, ") on axis 2, which must "
                     "lie in [0, ", extent_f, "]");
    MECHINTERP_CHECK(std::isfinite(alpha[i]), kOp, ": alpha of box ", i, " must be finite, got ",
                     alpha[i]);
    *max_box = std::max(*max_box, (b.a_end - b.a_begin) * (b.f_end - b.f_begin));
  }
  // Overlapping boxes in one row would race in parallel and make the result order-dependent.
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  std::sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) {
    return boxes[x].row != boxes[y].row ? boxes[x].row < boxes[y].row
                                        : boxes[x].a_begin < boxes[y].a_begin;
  });
  for (std::size_t i = 0; i < order.size(); ++i) {
    const Box& b = boxes[order[i]];
    for (std::size_t j = i + 1; j < order.size(); ++j) {
      const Box& c = boxes[order[j]];
      if (c.row != b.row || c.a_begin >= b.a_end) break;  // sorted: nothing later overlaps b on a
      const bool overlap = c.f_begin < b.f_end && b.f_begin < c.f_end &&
                           b.a_begin < b.a_end && c.a_begin < c.a_end;
      MECHINTERP_CHECK(!overlap, kOp, ": boxes ", order[i], " and ", order[j],
                       " overlap in row ", b.row, "; boxes of one row must be disjoint");
    }
  }
}

}  // namespace

void patch_boxes(const TensorView& dest, const TensorView& src, const std::optional<TensorView>& cur,
                 const TensorView& boxes_host, const TensorView& boxes,
                 const TensorView& alpha_host, const TensorView& alpha, std::uintptr_t stream) {
  constexpr const char* kOp = "patch_boxes";
  MECHINTERP_CHECK(dest.dim() == 3, kOp, ": dest must be 3-D [rows, a, f], got shape ",
                   dest.shape_string());
  MECHINTERP_CHECK(is_floating(dest.dtype), kOp,
                   ": dest must be float64, float32, float16 or bfloat16, got ",
                   dtype_name(dest.dtype));
  MECHINTERP_CHECK(src.dim() == 3 && src.size(1) == dest.size(1) && src.size(2) == dest.size(2),
                   kOp, ": src must have shape [sources, ", dest.size(1), ", ", dest.size(2),
                   "] to match dest ", dest.shape_string(), ", got ", src.shape_string());
  MECHINTERP_CHECK(src.dtype == dest.dtype, kOp, ": src must have dest's dtype ",
                   dtype_name(dest.dtype), ", got ", dtype_name(src.dtype));
  check_same_device(kOp, dest, "dest", src, "src");
  if (cur) {
    MECHINTERP_CHECK(cur->dim() == 3 && cur->size(0) == dest.size(0) &&
                         cur->size(1) == dest.size(1) && cur->size(2) == dest.size(2),
                     kOp, ": cur must have dest's shape ", dest.shape_string(), ", got ",
                     cur->shape_string());
    MECHINTERP_CHECK(cur->dtype == dest.dtype, kOp, ": cur must have dest's dtype ",
                     dtype_name(dest.dtype), ", got ", dtype_name(cur->dtype));
    check_same_device(kOp, dest, "dest", *cur, "cur");
    check_memory(kOp, *cur, "cur");
  }
  MECHINTERP_CHECK(boxes_host.dim() == 2, kOp, ": boxes must be 2-D [m, 6], got shape ",
                   boxes_host.shape_string());
  const std::int64_t n = boxes_host.size(0);
  check_index_pair(kOp, boxes_host, boxes, "boxes", DType::Int64, n, 6, dest);
  check_index_pair(kOp, alpha_host, alpha, "alpha", DType::Float64, n, 0, dest);
  check_memory(kOp, dest, "dest");
  check_memory(kOp, src, "src");

  PatchBoxesParams params{};
  params.n_boxes = n;
  params.has_cur = cur.has_value();
  for (int d = 0; d < 3; ++d) {
    params.dest_stride[d] = dest.stride(d);
    params.src_stride[d] = src.stride(d);
    params.cur_stride[d] = cur ? cur->stride(d) : 0;
  }
  check_boxes(boxes_host, alpha_host, dest.size(0), src.size(0), dest.size(1), dest.size(2),
              &params.max_box);
  if (n == 0 || params.max_box == 0) return;

  if (dest.is_cpu()) {
    dispatch_floating(dest.dtype, kOp, "dest", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      patch_boxes_cpu<scalar_t>(dest.data_as<scalar_t>(), src.data_as<const scalar_t>(),
                                cur ? cur->data_as<const scalar_t>() : nullptr,
                                boxes.data_as<const Box>(), alpha.data_as<const double>(), params);
    });
    return;
  }
  MECHINTERP_INTERNAL_ASSERT(dest.is_cuda(), "unhandled device type ",
                             static_cast<int>(dest.device.type));
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(dest.device.index);
  dispatch_floating(dest.dtype, kOp, "dest", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_patch_boxes_cuda<scalar_t>(dest.data_as<scalar_t>(), src.data_as<const scalar_t>(),
                                      cur ? cur->data_as<const scalar_t>() : nullptr,
                                      boxes.data_as<const Box>(), alpha.data_as<const double>(),
                                      params, reinterpret_cast<cudaStream_t>(stream));
  });
#else
  (void)stream;
  throw_no_cuda(kOp, dest.device);
#endif
}

void patch_metric(const TensorView& logits, MetricKind kind, const TensorView& index_host,
                  const TensorView& index, const std::optional<TensorView>& ref,
                  const TensorView& out, std::uintptr_t stream) {
  constexpr const char* kOp = "patch_metric";
  MECHINTERP_CHECK(logits.dim() == 2, kOp, ": logits must be 2-D [rows, vocab], got shape ",
                   logits.shape_string());
  MECHINTERP_CHECK(is_floating(logits.dtype), kOp,
                   ": logits must be float64, float32, float16 or bfloat16, got ",
                   dtype_name(logits.dtype));
  const std::int64_t rows = logits.size(0);
  const std::int64_t vocab = logits.size(1);
  MECHINTERP_CHECK(vocab > 0, kOp, ": logits must have at least one vocabulary entry, got shape ",
                   logits.shape_string());
  const int k = static_cast<int>(kind);
  MECHINTERP_CHECK(k >= 0 && k <= 3, kOp, ": kind must be 0 (logit_diff), 1 (logprob), 2 (prob) "
                   "or 3 (kl), got ", k);
  check_index_pair(kOp, index_host, index, "index", DType::Int64, rows, 2, logits);
  std::int64_t ref_rows = 0;
  if (kind == MetricKind::KL) {
    MECHINTERP_CHECK(ref.has_value(), kOp, ": kind kl needs ref logits [refs, vocab]");
    MECHINTERP_CHECK(ref->dim() == 2 && ref->size(1) == vocab, kOp,
                     ": ref must have shape [refs, ", vocab, "], got ", ref->shape_string());
    MECHINTERP_CHECK(ref->dtype == logits.dtype, kOp, ": ref must have the logits' dtype ",
                     dtype_name(logits.dtype), ", got ", dtype_name(ref->dtype));
    check_same_device(kOp, logits, "logits", *ref, "ref");
    check_memory(kOp, *ref, "ref");
    ref_rows = ref->size(0);
  }
  const auto* idx = index_host.data_as<const std::int64_t>();
  for (std::int64_t r = 0; r < rows; ++r) {
    if (kind == MetricKind::KL) {
      MECHINTERP_CHECK(idx[2 * r] >= 0 && idx[2 * r] < ref_rows, kOp, ": ref row of run ", r,
                       " is ", idx[2 * r], ", outside [0, ", ref_rows, ")");
      continue;
    }
    const int used = kind == MetricKind::LogitDiff ? 2 : 1;
    for (int j = 0; j < used; ++j) {
      MECHINTERP_CHECK(idx[2 * r + j] >= 0 && idx[2 * r + j] < vocab, kOp, ": ",
                       j == 0 ? "target" : "other", " token of run ", r, " is ", idx[2 * r + j],
                       ", outside the vocabulary [0, ", vocab, ")");
    }
  }
  const DType out_dtype = acc_dtype(logits.dtype);
  MECHINTERP_CHECK(out.dim() == 1 && out.size(0) == rows && out.dtype == out_dtype &&
                       out.is_contiguous(),
                   kOp, ": out must be contiguous ", dtype_name(out_dtype), " [", rows, "], got ",
                   dtype_name(out.dtype), " ", out.shape_string());
  check_same_device(kOp, logits, "logits", out, "out");
  check_memory(kOp, logits, "logits");
  check_memory(kOp, out, "out");
  if (rows == 0) return;

  PatchMetricParams params{};
  params.rows = rows;
  params.vocab = vocab;
  params.kind = kind;
  params.logits_stride[0] = logits.stride(0);
  params.logits_stride[1] = logits.stride(1);
  params.ref_stride[0] = ref ? ref->stride(0) : 0;
  params.ref_stride[1] = ref ? ref->stride(1) : 0;

  if (logits.is_cpu()) {
    dispatch_floating(logits.dtype, kOp, "logits", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      patch_metric_cpu<scalar_t>(logits.data_as<const scalar_t>(),
                                 index.data_as<const std::int64_t>(),
                                 ref ? ref->data_as<const scalar_t>() : nullptr,
                                 out.data_as<acc_t<scalar_t>>(), params);
    });
    return;
  }
  MECHINTERP_INTERNAL_ASSERT(logits.is_cuda(), "unhandled device type ",
                             static_cast<int>(logits.device.type));
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(logits.device.index);
  dispatch_floating(logits.dtype, kOp, "logits", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_patch_metric_cuda<scalar_t>(logits.data_as<const scalar_t>(),
                                       index.data_as<const std::int64_t>(),
                                       ref ? ref->data_as<const scalar_t>() : nullptr,
                                       out.data_as<acc_t<scalar_t>>(), params,
                                       reinterpret_cast<cudaStream_t>(stream));
  });
#else
  (void)stream;
  throw_no_cuda(kOp, logits.device);
#endif
}

}  // namespace mechinterp::patching
