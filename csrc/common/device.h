// Device helpers: the error of a CPU-only build, and (with CUDA) a guard that runs a scope on
// a tensor's device, then puts the caller's current device back:
// callers (torch among them) rely on their current device not changing under them.
#pragma once

#include "common/check.h"
#include "common/tensor_view.h"

namespace mechinterp {

// What every kernel entry point raises when a CUDA tensor reaches a CPU-only build.
[[noreturn]] inline void throw_no_cuda(const char* op, const Device& device) {
  detail::throw_user_error(
      "mechinterp._C was built without CUDA kernels; rebuild with MECHINTERP_CUDA=ON (needs nvcc) "
      "to run ",
      op, " on ", device_name(device));
}

}  // namespace mechinterp

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
