#include "common/build_info.h"

#include <sstream>
#include <thread>

#if defined(MECHINTERP_OPENMP)
#include <omp.h>
#endif

#ifndef MECHINTERP_VERSION
#define MECHINTERP_VERSION "0+unknown"
#endif
#ifndef MECHINTERP_CXX_COMPILER
#define MECHINTERP_CXX_COMPILER "unknown"
#endif

namespace mechinterp {

BuildInfo build_info() {
  BuildInfo info;
  info.version = MECHINTERP_VERSION;
  info.compiler = MECHINTERP_CXX_COMPILER;

#if defined(MECHINTERP_WITH_CUDA)
  info.cuda = true;
  info.cuda_version = std::string(MECHINTERP_CUDA_VERSION);
  std::istringstream archs(MECHINTERP_CUDA_ARCH_LIST);
  for (std::string arch; std::getline(archs, arch, ';');) {
    if (!arch.empty()) info.cuda_archs.push_back(arch);
  }
#endif

#if defined(MECHINTERP_WITH_SM90_FUSED)
  info.sae_fused_sm90 = true;
#endif

#if defined(MECHINTERP_OPENMP)
  info.openmp = true;
  info.cpu_threads = omp_get_max_threads();
#else
  // hardware_concurrency may answer 0 when it cannot tell.
  const unsigned hw = std::thread::hardware_concurrency();
  info.cpu_threads = hw > 0 ? static_cast<int>(hw) : 1;
#endif
  return info;
}

}  // namespace mechinterp
