// Python-side tensor description -> TensorView. The tuple is built by mechinterp._ops._view:
//   (data_ptr: int, dtype: str, shape: tuple[int, ...], strides: tuple[int, ...],
//    device_type: "cpu" | "cuda", device_index: int | None)
// Every malformed field is a user error naming the argument, because a wrong tuple usually means a
// caller bypassed _ops.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common/check.h"
#include "common/tensor_view.h"

namespace mechinterp {

inline std::string type_name(pybind11::handle obj) {
  return pybind11::str(pybind11::type::handle_of(obj).attr("__name__"));
}

inline DType parse_dtype(const std::string& text, const char* name) {
  if (text == "float64") return DType::Float64;
  if (text == "float32") return DType::Float32;
  if (text == "float16") return DType::Float16;
  if (text == "bfloat16") return DType::BFloat16;
  if (text == "int64") return DType::Int64;
  if (text == "int32") return DType::Int32;
  if (text == "bool") return DType::Bool;
  detail::throw_user_error(name,
                           ": dtype must be one of float64, float32, float16, bfloat16, int64, "
                           "int32, bool, got '",
                           text, "'");
}

inline std::int64_t parse_int(pybind11::handle obj, const char* name, const char* field) {
  MECHINTERP_CHECK(pybind11::isinstance<pybind11::int_>(obj), name, ": ", field,
                   " must be an int, got ", type_name(obj));
  try {
    return obj.cast<std::int64_t>();
  } catch (const pybind11::cast_error&) {
    detail::throw_user_error(name, ": ", field, " must fit in a signed 64-bit integer, got ",
                             std::string(pybind11::str(obj)));
  }
}

inline int parse_dims(pybind11::handle obj, const char* name, const char* field,
                      std::int64_t* dims) {
  MECHINTERP_CHECK(pybind11::isinstance<pybind11::tuple>(obj), name, ": ", field,
                   " must be a tuple of ints, got ", type_name(obj));
  const auto items = pybind11::reinterpret_borrow<pybind11::tuple>(obj);
  MECHINTERP_CHECK(items.size() <= static_cast<std::size_t>(TensorView::kMaxDims), name,
                   ": tensors of at most ", TensorView::kMaxDims, " dims are supported, got ",
                   items.size(), " ", field);
  for (std::size_t d = 0; d < items.size(); ++d) dims[d] = parse_int(items[d], name, field);
  return static_cast<int>(items.size());
}

inline TensorView view_from_py(pybind11::handle obj, const char* name) {
  MECHINTERP_CHECK(pybind11::isinstance<pybind11::tuple>(obj), name,
                   ": expected a tensor view tuple (data_ptr, dtype, shape, strides, device_type, "
                   "device_index), got ",
                   type_name(obj));
  const auto fields = pybind11::reinterpret_borrow<pybind11::tuple>(obj);
  MECHINTERP_CHECK(fields.size() == 6, name,
                   ": expected a tensor view tuple of 6 fields (data_ptr, dtype, shape, strides, "
                   "device_type, device_index), got ",
                   fields.size(), " fields");

  TensorView view;
  MECHINTERP_CHECK(pybind11::isinstance<pybind11::int_>(fields[0]), name,
                   ": data_ptr must be an int, got ",
                   type_name(fields[0]));
  try {
    view.data = reinterpret_cast<void*>(fields[0].cast<std::uintptr_t>());
  } catch (const pybind11::cast_error&) {
    detail::throw_user_error(name, ": data_ptr must be a non-negative address, got ",
                             std::string(pybind11::str(fields[0])));
  }

  MECHINTERP_CHECK(pybind11::isinstance<pybind11::str>(fields[1]), name,
                   ": dtype must be a str such as 'float32', got ",
                   type_name(fields[1]));
  view.dtype = parse_dtype(fields[1].cast<std::string>(), name);

  view.ndim = parse_dims(fields[2], name, "shape", view.shape);
  const int stride_dims = parse_dims(fields[3], name, "strides", view.strides);
  MECHINTERP_CHECK(stride_dims == view.ndim, name, ": shape has ", view.ndim,
                   " dims but strides has ", stride_dims);
  for (int d = 0; d < view.ndim; ++d) {
    MECHINTERP_CHECK(view.shape[d] >= 0, name, ": shape must be non-negative, got ",
                     view.shape_string());
  }

  MECHINTERP_CHECK(pybind11::isinstance<pybind11::str>(fields[4]), name,
                   ": device_type must be 'cpu' or 'cuda', got ",
                   type_name(fields[4]));
  const auto device_type = fields[4].cast<std::string>();
  if (device_type == "cpu") {
    view.device = Device{DeviceType::CPU, 0};
  } else if (device_type == "cuda") {
    const std::int64_t index = parse_int(fields[5], name, "device_index");
    MECHINTERP_CHECK(index >= 0 && index <= 1024, name,
                     ": device_index of a cuda tensor must be a concrete index >= 0, got ", index);
    view.device = Device{DeviceType::CUDA, static_cast<int>(index)};
  } else {
    detail::throw_user_error(name, ": device_type must be 'cpu' or 'cuda', got '", device_type,
                             "'");
  }
  return view;
}

// None becomes an absent view: the optional inputs of a kernel.
inline std::optional<TensorView> optional_view_from_py(pybind11::handle obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return view_from_py(obj, name);
}

}  // namespace mechinterp
