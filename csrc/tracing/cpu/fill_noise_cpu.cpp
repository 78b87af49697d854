#include <cmath>
#include <cstdint>

#include "common/dispatch.h"
#include "tracing/tracing.h"

namespace mechinterp::tracing {

namespace {

// float64 and float32 round the float64 value once; the 16-bit types go through float, as the
// CUDA kernel rounds them (double -> float -> half).
template <typename T>
T narrow(double v) {
  return static_cast<T>(v);
}
template <>
Half narrow<Half>(double v) {
  return Half(static_cast<float>(v));
}
template <>
BFloat16 narrow<BFloat16>(double v) {
  return BFloat16(static_cast<float>(v));
}

}  // namespace

template <typename T>
void fill_noise_cpu(T* out, const NoiseParams& p) {
  // Each value depends on its index only, so the thread count cannot change the result.
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (p.n >= 65536)
#endif
  for (std::int64_t i = 0; i < p.n; ++i) {
    out[i] = narrow<T>(noise_value(p.offset + static_cast<std::uint64_t>(i), p.seed, p.kind));
  }
}

template void fill_noise_cpu<double>(double*, const NoiseParams&);
template void fill_noise_cpu<float>(float*, const NoiseParams&);
template void fill_noise_cpu<Half>(Half*, const NoiseParams&);
template void fill_noise_cpu<BFloat16>(BFloat16*, const NoiseParams&);

}  // namespace mechinterp::tracing
