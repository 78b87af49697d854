// Floating-point dtype dispatch and the scalar types it hands out.
//
// Dispatch yields host-side storage types {double, float, Half, BFloat16}. Half and BFloat16 are
// plain 16-bit values with their own conversions, so .cpp files never need CUDA headers; .cu files
// map them to __half / __nv_bfloat16 (identical layout) with cuda_scalar_t.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/check.h"
#include "common/tensor_view.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace mechinterp {

// ---- fp16 / bf16 bit conversions (IEEE 754 binary16, bfloat16; round to nearest even) ----

inline float bits_to_float(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline std::uint32_t float_to_bits(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // Subnormal halves are mantissa * 2^-24, exact in float; scaling by a power of two is exact.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  // binary16 bias is 15, binary32 bias is 127.
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t bits = float_to_bits(f);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {
    // Keep NaN a NaN even when its payload lives only in the bits that get dropped.
    if (magnitude == 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  }
  // 65520 is halfway between the largest half (65504) and 2^16; ties go to even, i.e. infinity.
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (magnitude < 0x38800000u) {
    // Below the smallest normal half (2^-14): the result is a multiple of 2^-24. The scaled value
    // is exact, and nearbyint rounds it to nearest even; 1024 lands on the smallest normal.
    const float scaled = bits_to_float(magnitude) * 16777216.0f;
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::nearbyint(scaled)));
  }
  // Round the 13 dropped mantissa bits to nearest even, then rebias the exponent by 127 - 15.
  const std::uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
}

inline float bfloat16_bits_to_float(std::uint16_t b) {
  return bits_to_float(static_cast<std::uint32_t>(b) << 16);
}

inline std::uint16_t float_to_bfloat16_bits(float f) {
  const std::uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN stays NaN
  }
  // A carry out of the mantissa correctly bumps the exponent, up to infinity.
  const std::uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(rounded >> 16);
}

// ---- host storage types for the 16-bit floats ----

struct Half {
  std::uint16_t bits;

  Half() = default;
  explicit Half(float f) : bits(float_to_half_bits(f)) {}
  static Half from_bits(std::uint16_t b) {
    Half h;
    h.bits = b;
    return h;
  }
  operator float() const { return half_bits_to_float(bits); }
};

struct BFloat16 {
  std::uint16_t bits;

  BFloat16() = default;
  explicit BFloat16(float f) : bits(float_to_bfloat16_bits(f)) {}
  static BFloat16 from_bits(std::uint16_t b) {
    BFloat16 h;
    h.bits = b;
    return h;
  }
  operator float() const { return bfloat16_bits_to_float(bits); }
};

static_assert(sizeof(Half) == 2 && alignof(Half) == 2, "Half must match torch.float16 storage");
static_assert(sizeof(BFloat16) == 2 && alignof(BFloat16) == 2,
              "BFloat16 must match torch.bfloat16 storage");

// ---- accumulation type: fp64 keeps double, everything narrower sums in float ----

template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

inline DType acc_dtype(DType dtype) {
  return dtype == DType::Float64 ? DType::Float64 : DType::Float32;
}

// ---- dispatch ----

template <typename T>
struct TypeTag {
  using type = T;
};

inline bool is_floating(DType dtype) {
  return dtype == DType::Float64 || dtype == DType::Float32 || dtype == DType::Float16 ||
         dtype == DType::BFloat16;
}

// Calls f(TypeTag<T>{}) with T the storage type of `dtype`; inside, write
//   using scalar_t = typename decltype(tag)::type;
// `op` and `arg` name the operation and argument for the error on any other dtype.
template <typename F>
decltype(auto) dispatch_floating(DType dtype, const char* op, const char* arg, F&& f) {
  switch (dtype) {
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float16: return f(TypeTag<Half>{});
    case DType::BFloat16: return f(TypeTag<BFloat16>{});
    default: break;
  }
  detail::throw_user_error(op, ": ", arg,
                           " must have a floating dtype (float64, float32, float16 or bfloat16), "
                           "got ",
                           dtype_name(dtype));
}

#if defined(__CUDACC__)

// Device-side counterparts of the host storage types.
template <typename T>
struct cuda_scalar {
  using type = T;
};
template <>
struct cuda_scalar<Half> {
  using type = __half;
};
template <>
struct cuda_scalar<BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using cuda_scalar_t = typename cuda_scalar<T>::type;

static_assert(sizeof(__half) == sizeof(Half), "__half and Half must share a layout");
static_assert(sizeof(__nv_bfloat16) == sizeof(BFloat16),
              "__nv_bfloat16 and BFloat16 must share a layout");

template <typename Acc>
__device__ __forceinline__ Acc to_acc(double v) {
  return static_cast<Acc>(v);
}
template <typename Acc>
__device__ __forceinline__ Acc to_acc(float v) {
  return static_cast<Acc>(v);
}
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half v) {
  return static_cast<Acc>(__half2float(v));
}
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) {
  return static_cast<Acc>(__bfloat162float(v));
}

// Rounding back from the accumulation type: to nearest even for the 16-bit floats.
template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

#endif  // __CUDACC__

}  // namespace mechinterp
