// The fused GEMM with a floor per row (a TopK encode), thread-block clusters of 2 x 1, bfloat16
// (see threshold_gemm.cuh).
#include "sae/cuda/fused_sm90/threshold_gemm.cuh"

namespace mechinterp::sae {

FusedGemmEntry cluster_2x1_floor_gemm() {
  return fused_sm90::ThresholdGemm<2, 1, false, true, cutlass::bfloat16_t>::entry();
}

}  // namespace mechinterp::sae
