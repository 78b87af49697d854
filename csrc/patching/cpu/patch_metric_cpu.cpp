#include <cmath>
#include <cstdint>
#include <limits>

#include "common/dispatch.h"
#include "patching/patching.h"

namespace mechinterp::patching {

namespace {

// log sum_v exp(z_v) in one pass: the running maximum rescales the running sum.
template <typename T, typename Acc>
Acc logsumexp(const T* z, std::int64_t vocab, std::int64_t stride) {
  Acc top = -std::numeric_limits<Acc>::infinity();
  Acc sum = 0;
  for (std::int64_t v = 0; v < vocab; ++v) {
    const Acc x = static_cast<Acc>(z[v * stride]);
    if (x > top) {
      sum = sum * std::exp(top - x) + 1;
      top = x;
    } else {
      sum += std::exp(x - top);
    }
  }
  return top + std::log(sum);
}

}  // namespace

template <typename T>
void patch_metric_cpu(const T* logits, const std::int64_t* index, const T* ref, acc_t<T>* out,
                      const PatchMetricParams& p) {
  using acc = acc_t<T>;
  const bool parallel = p.rows > 1 && p.rows * p.vocab >= 65536;
  (void)parallel;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (std::int64_t r = 0; r < p.rows; ++r) {
    const T* z = logits + r * p.logits_stride[0];
    const std::int64_t s = p.logits_stride[1];
    const std::int64_t first = index[2 * r];
    switch (p.kind) {
      case MetricKind::LogitDiff:
        out[r] = static_cast<acc>(z[first * s]) - static_cast<acc>(z[index[2 * r + 1] * s]);
        break;
      case MetricKind::LogProb:
      case MetricKind::Prob: {
        const acc logprob = static_cast<acc>(z[first * s]) - logsumexp<T, acc>(z, p.vocab, s);
        out[r] = p.kind == MetricKind::Prob ? std::exp(logprob) : logprob;
        break;
      }
      case MetricKind::KL: {
        const T* y = ref + first * p.ref_stride[0];
        const std::int64_t rs = p.ref_stride[1];
        const acc lse = logsumexp<T, acc>(z, p.vocab, s);
        const acc ref_lse = logsumexp<T, acc>(y, p.vocab, rs);
        acc kl = 0;
        for (std::int64_t v = 0; v < p.vocab; ++v) {
          const acc ref_logprob = static_cast<acc>(y[v * rs]) - ref_lse;
          const acc logprob = static_cast<acc>(z[v * s]) - lse;
          const acc ref_prob = std::exp(ref_logprob);
          if (ref_prob > 0) kl += ref_prob * (ref_logprob - logprob);  // 0 log 0 = 0
        }
        out[r] = kl;
        break;
      }
    }
  }
}

template void patch_metric_cpu<double>(const double*, const std::int64_t*, const double*, double*,
                                       const PatchMetricParams&);
template void patch_metric_cpu<float>(const float*, const std::int64_t*, const float*, float*,
                                      const PatchMetricParams&);
template void patch_metric_cpu<Half>(const Half*, const std::int64_t*, const Half*, float*,
                                     const PatchMetricParams&);
template void patch_metric_cpu<BFloat16>(const BFloat16*, const std::int64_t*, const BFloat16*,
                                         float*, const PatchMetricParams&);

}  // namespace mechinterp::patching
