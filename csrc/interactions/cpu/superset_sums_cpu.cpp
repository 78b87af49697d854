#include <cstdint>
#include <vector>

#include "common/dispatch.h"
#include "interactions/cpu/butterflies.h"
#include "interactions/interactions.h"

namespace mechinterp::interactions {

namespace {

constexpr std::int64_t kParallelEntries = std::int64_t{1} << 15;

// The masks of `bits` players in canonical order (entry i is the subset of rank i), for every
// bits <= kLowBits, built once.
const std::vector<std::uint32_t>& canonical_masks(int bits) {
  static const auto tables = [] {
    std::vector<std::vector<std::uint32_t>> all(kLowBits + 1);
    for (int b = 0; b <= kLowBits; ++b) {
      for (int size = 0; size <= b; ++size) {
        for (std::int64_t rank = 0; rank < binomial(b, size); ++rank) {
          all[b].push_back(static_cast<std::uint32_t>(lex_unrank(rank, b, size)));
        }
      }
    }
    return all;
  }();
  return tables[bits];
}

// The number of players in each coalition of kLowBits players: a lookup, since portable builds
// have no popcount instruction.
const std::uint8_t* coalition_sizes() {
  static const auto sizes = [] {
    std::vector<std::uint8_t> table(std::size_t{1} << kLowBits);
    for (std::size_t i = 0; i < table.size(); ++i) {
      table[i] = static_cast<std::uint8_t>(popcount(i));
    }
    return table;
  }();
  return sizes.data();
}

// Step 1, one block of low players: for each output size t, the block weighted by
// weights[|S|, t], then summed over supersets within the block; the sums of the low patterns of
// at most t players go to scratch[column][high], column = column_base(t) + canonical rank.
template <typename T>
void sum_block(const T* dividends, const double* weights, acc_t<T>* scratch,
               const SupersetParams& p, const std::vector<std::uint32_t>& low_masks,
               std::int64_t high, std::vector<acc_t<T>>& values, std::vector<acc_t<T>>& sums) {
  using Acc = acc_t<T>;
  const std::int64_t block = std::int64_t{1} << p.low_bits;
  const int high_players = popcount(static_cast<std::uint64_t>(high));
  const T* source = dividends + (high << p.low_bits);
  for (std::int64_t low = 0; low < block; ++low) values[low] = static_cast<Acc>(source[low]);
  std::int64_t column = 0;
  Acc size_weights[kLowBits + 1];
  const std::uint8_t* sizes = coalition_sizes();
  for (int t = 0; t <= p.order; ++t) {
    for (int size = 0; size <= p.low_bits; ++size) {
      size_weights[size] = static_cast<Acc>(weights[(high_players + size) * (p.order + 1) + t]);
    }
    for (std::int64_t low = 0; low < block; ++low) {
      sums[low] = values[low] * size_weights[sizes[low]];
    }
    superset_sums_of_small_sets(sums.data(), p.low_bits, t, sizes);
    const std::int64_t kept = count_up_to(p.low_bits, t);
    for (std::int64_t rank = 0; rank < kept; ++rank, ++column) {
      scratch[(column << p.high_bits) + high] = sums[low_masks[rank]];
    }
  }
}

// Step 2, one output T = (high part, low part): the partial sums of T's low part over every
// high coalition that contains T's high part, added in float64 in a fixed order.
template <typename T>
T reduce_output(const acc_t<T>* scratch, const SupersetParams& p, std::int64_t output) {
  int t = 0;
  std::int64_t rank = output;
  while (rank >= binomial(p.n, t)) rank -= binomial(p.n, t++);
  const std::uint64_t mask = lex_unrank(rank, p.n, t);
  const std::uint64_t low = mask & ((std::uint64_t{1} << p.low_bits) - 1);
  const std::uint64_t high = mask >> p.low_bits;
  const std::int64_t column = column_base(p.low_bits, t) + canonical_rank(low, p.low_bits);
  const acc_t<T>* row = scratch + (column << p.high_bits);
  const std::int64_t free_count = std::int64_t{1} << (p.high_bits - popcount(high));
  double total = 0.0;
  for (std::int64_t c = 0; c < free_count; ++c) {
    total += static_cast<double>(row[spread_around(static_cast<std::uint64_t>(c), high) | high]);
  }
  return static_cast<T>(total);
}

}  // namespace

template <typename T>
void superset_weighted_sums_cpu(const T* dividends, const double* weights, acc_t<T>* scratch,
                                T* out, const SupersetParams& p) {
  const std::vector<std::uint32_t>& low_masks = canonical_masks(p.low_bits);
  const std::int64_t blocks = std::int64_t{1} << p.high_bits;
  const std::int64_t entries = std::int64_t{1} << p.n;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel if (entries >= kParallelEntries)
#endif
  {
    std::vector<acc_t<T>> values(std::size_t{1} << p.low_bits);
    std::vector<acc_t<T>> sums(std::size_t{1} << p.low_bits);
#if defined(MECHINTERP_OPENMP)
#pragma omp for schedule(static)
#endif
    for (std::int64_t high = 0; high < blocks; ++high) {
      sum_block<T>(dividends, weights, scratch, p, low_masks, high, values, sums);
    }
  }
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(dynamic, 64) if (entries >= kParallelEntries)
#endif
  for (std::int64_t output = 0; output < p.outputs; ++output) {
    out[output] = reduce_output<T>(scratch, p, output);
  }
}

template void superset_weighted_sums_cpu<double>(const double*, const double*, double*, double*,
                                                 const SupersetParams&);
template void superset_weighted_sums_cpu<float>(const float*, const double*, float*, float*,
                                                const SupersetParams&);

}  // namespace mechinterp::interactions
