#include <cstdint>
#include <vector>

#include "common/dispatch.h"
#include "sae/sae.h"

namespace mechinterp::sae {

template <typename W, typename I>
void sparse_decode_cpu(const I* index, const acc_t<W>* values, const W* weight, const W* bias,
                       W* out, const DecodeParams& p) {
  using acc = acc_t<W>;
  const bool parallel = p.rows > 1 && p.rows * p.d_out >= (1 << 14);
  (void)parallel;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel if (parallel)
#endif
  {
    std::vector<acc> sum(static_cast<std::size_t>(p.d_out));
#if defined(MECHINTERP_OPENMP)
#pragma omp for schedule(static)
#endif
    for (std::int64_t r = 0; r < p.rows; ++r) {
      W* out_row = out + r * p.out_row_stride;
      for (std::int64_t d = 0; d < p.d_out; ++d) {
        sum[d] = p.accumulate ? static_cast<acc>(out_row[d])
                              : (bias ? static_cast<acc>(bias[d]) : acc(0));
      }
      const std::int64_t begin = p.row_ptr ? p.row_ptr[r] : r * p.per_row;
      const std::int64_t end = p.row_ptr ? p.row_ptr[r + 1] : begin + p.per_row;
      for (std::int64_t j = begin; j < end; ++j) {
        const std::int64_t latent = static_cast<std::int64_t>(index[j]);
        if (latent < 0 || latent >= p.d_sae) continue;  // padding
        const acc a = values[j];
        const W* w = weight + latent * p.d_out;
        for (std::int64_t d = 0; d < p.d_out; ++d) sum[d] += a * static_cast<acc>(w[d]);
      }
      for (std::int64_t d = 0; d < p.d_out; ++d) out_row[d] = static_cast<W>(sum[d]);
    }
  }
}

#define MECHINTERP_DECODE_CPU(W, I)                                                  \
  template void sparse_decode_cpu<W, I>(const I*, const acc_t<W>*, const W*, const W*, W*, \
                                        const DecodeParams&);
MECHINTERP_DECODE_CPU(double, std::int32_t)
MECHINTERP_DECODE_CPU(double, std::int64_t)
MECHINTERP_DECODE_CPU(float, std::int32_t)
MECHINTERP_DECODE_CPU(float, std::int64_t)
MECHINTERP_DECODE_CPU(Half, std::int32_t)
MECHINTERP_DECODE_CPU(Half, std::int64_t)
MECHINTERP_DECODE_CPU(BFloat16, std::int32_t)
MECHINTERP_DECODE_CPU(BFloat16, std::int64_t)
#undef MECHINTERP_DECODE_CPU

}  // namespace mechinterp::sae
