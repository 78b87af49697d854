// Attention-head kernels.
//
// diagonal_score: how much attention each head puts `offset` tokens back.
//   pattern [batch, head, query, key]  softmax attention probabilities, key == query, any strides,
//                                      float64 / float32 / float16 / bfloat16
//   out     [head]                     float64 for float64 input, else float32; contiguous
//   out[h] = mean over b in [0, batch), q in [q_begin, query) of pattern[b, h, q, q - offset]
//   with q_begin = max(first_query, offset). offset 1 scores previous-token heads; with repeated
//   random sequences of period T, offset T - 1 scores induction heads.
#pragma once

#include <cstdint>

#include "common/dispatch.h"
#include "common/tensor_view.h"

#if defined(MECHINTERP_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mechinterp::heads {

// Validates, then runs on the views' device; for CUDA views, on `stream` (a cudaStream_t as an
// integer, 0 for the legacy default stream).
void diagonal_score(const TensorView& pattern, const TensorView& out, std::int64_t offset,
                    std::int64_t first_query, std::uintptr_t stream);

// Sizes and element strides of an already validated problem.
struct DiagonalScoreParams {
  std::int64_t batch;
  std::int64_t heads;
  std::int64_t query;  // == key
  std::int64_t stride_batch;
  std::int64_t stride_head;
  std::int64_t stride_query;
  std::int64_t stride_key;
  std::int64_t offset;
  std::int64_t q_begin;  // max(first_query, offset), < query
};

// T is one of double, float, Half, BFloat16; out holds params.heads values.
template <typename T>
void diagonal_score_cpu(const T* pattern, acc_t<T>* out, const DiagonalScoreParams& params);

#if defined(MECHINTERP_WITH_CUDA)
// Enqueues on `stream` and returns; the caller has made the pattern's device current.
template <typename T>
void launch_diagonal_score_cuda(const T* pattern, acc_t<T>* out, const DiagonalScoreParams& params,
                                cudaStream_t stream);
#endif

}  // namespace mechinterp::heads
