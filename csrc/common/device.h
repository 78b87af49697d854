// Runs a scope on the device a tensor lives on, then puts the caller's current device back:
// callers (torch among them) rely on their current device not changing under them.
#pragma once

#if defined(MECHINTERP_WITH_CUDA)

#include <cuda_runtime_api.h>

#include "common/check.h"

namespace mechinterp {

class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device_index) {
    MECHINTERP_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device_index) {
      MECHINTERP_CUDA_CHECK(cudaSetDevice(device_index));
      switched_ = true;
    }
  }

  ~CudaDeviceGuard() {
    // A destructor must not throw; failing to switch back leaves nothing better to do.
    if (switched_) (void)cudaSetDevice(previous_);
  }

  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace mechinterp

#endif  // MECHINTERP_WITH_CUDA
