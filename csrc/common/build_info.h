// What this build of mechinterp._C contains, so Python can report it and tests can check it.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace mechinterp {

struct BuildInfo {
  std::string version;
  bool cuda = false;
  std::vector<std::string> cuda_archs;  // compute capabilities with machine code, e.g. "90"
  std::optional<std::string> cuda_version;
  bool sae_fused_sm90 = false;  // the SAE encode fused into a CUTLASS GEMM (Hopper)
  bool openmp = false;
  int cpu_threads = 1;  // threads the CPU kernels may use
  std::string compiler;
};

BuildInfo build_info();

}  // namespace mechinterp
