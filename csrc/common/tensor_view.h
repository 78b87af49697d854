// A non-owning description of a tensor that lives elsewhere (a torch tensor, usually). The caller
// keeps the memory alive for the duration of the call; nothing here allocates or frees.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

namespace mechinterp {

enum class DType : std::int8_t { Float64, Float32, Float16, BFloat16, Int64, Int32, Bool };

enum class DeviceType : std::int8_t { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;  // ignored for CPU; always a concrete index (never -1) for CUDA

  bool operator==(const Device& other) const {
    return type == other.type && (type == DeviceType::CPU || index == other.index);
  }
  bool operator!=(const Device& other) const { return !(*this == other); }
};

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float64: return "float64";
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

inline std::size_t dtype_itemsize(DType dtype) {
  switch (dtype) {
    case DType::Float64:
    case DType::Int64: return 8;
    case DType::Float32:
    case DType::Int32: return 4;
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::Bool: return 1;
  }
  return 0;
}

inline std::string device_name(const Device& device) {
  if (device.type == DeviceType::CPU) return "cpu";
  return "cuda:" + std::to_string(device.index);
}

struct TensorView {
  // Eight dims cover every tensor the kernels take (the widest is [batch, head, query, key]) with
  // room to spare, and keep the view a fixed-size value that can be copied anywhere.
  static constexpr int kMaxDims = 8;

  void* data = nullptr;
  DType dtype = DType::Float32;
  int ndim = 0;
  std::int64_t shape[kMaxDims] = {};
  std::int64_t strides[kMaxDims] = {};  // in elements, as torch reports them
  Device device;

  int dim() const { return ndim; }
  std::int64_t size(int d) const { return shape[d]; }
  std::int64_t stride(int d) const { return strides[d]; }

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }

  bool is_cpu() const { return device.type == DeviceType::CPU; }
  bool is_cuda() const { return device.type == DeviceType::CUDA; }

  // Dims of size 1 may carry any stride (torch leaves them arbitrary), so they are skipped.
  bool is_contiguous() const {
    std::int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (shape[d] == 0) return true;
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }

  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data);
  }

  // Offset in elements of the element at `index` (one entry per dim).
  std::int64_t offset_of(const std::int64_t* index) const {
    std::int64_t off = 0;
    for (int d = 0; d < ndim; ++d) off += index[d] * strides[d];
    return off;
  }

  template <typename T>
  T* element(const std::int64_t* index) const {
    return data_as<T>() + offset_of(index);
  }

  std::string shape_string() const {
    std::ostringstream os;
    os << '[';
    for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
    os << ']';
    return os.str();
  }
};

}  // namespace mechinterp
