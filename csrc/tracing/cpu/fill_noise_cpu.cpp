#include <cmath>
#include <cstdint>

#include "common/dispatch.h"
#include "tracing/tracing.h"

namespace mechinterp::tracing {

template <typename T>
void fill_noise_cpu(T* out, const NoiseParams& p) {
  // Each value depends on its index only, so the thread count cannot change the result.
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (p.n >= 65536)
#endif
  for (std::int64_t i = 0; i < p.n; ++i) {
    const double value = noise_value(p.offset + static_cast<std::uint64_t>(i), p.seed, p.kind);
    out[i] = static_cast<T>(value);
  }
}

template <>
void fill_noise_cpu<Half>(Half* out, const NoiseParams& p) {
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (p.n >= 65536)
#endif
  for (std::int64_t i = 0; i < p.n; ++i) {
    // Through float, as the CUDA kernel rounds: double -> float -> half.
    out[i] = Half(static_cast<float>(noise_value(p.offset + static_cast<std::uint64_t>(i), p.seed, p.kind)));
  }
}

template <>
void fill_noise_cpu<BFloat16>(BFloat16* out, const NoiseParams& p) {
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (p.n >= 65536)
#endif
  for (std::int64_t i = 0; i < p.n; ++i) {
    out[i] = BFloat16(
        static_cast<float>(noise_value(p.offset + static_cast<std::uint64_t>(i), p.seed, p.kind)));
  }
}

template void fill_noise_cpu<double>(double*, const NoiseParams&);
template void fill_noise_cpu<float>(float*, const NoiseParams&);

}  // namespace mechinterp::tracing
