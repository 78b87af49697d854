// The fused threshold encode with thread-block clusters of 2 x 1 (see threshold_gemm.cuh).
#include "sae/cuda/fused_sm90/threshold_gemm.cuh"

namespace mechinterp::sae {

const char* run_threshold_gemm_2x1(const FusedGemmParams& params, void* workspace,
                                   cudaStream_t stream) {
  return fused_sm90::ThresholdGemm<2, 1>::run(params, workspace, stream);
}

std::size_t threshold_gemm_workspace_2x1(const FusedGemmParams& params) {
  return fused_sm90::ThresholdGemm<2, 1>::workspace_bytes(params);
}

}  // namespace mechinterp::sae
