#include "tracing/tracing.h"

#include <cstdint>

#include "common/check.h"
#include "common/device.h"
#include "common/dispatch.h"

namespace mechinterp::tracing {

void fill_noise(const TensorView& out, std::uint64_t seed, std::uint64_t offset, NoiseKind kind,
                std::uintptr_t stream) {
  constexpr const char* kOp = "fill_noise";
  MECHINTERP_CHECK(is_floating(out.dtype), kOp,
                   ": out must be float64, float32, float16 or bfloat16, got ",
                   dtype_name(out.dtype));
  MECHINTERP_CHECK(out.is_contiguous(), kOp, ": out must be contiguous, got shape ",
                   out.shape_string());
  const int k = static_cast<int>(kind);
  MECHINTERP_CHECK(k == 0 || k == 1, kOp, ": kind must be 0 (gaussian) or 1 (uniform), got ", k);
  MECHINTERP_CHECK(out.numel() == 0 || out.data != nullptr, kOp, ": out has ", out.numel(),
                   " elements but a null data pointer");
  const NoiseParams params{out.numel(), seed, offset, kind};
  if (params.n == 0) return;
  if (out.is_cpu()) {
    dispatch_floating(out.dtype, kOp, "out", [&](auto tag) {
      using scalar_t = typename decltype(tag)::type;
      fill_noise_cpu<scalar_t>(out.data_as<scalar_t>(), params);
    });
    return;
  }
  MECHINTERP_INTERNAL_ASSERT(out.is_cuda(), "unhandled device type ",
                             static_cast<int>(out.device.type));
#if defined(MECHINTERP_WITH_CUDA)
  const CudaDeviceGuard guard(out.device.index);
  dispatch_floating(out.dtype, kOp, "out", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_fill_noise_cuda<scalar_t>(out.data_as<scalar_t>(), params,
                                     reinterpret_cast<cudaStream_t>(stream));
  });
#else
  (void)stream;
  throw_no_cuda(kOp, out.device);
#endif
}

}  // namespace mechinterp::tracing
