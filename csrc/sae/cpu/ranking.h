// The order the CPU top-k selectors rank in, and how they write a row's best k.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "sae/sae.h"

namespace mechinterp::sae {

struct Candidate {
  std::uint32_t key;  // float_key_host of the value
  std::int32_t index;
};

// Larger key first; equal keys go to the lower index, so the kept set is deterministic.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.key != b.key ? a.key > b.key : a.index < b.index;
}

// The k best of `ranked` into out_v / out_i in order, padded with (-inf, -1).
inline void write_best(std::vector<Candidate>& ranked, std::int64_t k, float* out_v,
                       std::int32_t* out_i) {
  const auto keep = std::min<std::size_t>(ranked.size(), static_cast<std::size_t>(k));
  std::partial_sort(ranked.begin(), ranked.begin() + static_cast<std::ptrdiff_t>(keep),
                    ranked.end(), ranks_before);
  for (std::int64_t j = 0; j < k; ++j) {
    if (static_cast<std::size_t>(j) < keep) {
      out_v[j] = key_float_host(ranked[static_cast<std::size_t>(j)].key);
      out_i[j] = ranked[static_cast<std::size_t>(j)].index;
    } else {
      out_v[j] = -std::numeric_limits<float>::infinity();
      out_i[j] = -1;
    }
  }
}

}  // namespace mechinterp::sae
