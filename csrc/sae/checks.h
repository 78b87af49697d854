// Argument checks shared by the SAE entry points (sae.cpp, fused_threshold.cpp).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/check.h"
#include "common/tensor_view.h"

namespace mechinterp::sae {

// t on the device of ref, the argument named ref_name.
inline void check_same_device(const TensorView& t, const TensorView& ref, const char* op,
                              const char* name, const char* ref_name = "values") {
  MECHINTERP_CHECK(t.device == ref.device, op, ": ", name, " must be on ", device_name(ref.device),
                   " with ", ref_name, ", got ", device_name(t.device));
}

// A contiguous tensor of exactly shape and dtype on the device of ref (named ref_name).
inline void check_block(const TensorView& t, std::initializer_list<std::int64_t> shape,
                        DType dtype, const TensorView& ref, const char* op, const char* name,
                        const char* ref_name = "values") {
  bool ok = t.dim() == static_cast<std::int64_t>(shape.size()) && t.is_contiguous();
  std::int64_t d = 0;
  for (const std::int64_t want : shape) ok = ok && t.size(d++) == want;
  if (!ok) {
    std::string wanted;
    for (const std::int64_t want : shape) {
      wanted += (wanted.empty() ? "" : ", ") + std::to_string(want);
    }
    detail::throw_user_error(op, ": ", name, " must be a contiguous [", wanted, "], got ",
                             t.shape_string());
  }
  MECHINTERP_CHECK(t.dtype == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                   dtype_name(t.dtype));
  check_same_device(t, ref, op, name, ref_name);
}

// A 16-bit float tensor: bfloat16 or float16 (the fused encode's element types).
inline void check_half_values(const TensorView& t, const char* op, const char* name) {
  MECHINTERP_CHECK(t.dtype == DType::BFloat16 || t.dtype == DType::Float16, op, ": ", name,
                   " must be bfloat16 or float16, got ", dtype_name(t.dtype));
}

}  // namespace mechinterp::sae
