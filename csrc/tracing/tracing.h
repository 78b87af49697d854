// Causal-tracing kernels: seeded noise that is bit-reproducible for a seed on each device.
//
// fill_noise: out [n] contiguous, float64 / float32 / float16 / bfloat16.
//   out[i] is a function of (seed, offset + i) only: a Philox4x32-10 counter-based generator
//   (Salmon et al., SC 2011) keyed by the seed, one counter per pair of elements, so the
//   values do not depend on the thread count, the launch shape or the tensor's later use.
//   kind Gaussian: standard normal by the Box-Muller transform, computed in float64;
//   kind Uniform: uniform on [-1, 1) (ROME's uniform option), from 53 random bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dispatch.h"
#include "common/tensor_view.h"

#if defined(MECHINTERP_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mechinterp::tracing {

enum class NoiseKind : std::int32_t { Gaussian = 0, Uniform = 1 };

void fill_noise(const TensorView& out, std::uint64_t seed, std::uint64_t offset, NoiseKind kind,
                std::uintptr_t stream);

struct NoiseParams {
  std::int64_t n;
  std::uint64_t seed;
  std::uint64_t offset;
  NoiseKind kind;
};

// ---- Philox4x32-10, usable on host and device ----

struct Philox4 {
  std::uint32_t x[4];
};

#if defined(__CUDACC__)
#define MECHINTERP_HD __host__ __device__ __forceinline__
#else
#define MECHINTERP_HD inline
#endif

MECHINTERP_HD void mul_hi_lo(std::uint32_t a, std::uint32_t b, std::uint32_t* hi,
                             std::uint32_t* lo) {
  const std::uint64_t product = static_cast<std::uint64_t>(a) * b;
  *hi = static_cast<std::uint32_t>(product >> 32);
  *lo = static_cast<std::uint32_t>(product);
}

// Four 32-bit outputs for counter `counter` under key `seed`.
MECHINTERP_HD Philox4 philox(std::uint64_t counter, std::uint64_t seed) {
  Philox4 c{{static_cast<std::uint32_t>(counter), static_cast<std::uint32_t>(counter >> 32), 0u,
             0u}};
  std::uint32_t k0 = static_cast<std::uint32_t>(seed);
  std::uint32_t k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(0xD2511F53u, c.x[0], &hi0, &lo0);
    mul_hi_lo(0xCD9E8D57u, c.x[2], &hi1, &lo1);
    c = Philox4{{hi1 ^ c.x[1] ^ k0, lo1, hi0 ^ c.x[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// A double in [0, 1) from 53 random bits.
MECHINTERP_HD double unit_double(std::uint32_t high, std::uint32_t low) {
  const std::uint64_t bits = (static_cast<std::uint64_t>(high) << 21) ^ (low >> 11);
  return static_cast<double>(bits & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);
}

template <typename T>
void fill_noise_cpu(T* out, const NoiseParams& params);

#if defined(MECHINTERP_WITH_CUDA)
template <typename T>
void launch_fill_noise_cuda(T* out, const NoiseParams& params, cudaStream_t stream);
#endif

}  // namespace mechinterp::tracing

namespace mechinterp::tracing {

// Element `index` of the stream: pairs of elements share one Philox call.
MECHINTERP_HD double noise_value(std::uint64_t index, std::uint64_t seed, NoiseKind kind) {
  const Philox4 r = philox(index >> 1, seed);
  const double u1 = unit_double(r.x[0], r.x[1]);
  const double u2 = unit_double(r.x[2], r.x[3]);
  const bool second = (index & 1u) != 0;
  if (kind == NoiseKind::Uniform) return 2.0 * (second ? u2 : u1) - 1.0;
  const double radius = sqrt(-2.0 * log(1.0 - u1));  // 1 - u1 lies in (0, 1]
  const double angle = 6.283185307179586 * u2;
  return second ? radius * sin(angle) : radius * cos(angle);
}

}  // namespace mechinterp::tracing
