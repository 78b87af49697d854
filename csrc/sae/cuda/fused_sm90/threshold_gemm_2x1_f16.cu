// The fused threshold encode with thread-block clusters of 2 x 1, float16 (see threshold_gemm.cuh).
#include "sae/cuda/fused_sm90/threshold_gemm.cuh"

namespace mechinterp::sae {

FusedGemmEntry cluster_2x1_gemm_f16() {
  return fused_sm90::ThresholdGemm<2, 1, false, false, cutlass::half_t>::entry();
}

}  // namespace mechinterp::sae
