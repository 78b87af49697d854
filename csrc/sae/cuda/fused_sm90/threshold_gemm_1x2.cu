// The fused threshold encode with thread-block clusters of 1 x 2, bfloat16 (see
// threshold_gemm.cuh).
#include "sae/cuda/fused_sm90/threshold_gemm.cuh"

namespace mechinterp::sae {

FusedGemmEntry cluster_1x2_gemm() {
  return fused_sm90::ThresholdGemm<1, 2, false, false, cutlass::bfloat16_t>::entry();
}

}  // namespace mechinterp::sae
