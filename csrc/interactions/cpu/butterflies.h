// The butterflies of the subset transforms on the host, shared by the CPU kernels.
#pragma once

#include <cstdint>

#include "interactions/subsets.h"

namespace mechinterp::interactions {

// One butterfly over `count` pairs (lo[i], hi[i]), where hi[i] is the coalition lo[i] plus one
// player: subset maps update hi from lo, superset maps (the adjoints) lo from hi.
template <typename T, bool kSuperset, bool kNegate>
inline void butterfly_rows(T* __restrict__ lo, T* __restrict__ hi, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) {
    if constexpr (kSuperset) {
      lo[i] = kNegate ? lo[i] - hi[i] : lo[i] + hi[i];
    } else {
      hi[i] = kNegate ? hi[i] - lo[i] : hi[i] + lo[i];
    }
  }
}

template <typename T, bool kSuperset, bool kNegate>
inline void butterfly(T& lo, T& hi) {
  if constexpr (kSuperset) {
    lo = kNegate ? lo - hi : lo + hi;
  } else {
    hi = kNegate ? hi - lo : hi + lo;
  }
}

// The transform over the players [0, bits) of the 2^bits contiguous entries at `block`, which
// should fit in cache. Players 0, 1 and 2 pair entries closer than a vector register, so they
// run together on each group of eight entries; every later player is one vectorised sweep.
template <typename T, bool kSuperset, bool kNegate>
inline void transform_block(T* block, int bits) {
  const std::int64_t size = std::int64_t{1} << bits;
  int player = 0;
  if (bits >= 3) {
    for (std::int64_t base = 0; base < size; base += 8) {
      T x[8];
      for (int r = 0; r < 8; ++r) x[r] = block[base + r];
      for (int q = 0; q < 3; ++q) {
        for (int r = 0; r < 8; ++r) {
          if ((r & (1 << q)) == 0) butterfly<T, kSuperset, kNegate>(x[r], x[r | (1 << q)]);
        }
      }
      for (int r = 0; r < 8; ++r) block[base + r] = x[r];
    }
    player = 3;
  }
  for (; player < bits; ++player) {
    const std::int64_t half = std::int64_t{1} << player;
    for (std::int64_t base = 0; base < size; base += 2 * half) {
      butterfly_rows<T, kSuperset, kNegate>(block + base, block + base + half, half);
    }
  }
}

// Superset sums over the players [0, bits) of `block`, exact only at the entries of at most
// `most` players, which is all superset_weighted_sums keeps: players go from the highest down,
// and a row is skipped when the players above the current one already number more than `most`
// (no kept entry depends on it).
// `sizes[i]` is the number of players in i, for i < 2^bits.
template <typename T>
inline void superset_sums_of_small_sets(T* block, int bits, int most,
                                        const std::uint8_t* sizes) {
  for (int player = bits - 1; player >= 0; --player) {
    const std::int64_t half = std::int64_t{1} << player;
    const std::int64_t prefixes = std::int64_t{1} << (bits - 1 - player);
    for (std::int64_t prefix = 0; prefix < prefixes; ++prefix) {
      if (sizes[prefix] > most) continue;
      T* lo = block + prefix * 2 * half;
      butterfly_rows<T, true, false>(lo, lo + half, half);
    }
  }
}

}  // namespace mechinterp::interactions
