#include <algorithm>
#include <cstdint>

#include "interactions/cpu/butterflies.h"
#include "interactions/interactions.h"

namespace mechinterp::interactions {

namespace {

// A table larger than cache is transformed in few sweeps over memory instead of n: first every
// block of 2^kBlockBits contiguous entries (32 KB in float64, in L1) for the low players, then
// the high players kGroupBits at a time on tiles of 2^kGroupBits rows of kColumns contiguous
// entries (256 KB in float64, in L2). Each sweep reads and writes the table once.
constexpr int kBlockBits = 12;
constexpr int kGroupBits = 8;
constexpr std::int64_t kColumns = 128;

// Below this many entries one thread is faster than waking the others.
constexpr std::int64_t kParallelEntries = std::int64_t{1} << 15;

template <typename T, bool kSuperset, bool kNegate>
void transform_tile(T* table, int first_player, int players, std::int64_t tile) {
  const std::int64_t row_stride = std::int64_t{1} << first_player;
  const std::int64_t column_tiles = row_stride / kColumns;
  const std::int64_t base = ((tile / column_tiles) << (first_player + players)) +
                            (tile % column_tiles) * kColumns;
  const std::int64_t rows = std::int64_t{1} << players;
  for (int q = 0; q < players; ++q) {
    const std::int64_t bit = std::int64_t{1} << q;
    for (std::int64_t row = 0; row < rows; ++row) {
      if (row & bit) continue;
      T* lo = table + base + row * row_stride;
      butterfly_rows<T, kSuperset, kNegate>(lo, lo + bit * row_stride, kColumns);
    }
  }
}

}  // namespace

template <typename T, bool kSuperset, bool kNegate>
void moebius_cpu(T* table, int n) {
  const std::int64_t size = std::int64_t{1} << n;
  const int low = std::min(n, kBlockBits);
  const std::int64_t blocks = size >> low;
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (size >= kParallelEntries)
#endif
  for (std::int64_t b = 0; b < blocks; ++b) {
    transform_block<T, kSuperset, kNegate>(table + (b << low), low);
  }
  // The maps of different players commute, so the high players can all come after the low ones.
  for (int first = low; first < n; first += kGroupBits) {
    const int players = std::min(kGroupBits, n - first);
    const std::int64_t tiles = size / (kColumns << players);
#if defined(MECHINTERP_OPENMP)
#pragma omp parallel for schedule(static) if (size >= kParallelEntries)
#endif
    for (std::int64_t tile = 0; tile < tiles; ++tile) {
      transform_tile<T, kSuperset, kNegate>(table, first, players, tile);
    }
  }
}

template void moebius_cpu<double, false, true>(double*, int);
template void moebius_cpu<double, false, false>(double*, int);
template void moebius_cpu<double, true, true>(double*, int);
template void moebius_cpu<double, true, false>(double*, int);
template void moebius_cpu<float, false, true>(float*, int);
template void moebius_cpu<float, false, false>(float*, int);
template void moebius_cpu<float, true, true>(float*, int);
template void moebius_cpu<float, true, false>(float*, int);

}  // namespace mechinterp::interactions
