// The fused threshold encode with thread-block clusters of 1 x 2, float16 (see threshold_gemm.cuh).
#include "sae/cuda/fused_sm90/threshold_gemm.cuh"

namespace mechinterp::sae {

FusedGemmEntry cluster_1x2_gemm_f16() {
  return fused_sm90::ThresholdGemm<1, 2, false, false, cutlass::half_t>::entry();
}

}  // namespace mechinterp::sae
