// The fused threshold encode, ping-pong kernel with thread-block clusters of 2 x 1, bfloat16 (see
// threshold_gemm.cuh).
#include "sae/cuda/fused_sm90/threshold_gemm.cuh"

namespace mechinterp::sae {

FusedGemmEntry pingpong_2x1_gemm() {
  return fused_sm90::ThresholdGemm<2, 1, true, false, cutlass::bfloat16_t>::entry();
}

}  // namespace mechinterp::sae
