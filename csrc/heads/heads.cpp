#include "heads/heads.h"

#include <algorithm>
#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/dispatch.h"

namespace mechinterp::heads {

namespace {

constexpr const char* kOp = "diagonal_score";

void check_memory(const TensorView& view, const char* name) {
  MECHINTERP_CHECK(view.numel() == 0 || view.data != nullptr, kOp, ": ", name,
                   " has ", view.numel(), " elements but a null data pointer");
}

}  // namespace

void diagonal_score(const TensorView& pattern, const TensorView& out, std::int64_t offset,
                    std::int64_t first_query, std::uintptr_t stream) {
  // ---- validate ----
  MECHINTERP_CHECK(pattern.dim() == 4, kOp,
                   ": pattern must be 4-D [batch, head, query, key], got ", pattern.dim(),
                   "-D with shape ", pattern.shape_string());
  MECHINTERP_CHECK(is_floating(pattern.dtype), kOp,
                   ": pattern must be float64, float32, float16 or bfloat16, got ",
                   dtype_name(pattern.dtype));
  const std::int64_t batch = pattern.size(0);
  const std::int64_t heads = pattern.size(1);
  const std::int64_t query = pattern.size(2);
  const std::int64_t key = pattern.size(3);
  MECHINTERP_CHECK(key == query, kOp,
                   ": pattern must be square in its last two dims (key == query, a self-attention "
                   "pattern), got query=",
                   query, " and key=", key, " in shape ", pattern.shape_string());
  MECHINTERP_CHECK(offset >= 0, kOp, ": offset must be >= 0, got ", offset);
  MECHINTERP_CHECK(first_query >= 0, kOp, ": first_query must be >= 0, got ", first_query);
  const std::int64_t q_begin = std::max(first_query, offset);
  MECHINTERP_CHECK(q_begin < query, kOp,
                   ": no query position to average over: need max(first_query, offset) < query, "
                   "got first_query=",
                   first_query, ", offset=", offset, ", query=", query);
  MECHINTERP_CHECK(batch > 0, kOp, ": pattern has batch size 0; the mean over the batch is empty",
                   " (shape ", pattern.shape_string(), ")");

  const DType out_dtype = acc_dtype(pattern.dtype);
  MECHINTERP_CHECK(out.dim() == 1 && out.size(0) == heads, kOp, ": out must have shape [", heads,
                   "] (one value per head), got ", out.shape_string());
  MECHINTERP_CHECK(out.dtype == out_dtype, kOp, ": out must be ", dtype_name(out_dtype),
                   " for a ", dtype_name(pattern.dtype), " pattern, got ", dtype_name(out.dtype));
  MECHINTERP_CHECK(out.is_contiguous(), kOp, ": out must be contiguous, got stride ",
                   out.stride(0));
  MECHINTERP_CHECK(out.device == pattern.device, kOp,
                   ": out and pattern must be on the same device, got out on ",
                   device_name(out.device), " and pattern on ", device_name(pattern.device));
  check_memory(pattern, "pattern");
  check_memory(out, "out");
  if (heads == 0) return;

  const DiagonalScoreParams params{batch,
                                   heads,
                                   query,
                                   pattern.stride(0),
                                   pattern.stride(1),
                                   pattern.stride(2),
                                   pattern.stride(3),
                                   offset,
                                   q_begin};

  // ---- dispatch ----
  if (pattern.is_cpu()) {
    dispatch_floating(pattern.dtype, kOp, "pattern", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      diagonal_score_cpu<scalar_t>(pattern.data_as<const scalar_t>(), out.data_as<acc_t<scalar_t>>(),
                                   params);
    });
    return;
  }

  MECHINTERP_INTERNAL_ASSERT(pattern.is_cuda(), "unhandled device type ",
                             static_cast<int>(pattern.device.type));
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(pattern.device.index);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_floating(pattern.dtype, kOp, "pattern", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_diagonal_score_cuda<scalar_t>(pattern.data_as<const scalar_t>(),
                                         out.data_as<acc_t<scalar_t>>(), params, cuda_stream);
  });
#else
  (void)stream;
  throw_no_cuda(kOp, pattern.device);
#endif
}

}  // namespace mechinterp::heads
