// The fused threshold encode with thread-block clusters of 1 x 2 (see threshold_gemm.cuh).
#include "sae/cuda/fused_sm90/threshold_gemm.cuh"

namespace mechinterp::sae {

const char* run_threshold_gemm_1x2(const FusedGemmParams& params, void* workspace,
                                   cudaStream_t stream) {
  return fused_sm90::ThresholdGemm<1, 2>::run(params, workspace, stream);
}

std::size_t threshold_gemm_workspace_1x2(const FusedGemmParams& params) {
  return fused_sm90::ThresholdGemm<1, 2>::workspace_bytes(params);
}

}  // namespace mechinterp::sae
