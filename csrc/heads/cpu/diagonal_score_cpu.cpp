#include <cstdint>

#include "common/dispatch.h"
#include "heads/heads.h"

namespace mechinterp::heads {

template <typename T>
void diagonal_score_cpu(const T* pattern, acc_t<T>* out, const DiagonalScoreParams& p) {
  using acc = acc_t<T>;
  const std::int64_t per_row = p.query - p.q_begin;
  const acc count = static_cast<acc>(p.batch) * static_cast<acc>(per_row);
  // Stepping one query along the diagonal moves one row down and one key right.
  const std::int64_t diag_step = p.stride_query + p.stride_key;
  // Threads only pay off once there is real work; each head is summed by one thread in a fixed
  // order, so the result does not depend on the thread count.
  const bool parallel = p.heads > 1 && p.heads * p.batch * per_row >= 32768;
  (void)parallel;

#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (std::int64_t h = 0; h < p.heads; ++h) {
    acc total = 0;
    for (std::int64_t b = 0; b < p.batch; ++b) {
      // Summing each row on its own before adding it in keeps the float error growing with the
      // row length plus the batch, not their product.
      const T* x = pattern + b * p.stride_batch + h * p.stride_head +
                   p.q_begin * p.stride_query + (p.q_begin - p.offset) * p.stride_key;
      acc row = 0;
      for (std::int64_t i = 0; i < per_row; ++i) row += static_cast<acc>(x[i * diag_step]);
      total += row;
    }
    out[h] = total / count;
  }
}

template void diagonal_score_cpu<double>(const double*, double*, const DiagonalScoreParams&);
template void diagonal_score_cpu<float>(const float*, float*, const DiagonalScoreParams&);
template void diagonal_score_cpu<Half>(const Half*, float*, const DiagonalScoreParams&);
template void diagonal_score_cpu<BFloat16>(const BFloat16*, float*, const DiagonalScoreParams&);

}  // namespace mechinterp::heads
