#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common/dispatch.h"
#include "sae/cpu/ranking.h"
#include "sae/sae.h"

namespace mechinterp::sae {

namespace {

// Rows are independent; below this much work per call the thread start-up costs more.
constexpr std::int64_t kParallelWork = 1 << 16;

}  // namespace

// A running top-k per row: columns arrive in index order, and once k are held only a key above
// the k-th best can enter (an equal key has a higher index and ranks after). The buffer holds up
// to 2k, then is cut back to the best k, so the few entries that pass cost O(1) amortised and
// the rest cost one comparison each.
template <typename T>
void select_topk_cpu(const T* values, float* out_values, std::int32_t* out_index,
                     const SelectParams& p) {
  const bool parallel = p.rows > 1 && p.rows * p.cols >= kParallelWork;
  (void)parallel;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel if (parallel)
#endif
  {
    std::vector<Candidate> held;
    held.reserve(static_cast<std::size_t>(2 * p.k));
#if defined(MECHINTERP_OPENMP)
#pragma omp for schedule(static)
#endif
    for (std::int64_t r = 0; r < p.rows; ++r) {
      const T* row = values + r * p.row_stride;
      const std::int32_t* row_index = p.index ? p.index + r * p.index_row_stride : nullptr;
      held.clear();
      bool full = false;
      std::uint32_t bar = 0;  // the k-th best key once `full`
      for (std::int64_t c = 0; c < p.cols; ++c) {
        float v = static_cast<float>(row[c]);
        if (p.bias) v += p.bias[c];
        if (p.scale) v *= p.scale[c];
        const std::uint32_t key = float_key_host(v);
        if (full && key <= bar) continue;
        const std::int32_t index =
            row_index ? row_index[c] : static_cast<std::int32_t>(p.col_offset + c);
        if (row_index && index < 0) continue;  // padding from an earlier selection
        held.push_back({key, index});
        if (static_cast<std::int64_t>(held.size()) == 2 * p.k) {
          std::nth_element(held.begin(), held.begin() + (p.k - 1), held.end(), ranks_before);
          held.resize(static_cast<std::size_t>(p.k));
          bar = held[static_cast<std::size_t>(p.k - 1)].key;
          full = true;
        }
      }
      write_best(held, p.k, out_values + r * p.out_row_stride, out_index + r * p.out_row_stride);
    }
  }
}

template <typename T>
void select_threshold_cpu(const T* values, float* out_values, std::int32_t* out_index,
                          std::int32_t* out_count, const SelectParams& p) {
  const bool parallel = p.rows > 1 && p.rows * p.cols >= kParallelWork;
  (void)parallel;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (std::int64_t r = 0; r < p.rows; ++r) {
    const T* row = values + r * p.row_stride;
    float* out_v = out_values + r * p.out_row_stride;
    std::int32_t* out_i = out_index + r * p.out_row_stride;
    std::int64_t count = 0;
    for (std::int64_t c = 0; c < p.cols; ++c) {
      const float h = static_cast<float>(row[c]);
      const float v = p.bias ? h + p.bias[c] : h;
      if (!(v > (p.threshold ? p.threshold[c] : 0.0f))) continue;
      const float value = p.mag_scale ? std::max(h * p.mag_scale[c] + p.mag_bias[c], 0.0f) : v;
      if (!(value > 0.0f)) continue;
      if (count < p.cap) {
        out_v[count] = value;
        out_i[count] = static_cast<std::int32_t>(p.col_offset + c);
      }
      ++count;
    }
    out_count[r * p.count_row_stride] =
        static_cast<std::int32_t>(std::min<std::int64_t>(count, INT32_MAX));
  }
}

template <typename T>
void compact_slots_cpu(const float* kept, const std::int32_t* index, const std::int32_t* count,
                       T* out_values, std::int64_t* out_index, const CompactParams& p) {
  const bool parallel = p.rows > 1 && p.rows * p.segments * p.cap >= kParallelWork;
  (void)parallel;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (std::int64_t r = 0; r < p.rows; ++r) {
    std::int64_t at = p.row_start[r];
    for (std::int64_t s = 0; s < p.segments; ++s) {
      const std::int64_t cell = r * p.segments + s;
      const std::int64_t filled = std::clamp<std::int64_t>(count[cell], 0, p.cap);
      for (std::int64_t j = 0; j < filled; ++j, ++at) {
        if (at < 0 || at >= p.nnz) continue;
        out_values[at] = T(kept[cell * p.cap + j]);
        out_index[at] = index[cell * p.cap + j];
      }
    }
  }
}

template void select_topk_cpu<float>(const float*, float*, std::int32_t*, const SelectParams&);
template void select_topk_cpu<Half>(const Half*, float*, std::int32_t*, const SelectParams&);
template void select_topk_cpu<BFloat16>(const BFloat16*, float*, std::int32_t*,
                                        const SelectParams&);
template void select_threshold_cpu<float>(const float*, float*, std::int32_t*, std::int32_t*,
                                          const SelectParams&);
template void select_threshold_cpu<Half>(const Half*, float*, std::int32_t*, std::int32_t*,
                                         const SelectParams&);
template void select_threshold_cpu<BFloat16>(const BFloat16*, float*, std::int32_t*,
                                             std::int32_t*, const SelectParams&);

template void compact_slots_cpu<float>(const float*, const std::int32_t*, const std::int32_t*,
                                       float*, std::int64_t*, const CompactParams&);
template void compact_slots_cpu<Half>(const float*, const std::int32_t*, const std::int32_t*,
                                      Half*, std::int64_t*, const CompactParams&);
template void compact_slots_cpu<BFloat16>(const float*, const std::int32_t*, const std::int32_t*,
                                          BFloat16*, std::int64_t*, const CompactParams&);

}  // namespace mechinterp::sae
